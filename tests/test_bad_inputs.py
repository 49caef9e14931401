"""A hostile user's table of bad inputs: recipes, data, checkpoints, the command line and conversion.

Every case must end with exit status 2 and ONE stderr line (`loom: error: ...`) that names the culprit, print no
traceback, and leave every file that existed before the command byte for byte as it was (the whole work folder is
hashed before and after). Each case builds its inputs from copies of one tiny trained run (2 steps, a checkpoint
after each), its HF export, and the bundled demo corpus, so the table costs one training run plus the refusals.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug.yaml"

TINY = {
    "model.d_model": 32,
    "model.n_layers": 1,
    "model.n_heads": 4,
    "model.kv_heads": 2,
    "model.ffn_hidden": 64,
    "data.seq_len": 64,
    "data.verify": "size",
    "data.validation": "null",
    "train.steps": 2,
    "train.global_batch_size": 2,
    "train.micro_batch_size": 2,
    "train.device": "cpu",
    "checkpoint.every": 1,
    "logging.progress_bar": "false",
    "logging.tensorboard": "false",
}


def sets(values: dict[str, object]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@dataclass
class World:
    """The inputs one case may use, all copies inside the case's own folder."""

    tmp: Path
    data: Path  # a copy of the demo corpus
    run: Path  # a copy of a finished tiny run: <run>/checkpoints/step_00000001, step_00000002, latest
    hf: Path  # a copy of that run's HF export

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints"

    @property
    def step(self) -> Path:
        return self.ckpt / "step_00000002"

    def train(self, *extra: str, run: Path | None = None, **over: object) -> list[str]:
        values = {
            **TINY,
            "data.tokenizer": self.data / "tokenizer.model",
            "data.train": self.data,
            "logging.run_dir": run or self.tmp / "new-run",
            **{k.replace("__", "."): v for k, v in over.items()},
        }
        return ["train", str(DEBUG), *sets(values), *extra]

    def resume(self, *extra: str, **over: object) -> list[str]:
        return self.train("--resume", *(extra or ("auto",)), run=self.run, **over)

    def recipe(self, text: str | bytes, name: str = "r.yaml") -> Path:
        path = self.tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data) -> tuple[Path, Path, Path]:
    """One tiny run (2 steps, checkpoint every step) and its HF export, built once for the table."""
    base = tmp_path_factory.mktemp("bad-inputs")
    data = base / "data"
    shutil.copytree(demo_data, data)
    world = World(base, data, base / "run", base / "hf")
    torch.set_num_threads(1)
    assert main(world.train(run=world.run)) == 0
    assert main(["convert", str(world.ckpt), "--to", "hf", str(world.hf)]) == 0
    return data, world.run, world.hf


@pytest.fixture
def world(trained, tmp_path) -> World:
    data, run, hf = trained
    w = World(tmp_path, tmp_path / "data", tmp_path / "run", tmp_path / "hf")
    shutil.copytree(data, w.data)
    shutil.copytree(run, w.run, symlinks=True)
    shutil.copytree(hf, w.hf)
    return w


def tree_hashes(root: Path) -> dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def flip(path: Path, offset: int, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, max(0, len(data) - count))
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def shard(w: World) -> Path:
    return max(w.step.glob("*.distcp"), key=lambda p: p.stat().st_size)


# -- the cases: (name, setup(world) -> argv, a word the error line must contain) ---------------------------------

Setup = Callable[[World], list[str]]


def _recipe_case(text: str | bytes) -> Setup:
    return lambda w: ["check", str(w.recipe(text))]


def _pickle_entry(w: World) -> list[str]:
    """A checkpoint whose DCP index declares a pickled (non-tensor) entry."""
    import pickle

    from torch.distributed.checkpoint import metadata as md

    path = w.step / ".metadata"
    meta = pickle.loads(path.read_bytes())  # our own fixture, written by this test's own run
    meta.state_dict_metadata["evil"] = md.BytesStorageMetadata()
    path.write_bytes(pickle.dumps(meta))
    return ["ckpt", "verify", str(w.step)]


def _pickle_in_chunk(w: World) -> list[str]:
    """A tensor chunk whose bytes are replaced by a pickle of a callable: never run, one line, no advice to
    unpickle."""
    import pickle

    target = shard(w)
    payload = pickle.dumps(print)
    target.write_bytes(payload + target.read_bytes()[len(payload) :])
    return w.resume(str(w.step))


def _user_shards(w: World) -> list[str]:
    out = w.tmp / "prepared"
    out.mkdir()
    (out / "train-00007.tar").write_bytes(b"user's own archive")
    (out / "notes.txt").write_text("mine")
    return [
        "data", "prepare", str(w.data / "corpus.jsonl"), "--out", str(out),
        "--tokenizer", str(w.data / "tokenizer.model"), "--seq-len", "64", "--no-progress", "--workers", "0",
    ]  # fmt: skip


def _prepare(w: World, *, inputs: str | None = None, out: str | None = None, tok: str | None = None) -> list:
    return [
        "data", "prepare", inputs or str(w.data / "corpus.jsonl"), "--out", out or str(w.tmp / "p"),
        "--tokenizer", tok or str(w.data / "tokenizer.model"), "--seq-len", "64", "--no-progress",
        "--workers", "0",
    ]  # fmt: skip


def _tokenizer(w: World, *, inputs: str | None = None, out: str | None = None) -> list[str]:
    src = inputs or str(w.data / "corpus.jsonl")
    return ["data", "tokenizer", src, "--out", out or str(w.tmp / "t.model"), "--vocab-size", "1000"]


def _corrupt_ids(w: World) -> list[str]:
    """Token ids beyond the 4096-piece vocabulary in every train sample (sizes unchanged, data.verify=size)."""
    import numpy as np

    tar, index = w.data / "train-00000.tar", np.load(w.data / "train-00000.idx")
    data = bytearray(tar.read_bytes())
    big = np.full(16, 65000, dtype=np.uint16).tobytes()
    for tokens_at in index[:, 0]:  # each sample's token array starts here (framework/data/shards.py)
        data[tokens_at : tokens_at + len(big)] = big
    tar.write_bytes(bytes(data))
    return w.train()


def _corrupt_idx(w: World) -> list[str]:
    idx = w.data / "train-00000.idx"
    idx.write_bytes(b"\x00garbage" * (idx.stat().st_size // 8 + 1))
    return w.train()


def _shard_hash(w: World) -> list[str]:
    flip(w.data / "train-00000.tar", 2048, 16)
    return w.train(data__verify="sha256")


def _all_bad(w: World) -> list[str]:
    for step in ("step_00000001", "step_00000002"):
        target = max((w.ckpt / step).glob("*.distcp"), key=lambda p: p.stat().st_size)
        flip(target, target.stat().st_size // 2)
    return w.resume()


def _step_edit(w: World) -> list[str]:
    edit_json(w.step / "meta.json", lambda m: m.update(step=1000))
    return w.resume(str(w.step))


def _sharded_export_in_out(w: World) -> list[str]:
    out = w.tmp / "export"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text("{}")
    return ["convert", str(w.ckpt), "--to", "hf", str(out)]


def _hf_into_run(w: World) -> list[str]:
    return ["convert", str(w.hf), "--from", "hf", str(w.run)]


def _truncated_safetensors(w: World) -> list[str]:
    target = next(w.hf.glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return ["convert", str(w.hf), "--from", "hf", str(w.tmp / "imported")]


def _bad_hf_config(w: World) -> list[str]:
    (w.hf / "config.json").write_text("{not json")
    return ["convert", str(w.hf), "--from", "hf", str(w.tmp / "imported")]


def _run_dir_is_file(w: World) -> list[str]:
    (w.tmp / "runfile").write_text("a file")
    return w.train(run=w.tmp / "runfile")


CASES: list[tuple[str, Setup, str]] = [
    # recipes
    ("recipe-lr-inf", _recipe_case("optim: {lr: .inf}\n"), "optim.lr"),
    ("recipe-lr-nan", _recipe_case("optim:\n  lr: .nan\n"), "optim.lr"),
    ("recipe-neg-inf", _recipe_case("optim:\n  weight_decay: -.inf\n"), "optim.weight_decay"),
    ("recipe-dup-top", _recipe_case("train:\n  steps: 3\ntrain:\n  steps: 4\n"), "train"),
    ("recipe-dup-nested", _recipe_case("train:\n  steps: 3\n  steps: 4\n"), "steps"),
    ("recipe-empty", _recipe_case(""), "empty"),
    ("recipe-comments-only", _recipe_case("# nothing here\n"), "empty"),
    ("recipe-null", _recipe_case("null\n"), "empty"),
    ("recipe-list", _recipe_case("- a\n- b\n"), "mapping"),
    ("recipe-not-utf8", _recipe_case(b"model:\n  d_model: 64 # \xff\xfe\n"), "UTF-8"),
    ("recipe-steps-1e30", _recipe_case("train:\n  steps: 1e30\n"), "train.steps"),
    ("recipe-steps-neg", _recipe_case("train:\n  steps: -5\n"), "train.steps"),
    ("recipe-unknown-key", _recipe_case("train:\n  stepz: 5\n"), "stepz"),
    ("recipe-wrong-type", _recipe_case("train:\n  steps: many\n"), "train.steps"),
    ("recipe-yaml-syntax", _recipe_case("train: [1, 2\n"), "yaml"),
    ("recipe-missing-base", _recipe_case("base: nowhere.yaml\n"), "nowhere.yaml"),
    ("recipe-missing-file", lambda w: ["check", str(w.tmp / "absent.yaml")], "absent.yaml"),
    ("set-lr-nan", lambda w: ["check", str(DEBUG), "--set", "optim.lr=.nan"], "optim.lr"),
    ("set-huge-layers", lambda w: w.train(model__n_layers=3_000_000_000), "n_layers"),
    ("set-huge-d-model", lambda w: w.train(model__d_model=2**40, model__n_heads=4), "d_model"),
    ("set-huge-vocab", lambda w: w.train(model__vocab_size=10**13), "vocab_size"),
    ("set-bad-syntax", lambda w: ["check", str(DEBUG), "--set", "optim.lr"], "optim.lr"),
    ("run-dir-is-file", _run_dir_is_file, "runfile"),
    # data
    ("tok-out-is-input", lambda w: _tokenizer(w, out=str(w.data / "corpus.jsonl")), "corpus.jsonl"),
    ("tok-out-is-folder", lambda w: _tokenizer(w, out=str(w.data)), "data"),
    ("tok-missing-input", lambda w: _tokenizer(w, inputs=str(w.tmp / "none.jsonl")), "none.jsonl"),
    ("tok-existing-out", lambda w: _tokenizer(w, out=str(w.data / "tokenizer.model")), "tokenizer.model"),
    ("tok-vocab-zero", lambda w: [*_tokenizer(w), "--vocab-size", "0"], "--vocab-size"),
    ("prep-user-shards", _user_shards, "prepared"),
    ("prep-missing-input", lambda w: _prepare(w, inputs=str(w.tmp / "nothing.jsonl")), "nothing.jsonl"),
    ("prep-out-is-file", lambda w: _prepare(w, out=str(w.data / "corpus.jsonl")), "corpus.jsonl"),
    ("prep-out-is-input-dir", lambda w: _prepare(w, inputs=str(w.data), out=str(w.data)), "data"),
    ("prep-missing-tokenizer", lambda w: _prepare(w, tok=str(w.tmp / "no.model")), "no.model"),
    ("prep-garbage-tokenizer", lambda w: _prepare(w, tok=str(w.recipe("junk", "junk.model"))), "junk.model"),
    ("prep-val-fraction", lambda w: [*_prepare(w), "--val-fraction", "2"], "--val-fraction"),
    ("shard-ids-beyond-vocab", _corrupt_ids, "train-00000"),
    ("shard-idx-garbage", _corrupt_idx, "train-00000.idx"),
    ("shard-hash-mismatch", _shard_hash, "train-00000.tar"),
    ("data-train-missing", lambda w: w.train(data__train=w.tmp / "nodata"), "nodata"),
    # checkpoints
    (
        "resume-rank-json-garbage",
        lambda w: (w.step.joinpath("rank_00000.json").write_text("{{{"), w.resume(str(w.step)))[1],
        "rank_00000.json",
    ),  # noqa: E501
    (
        "resume-meta-no-state",
        lambda w: (edit_json(w.step / "meta.json", lambda m: m.pop("state")), w.resume(str(w.step)))[1],
        "meta.json",
    ),  # noqa: E501
    (
        "resume-meta-not-json",
        lambda w: (w.step.joinpath("meta.json").write_bytes(b"\xff{"), w.resume(str(w.step)))[1],
        "meta.json",
    ),  # noqa: E501
    ("resume-distcp-header", lambda w: (flip(shard(w), 0, 64), w.resume(str(w.step)))[1], ".distcp"),
    (
        "resume-distcp-middle",
        lambda w: (flip(shard(w), shard(w).stat().st_size // 2), w.resume(str(w.step)))[1],
        ".distcp",
    ),  # noqa: E501
    ("resume-pickle-in-chunk", _pickle_in_chunk, ".distcp"),
    ("resume-meta-step-edited", _step_edit, "step"),
    ("resume-auto-all-bad", _all_bad, "step_00000001"),
    ("resume-truncated", lambda w: (shard(w).write_bytes(b"x"), w.resume(str(w.step)))[1], "truncated"),
    ("resume-missing-path", lambda w: w.resume(str(w.tmp / "nockpt")), "nockpt"),
    ("resume-path-is-file", lambda w: w.resume(str(w.step / "meta.json")), "meta.json"),
    ("resume-other-shape", lambda w: w.resume(str(w.step), model__d_model=48), "holds another model"),
    ("resume-seq-len-changed", lambda w: w.resume(data__seq_len=32), "data.seq_len"),
    ("resume-seed-changed", lambda w: w.resume(train__seed=7), "train.seed"),
    (
        "resume-no-marker",
        lambda w: (w.step.joinpath("COMPLETE").unlink(), w.resume(str(w.step)))[1],
        "COMPLETE",
    ),
    ("train-into-old-run", lambda w: w.train(run=w.run), "--resume"),
    ("verify-pickled-entry", _pickle_entry, ".metadata"),
    ("inspect-not-ckpt", lambda w: ["ckpt", "inspect", str(w.data)], "data"),
    ("verify-flipped", lambda w: (flip(shard(w), 100), ["ckpt", "verify", str(w.step)])[1], ".distcp"),
    (
        "consolidate-flipped",
        lambda w: (flip(shard(w), 100), ["ckpt", "consolidate", str(w.step), str(w.tmp / "c")])[1],
        ".distcp",
    ),  # noqa: E501
    ("consolidate-out-nonempty", lambda w: ["ckpt", "consolidate", str(w.step), str(w.data)], "data"),
    (
        "consolidate-out-is-source",
        lambda w: ["ckpt", "consolidate", str(w.step), str(w.step)],
        "step_00000002",
    ),
    (
        "consolidate-bad-dtype",
        lambda w: ["ckpt", "consolidate", str(w.step), str(w.tmp / "c"), "--dtype", "fp8"],
        "--dtype",
    ),  # noqa: E501
    # conversion
    ("to-hf-over-sharded-export", _sharded_export_in_out, "export"),
    ("to-hf-out-is-source", lambda w: ["convert", str(w.ckpt), "--to", "hf", str(w.ckpt)], "checkpoints"),
    (
        "to-hf-flipped",
        lambda w: (flip(shard(w), 100), ["convert", str(w.step), "--to", "hf", str(w.tmp / "e")])[1],
        ".distcp",
    ),  # noqa: E501
    ("from-hf-into-run", _hf_into_run, "run"),
    ("from-hf-truncated", _truncated_safetensors, ".safetensors"),
    ("from-hf-bad-config", _bad_hf_config, "config.json"),
    ("from-hf-missing", lambda w: ["convert", str(w.tmp / "nohf"), "--from", "hf", str(w.tmp / "o")], "nohf"),
    ("to-megatron-nonempty", lambda w: ["convert", str(w.ckpt), "--to", "megatron", str(w.data)], "data"),
    # command line
    ("cli-unknown-command", lambda w: ["fly"], "fly"),
    ("cli-nproc-zero", lambda w: [*w.train(), "--nproc", "0"], "--nproc"),
    (
        "cli-bad-master",
        lambda w: [*w.train(), "--nproc", "2", "--nnodes", "2", "--node-rank", "0", "--master", "x"],
        "--master",
    ),  # noqa: E501
    ("cli-convert-no-direction", lambda w: ["convert", str(w.ckpt), str(w.tmp / "o")], "convert"),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("setup", "culprit"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world: World, capfd, setup: Setup, culprit: str) -> None:
    argv = setup(world)
    before = tree_hashes(world.tmp)
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("loom: error: "), err[-2000:]
    assert "Traceback" not in err + out and "weights_only=False" not in err
    assert culprit in lines[0], lines[0]
    after = tree_hashes(world.tmp)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed: {changed}"


def test_disk_full_during_a_save_is_one_line_and_leaves_nothing(world: World, capfd) -> None:
    """`loom train` whose checkpoint.dir is a real 1 MiB tmpfs (the tiny model's first save needs ~1.7 MB): one
    line saying No space left on device and how much the save needs, no traceback, and no partial temp directory
    left to keep the disk full. Skipped where a tmpfs cannot be mounted (CI runs as root)."""
    import subprocess

    mount = world.tmp / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        capfd.readouterr()
        assert main(world.train(checkpoint__dir=mount / "ckpt")) == 2
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "bytes" in lines[0], lines
        leftovers = [p.name for p in (mount / "ckpt").iterdir() if p.name != ".loom-lock"]
        assert leftovers == [], leftovers
    finally:
        subprocess.run(["umount", str(mount)], check=False)
