"""The train-module engines: how one optimizer step runs on a parallel layout (framework/parallel builds the
layout; these modules sit above it and import framework/train). native: DDP/FSDP2/HSDP x TP x CP x EP;
pipeline: torch.distributed.pipelining schedules (with the MoE balancer across stages, moe_pipeline); build:
choose one for a recipe. The DeepSpeed engine lives in framework/deepspeed/, beside its config and checkpoints."""
