"""A checkpoint written by two ranks holding DTensor shards (FSDP2 with uneven row shards; TP2 with column and row
shards), consolidated in this process with no process group: the whole tensors equal those the ranks gathered
with collectives, and inspect counts each sharded tensor's chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.inspect import inspect_checkpoint
from framework.checkpoint.verify import check_compatible, verify_checkpoint
from framework.config import ConfigError
from framework.convert.consolidate import consolidate

LAYOUTS = {
    "fsdp2_odd_vocab": ({"data_parallel": "fsdp"}, {"vocab_size": 65, "bias": True}),  # 33 + 32 rows
    "tp2_gqa": ({"tp": 2}, {"kv_heads": 2, "mlp": "swiglu", "qk_norm": True}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_consolidate_sharded_checkpoint(dist_pool, tmp_path: Path, layout: str) -> None:
    parallel, model = LAYOUTS[layout]
    step = tmp_path / "step_00000004"
    full, _ = dist_pool(2).run("dist_cases_ckpt:save_sharded", str(step), parallel, model)
    verify_checkpoint(step)
    check_compatible(step, {f"model/{k}": v for k, v in full.items()})

    got = load_file(consolidate(step, tmp_path / "out") / "model.safetensors")
    assert got.keys() == full.keys()
    for key, tensor in full.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key

    report = inspect_checkpoint(step)
    assert report["layout"] == parallel and report["files_ok"] and report["tokens"] == 256
    chunks = {row["key"]: row["chunks"] for row in report["tensors"]}
    assert chunks["model/output.weight"] == 2 and max(chunks.values()) == 2
    wrong = full | {"output.weight": torch.empty(3, 3)}
    with pytest.raises(ConfigError, match=r"model/output.weight is \[\d+, 32\] in the checkpoint, \[3, 3\]"):
        check_compatible(step, {f"model/{k}": v for k, v in wrong.items()})
