"""`loom train --nproc 2` with parallel.engine: deepspeed (ZeRO-2) on the demo corpus: the losses of one native
process step for step (the recipe, data order, model and optimizer are the same; only the engine differs); its
checkpoints resume exactly, consolidate to the native run's weights and export to Hugging Face with the same
logits in transformers; DeepSpeed's pickled files are read weights-only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

import transformers  # noqa: E402

from framework.config.errors import ConfigError  # noqa: E402
from framework.config.loader import load_recipe  # noqa: E402
from framework.convert.consolidate import read_model_state  # noqa: E402
from framework.models import build_model  # noqa: E402
from launcher.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.kv_heads": 2, "model.ffn_hidden": 64,
        "train.steps": 4, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.eval_every": 0,
        "train.device": "cpu", "data.validation": "null", "data.verify": "size", "checkpoint.every": 0,
        "checkpoint.save_final": "false", "logging.progress_bar": "false", "logging.tensorboard": "false"}  # fmt: skip


def _train(run_dir: Path, data: Path, *extra: str) -> list[float]:
    sets = TINY | {"data.tokenizer": data / "tokenizer.model", "data.train": data, "logging.run_dir": run_dir}
    argv = [
        "train",
        str(ROOT / "recipes/debug.yaml"),
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
    ]
    assert main([*argv, *extra]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


DS = ("--nproc", "2", "--set", "parallel.engine=deepspeed", "--set", "deepspeed.zero_stage=2")


def test_deepspeed_trains_resumes_and_converts_like_the_native_engine(
    demo_data: Path, tmp_path: Path
) -> None:
    native = _train(tmp_path / "native", demo_data, "--set", "checkpoint.save_final=true")
    ds = _train(
        tmp_path / "ds", demo_data, *DS, "--set", "checkpoint.every=2", "--set", "checkpoint.save_final=true"
    )
    assert len(ds) == len(native) == 4
    assert max(abs(a - b) / b for a, b in zip(ds, native, strict=True)) <= 1e-5, (ds, native)
    assert "engine: deepspeed" in (tmp_path / "ds" / "recipe.yaml").read_text()

    saved = tmp_path / "ds" / "checkpoints"
    resumed = _train(tmp_path / "resumed", demo_data, *DS, "--resume", str(saved / "step_00000002"))
    assert resumed == ds[2:]  # exact: same layout, DeepSpeed's own partitions reloaded

    ours = read_model_state(saved / "step_00000004").tensors  # ZeRO partitions merged
    theirs = read_model_state(tmp_path / "native" / "checkpoints" / "step_00000004").tensors
    assert ours.keys() == theirs.keys()
    assert max(((ours[k] - t).norm() / t.norm()).item() for k, t in theirs.items()) <= 1e-5

    out = tmp_path / "hf"
    assert main(["convert", str(saved / "step_00000004"), "--to", "hf", str(out)]) == 0
    _same_logits(tmp_path / "ds" / "recipe.yaml", ours, out)


def _same_logits(recipe_path: Path, tensors: dict[str, torch.Tensor], hf_folder: Path) -> None:
    model = build_model(load_recipe(recipe_path, []).model)
    model.load_state_dict(tensors)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


class NotAllowed:
    """A class outside the allowlist (a crafted checkpoint could name any callable instead)."""


def test_a_deepspeed_file_with_other_objects_is_refused(tmp_path: Path) -> None:
    step = tmp_path / "step_00000001"
    (step / "deepspeed").mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 1}))
    torch.save({"module": {}, "x": NotAllowed()}, step / "deepspeed" / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": NotAllowed()},
        step / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    from framework.deepspeed.checkpoint import read_deepspeed_model

    with pytest.raises(ConfigError) as err:
        read_deepspeed_model(step)
    assert "allowlist" in str(err.value) and "NotAllowed" in str(err.value), str(err.value)
    shutil.rmtree(step)
