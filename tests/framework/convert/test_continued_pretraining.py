"""Continued pretraining of a Hugging Face model, end to end through the CLI, as a new user would do it:

1. a tiny Llama-3-style model with a real trained byte-level BPE tokenizer.json (no pad token), saved by transformers;
2. `loom convert HF --from hf OUT` (the tokenizer comes along; the recipe names it by an absolute path);
3. `loom data prepare` text with that tokenizer;
4. `loom train OUT/recipe.yaml --resume auto` from the imported step 0: the first loss equals the HF model's loss
   on the same batch within 1e-4;
5. `loom convert CKPT --to hf`;
6. transformers loads the export offline (AutoTokenizer + AutoModelForCausalLM) and its greedy generate equals
   Loom's greedy decode of the trained checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from framework.config.loader import load_recipe
from framework.convert.consolidate import read_model_state
from framework.data.hf_tokenizer import train_bpe
from framework.models import build_model
from framework.models.generate import greedy_decode
from launcher.cli import EXIT_USER_ERROR, main

SEQ, STEPS, NEW_TOKENS = 32, 2, 8
TEXTS = [f"Record {i}: sensor {i % 5} read {i * 37 % 101} units; status {'ok' if i % 3 else 'warn'}.\n"
         f"  note: value {i} is within range {i % 11}." for i in range(200)]  # fmt: skip


def _hf_model(out: Path, tmp: Path) -> None:
    """Step 1: the model and its tokenizer as transformers writes them (tokenizer.json + tokenizer_config.json)."""
    import transformers

    raw = tmp / "raw-bpe"
    train_bpe(TEXTS, raw, vocab_size=384, num_sentinels=0)
    # Llama-3 style: bos / eos, no pad token (transformers writes the special tokens into tokenizer_config.json)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(raw / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _run(args: list[str]) -> None:
    assert main(args) == 0, args


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cpt")
    hf, imported, data, export = tmp / "hf", tmp / "imported", tmp / "prepared", tmp / "export"
    _hf_model(hf, tmp)
    _run(["convert", str(hf), "--from", "hf", str(imported)])
    corpus = tmp / "new-data.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(TEXTS)))
    _run(["data", "prepare", str(corpus), "--tokenizer", str(imported / "tokenizer"), "--seq-len", str(SEQ),
          "--out", str(data), "--workers", "0", "--no-progress"])  # fmt: skip
    overrides = [f"data.train={data}", "data.validation=null", f"data.seq_len={SEQ}", f"train.steps={STEPS}",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.device=cpu", "train.eval_every=0",
                 "logging.progress_bar=false", "logging.tensorboard=false", "schedule.warmup_steps=0",
                 "checkpoint.every=0", "precision.dtype=fp32"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # the written recipe's paths must not depend on the cwd
    try:
        _run(["train", str(imported / "recipe.yaml"), "--resume", "auto", *[f"--set={o}" for o in overrides]])
    finally:
        os.chdir(cwd)
    _run(["convert", str(imported / "checkpoints"), "--to", "hf", str(export)])
    return {"hf": hf, "imported": imported, "data": data, "export": export, "overrides": overrides}


def test_import_carries_the_tokenizer_by_an_absolute_path(pipeline) -> None:
    recipe = load_recipe(pipeline["imported"] / "recipe.yaml")
    tokenizer = Path(recipe.data.tokenizer)
    assert tokenizer.is_absolute() and tokenizer == pipeline["imported"] / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tokenizer / name).read_bytes() == (pipeline["hf"] / name).read_bytes()


def test_first_loss_equals_the_hf_models_on_the_same_batch(pipeline) -> None:
    import transformers

    from framework.data.source import build_data
    from framework.run import StepBatches

    recipe = load_recipe(pipeline["imported"] / "recipe.yaml", pipeline["overrides"])
    source, _ = build_data(recipe.data, recipe.model)
    first = next(iter(StepBatches(source, recipe)))  # the micro-batches of step 1, as the run drew them
    hf = transformers.AutoModelForCausalLM.from_pretrained(pipeline["hf"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in first:
            logits = hf(batch["input_ids"]).logits
            labels = batch["labels"]
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    lines = (Path(recipe.logging.run_dir) / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(losses) == STEPS
    assert abs(losses[0] - total / count) <= 1e-4 * total / count, (losses[0], total / count)


def test_the_export_loads_offline_and_generates_as_loom_decodes(pipeline, monkeypatch) -> None:
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = pipeline["export"]
    tok = transformers.AutoTokenizer.from_pretrained(export)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert (
        tok("sensor 3 read").input_ids
        == transformers.AutoTokenizer.from_pretrained(pipeline["hf"])("sensor 3 read").input_ids
    )
    state = read_model_state(pipeline["imported"] / "checkpoints")
    recipe = load_recipe(pipeline["imported"] / "recipe.yaml")
    loom = build_model(recipe.model)
    loom.load_state_dict(state.tensors)
    loom.eval()
    prompt = torch.tensor([tok("Record 7: sensor 2", add_special_tokens=False).input_ids])
    ours, _ = greedy_decode(loom, prompt, NEW_TOKENS)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert theirs[0, prompt.shape[1] :].tolist() == ours[0].tolist()
    # the trained weights were exported, not the imported ones: training moved them
    assert state.path.name == f"step_{STEPS:08d}"
    start = read_model_state(pipeline["imported"] / "checkpoints" / "step_00000000").tensors
    assert not torch.equal(start["output.weight"], state.tensors["output.weight"])


def test_export_without_a_tokenizer_and_the_refusals(pipeline, tmp_path, capsys) -> None:
    checkpoints = pipeline["imported"] / "checkpoints"
    weights = tmp_path / "weights-only"
    _run(["convert", str(checkpoints), "--to", "hf", str(weights), "--no-tokenizer"])
    assert (weights / "config.json").is_file() and not (weights / "tokenizer.json").exists()
    # a tokenizer with more tokens than the model's vocabulary: refused, naming both sizes, nothing written
    big = tmp_path / "big"
    big.mkdir()
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(pipeline["hf"] / "tokenizer.json"))
    backend.add_tokens([f"<x{i}>" for i in range(100)])
    backend.save(str(big / "tokenizer.json"))
    capsys.readouterr()
    code = main(["convert", str(checkpoints), "--to", "hf", str(tmp_path / "bad"), "--tokenizer", str(big)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and "484 pieces" in err[0] and "448" in err[0], err
    assert not (tmp_path / "bad").exists()
