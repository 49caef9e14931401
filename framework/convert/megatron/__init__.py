"""megatron-core checkpoints <-> Loom checkpoints (docs/megatron.md)."""
