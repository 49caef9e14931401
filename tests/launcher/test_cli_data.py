"""`loom data tokenizer|prepare|demo` follow the one write rule: an output that is an input, an existing output
that is not ours (without --overwrite) and a file where a folder goes are refused with one line and exit 2, and
every file that was there keeps its bytes (trees hashed before and after, temporary siblings included)."""

from __future__ import annotations

import argparse
import hashlib
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from framework.data.shards import MANIFEST, PreparedSplit
from framework.data.stdlib_docs import docstrings
from framework.data.tokenizer import Tokenizer, train_tokenizer
from launcher.cli import EXIT_USER_ERROR, main

TOKENIZER_ARGS = ["--vocab-size", "350", "--sentinels", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sorted(docstrings([argparse, json, textwrap]))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return train_tokenizer(texts, path, 350, num_sentinels=4, num_threads=1).path


@pytest.fixture
def work(tmp_path: Path, texts: list[str]) -> Path:
    """tmp_path holding corpus/in.jsonl, a user's notes.txt and an empty folder."""
    (tmp_path / "corpus").mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "corpus" / "in.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file and the names of every folder under root (hidden ones too)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def refused(capsys: pytest.CaptureFixture[str], root: Path, argv: list[str], *expected: str) -> str:
    """Run `loom argv`: exit 2, one stderr line holding every `expected`, no file under root changed."""
    before = tree(root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR, (out, err)
    assert err.startswith("loom: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err, err
    assert tree(root) == before
    return err


def tokenizer_argv(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["data", "tokenizer", *map(str, inputs), "--out", str(out), *TOKENIZER_ARGS, *extra]


TOKENIZER_REFUSALS: list[tuple[str, Callable[[Path], tuple[list[Path], Path]], tuple[str, ...]]] = [
    ("out is the input", lambda w: ([w / "corpus/in.jsonl"], w / "corpus/in.jsonl"), ("input",)),
    ("out is the input, spelled otherwise", lambda w: ([w / "corpus/in.jsonl"], w / "empty/../corpus/in.jsonl"), ("input",)),
    ("out lies inside an input folder", lambda w: ([w / "corpus"], w / "corpus/tok.model"), ("input",)),
    ("out is an empty folder", lambda w: ([w / "corpus/in.jsonl"], w / "empty"), ("is a folder",)),
    ("out is a folder with files", lambda w: ([w / "corpus/in.jsonl"], w / "corpus"), ("is a folder",)),
    ("out is an existing file", lambda w: ([w / "corpus/in.jsonl"], w / "notes.txt"), ("already exists", "--overwrite")),
    ("an input is missing", lambda w: ([w / "absent.jsonl"], w / "tok.model"), ("absent.jsonl", "file not found")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "setup", "expected"), TOKENIZER_REFUSALS, ids=[c[0] for c in TOKENIZER_REFUSALS]
)
def test_tokenizer_refusals(
    capsys: pytest.CaptureFixture[str], work: Path, case: str, setup: Callable, expected: tuple[str, ...]
) -> None:
    inputs, out = setup(work)
    culprit = inputs[0] if case == "an input is missing" else out
    # ConfigError shortens a value to 80 characters (framework/config/errors.py): the path's head survives.
    refused(capsys, work, tokenizer_argv(inputs, out), str(culprit)[:70], *expected)


def test_tokenizer_out_is_an_input_even_with_overwrite(
    capsys: pytest.CaptureFixture[str], work: Path
) -> None:
    corpus = work / "corpus" / "in.jsonl"
    refused(capsys, work, tokenizer_argv([corpus], corpus, "--overwrite"), "input")
    refused(capsys, work, tokenizer_argv([corpus], work / "empty", "--overwrite"), "is a folder")


def test_tokenizer_overwrite_replaces_the_file_and_leaves_no_temp(
    capsys: pytest.CaptureFixture[str], work: Path
) -> None:
    out = work / "notes.txt"
    assert main(tokenizer_argv([work / "corpus"], out, "--overwrite")) == 0
    assert Tokenizer(out).vocab_size == 350 and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == ["corpus", "empty", "notes.txt"]


def test_failed_tokenizer_training_writes_nothing(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    argv = tokenizer_argv([work / "corpus"], work / "tok.model")
    argv[argv.index("350")] = "200000"  # more pieces than the text supports: sentencepiece refuses
    refused(capsys, work, argv, "vocab_size = 200000", "sentencepiece")


def prepare_argv(inputs: list[Path], out: Path, model: Path, *extra: str) -> list[str]:
    files = list(map(str, inputs))
    return ["data", "prepare", *files, "--out", str(out), "--tokenizer", str(model), "--seq-len", "16",
            "--shard-samples", "32", "--workers", "0", "--no-progress", *extra]  # fmt: skip


def user_dir(root: Path) -> Path:
    """A folder of a user's files, two of them named like shards."""
    folder = root / "mine"
    folder.mkdir()
    for name in ("train-00007.tar", "validation-00000.idx", "README"):
        (folder / name).write_text(f"the user's {name}\n")
    return folder


def copy_to(model: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / model.name).write_bytes(model.read_bytes())
    return folder / model.name


PREPARE_REFUSALS: list[tuple[str, Callable[[Path, Path], tuple[list[Path], Path, Path]], tuple[str, ...]]] = [
    ("out holds user files named like shards", lambda w, m: ([w / "corpus"], user_dir(w), m), ("already exists", "--overwrite")),
    ("out is an existing file", lambda w, m: ([w / "corpus"], w / "notes.txt", m), ("is a file",)),
    ("out is the input file", lambda w, m: ([w / "corpus/in.jsonl"], w / "corpus/in.jsonl", m), ("input",)),
    ("out is the input folder", lambda w, m: ([w / "corpus"], w / "corpus", m), ("input",)),
    ("out holds the input", lambda w, m: ([w / "corpus/in.jsonl"], w / "corpus", m), ("input",)),
    ("out lies inside the input folder", lambda w, m: ([w / "corpus"], w / "corpus/prepared", m), ("input",)),
    ("out holds the tokenizer", lambda w, m: ([w / "corpus"], w / "toks", copy_to(m, w / "toks")), ("input", "tok.model")),
    ("an input is missing", lambda w, m: ([w / "absent.jsonl"], w / "out", m), ("absent.jsonl", "file not found")),
    ("the tokenizer is missing", lambda w, m: ([w / "corpus"], w / "out", w / "no.model"), ("--tokenizer", "file not found")),
    ("the tokenizer is not a model", lambda w, m: ([w / "corpus"], w / "out", w / "notes.txt"), ("--tokenizer", "not a sentencepiece model")),
    ("the tokenizer is a folder", lambda w, m: ([w / "corpus"], w / "out", w / "empty"), ("--tokenizer", "folder")),
]  # fmt: skip


# With --overwrite too, except the first case: --overwrite is the deliberate way to replace a user's folder.
PREPARE_CASES = [(*c, False) for c in PREPARE_REFUSALS] + [(*c, True) for c in PREPARE_REFUSALS[1:]]


@pytest.mark.parametrize(
    ("case", "setup", "expected", "overwrite"),
    PREPARE_CASES,
    ids=[f"{c[0]}{' --overwrite' if c[3] else ''}" for c in PREPARE_CASES],
)
def test_prepare_refusals(
    capsys: pytest.CaptureFixture[str],
    work: Path,
    model: Path,
    case: str,
    setup: Callable,
    expected: tuple[str, ...],
    overwrite: bool,
) -> None:
    inputs, out, tokenizer = setup(work, model)
    extra = ["--overwrite"] if overwrite else []
    refused(capsys, work, prepare_argv(inputs, out, tokenizer, *extra), *expected)
    assert not (work / "out").exists()


def test_prepare_over_another_preparation_names_what_differs(
    capsys: pytest.CaptureFixture[str], work: Path, model: Path
) -> None:
    out = work / "out"
    assert main(prepare_argv([work / "corpus"], out, model)) == 0
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert main(prepare_argv([work / "corpus"], out, model)) == 0  # identical: a no-op
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    argv = prepare_argv([work / "corpus"], out, model)
    argv[argv.index("16")] = "8"
    refused(capsys, work, argv, "finished preparation with other seq_len", "--overwrite")
    (out / "train-00000.tar").write_bytes(b"damaged")  # same params, damaged shard: not ours to fix silently
    refused(capsys, work, prepare_argv([work / "corpus"], out, model), "missing or damaged")


def test_prepare_overwrite_replaces_whole(
    capsys: pytest.CaptureFixture[str], work: Path, model: Path
) -> None:
    mine = user_dir(work)
    fresh = work / "fresh"
    assert main(prepare_argv([work / "corpus"], fresh, model)) == 0
    assert main(prepare_argv([work / "corpus"], mine, model, "--overwrite")) == 0
    assert "train:" in capsys.readouterr().out
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert (
        PreparedSplit(mine, "train", "k").manifest["splits"]
        == PreparedSplit(fresh, "train", "k").manifest["splits"]
    )
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


def test_prepare_negative_workers_is_one_line(
    capsys: pytest.CaptureFixture[str], work: Path, model: Path
) -> None:
    argv = prepare_argv([work / "corpus"], work / "out", model)
    argv[argv.index("--workers") + 1] = "-1"
    refused(capsys, work, argv, "--workers", ">= 0")


@pytest.mark.parametrize("what", ["user file", "demo build plus a user file", "a file as out"])
def test_demo_never_replaces_a_folder_holding_user_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, what: str
) -> None:
    out = tmp_path / "demo"
    if what == "a file as out":
        out.write_text("not a folder\n")
        refused(capsys, tmp_path, ["data", "demo", "--out", str(out)], "is a file")
        return
    out.mkdir()
    (out / "train-00000.tar").write_text("the user's file named like a shard\n")
    if what == "demo build plus a user file":
        (out / "demo.json").write_text(json.dumps({"params": {"format": "loom-demo-data"}}))
    refused(capsys, tmp_path, ["data", "demo", "--out", str(out)], "did not write", "--overwrite")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_on_a_corrupt_shard_is_one_line(
    capsys: pytest.CaptureFixture[str], demo_data: Path, tmp_path: Path, num_workers: int
) -> None:
    """With data.verify=size the damage passes the start checks; the first read of a bad sample is one line
    naming the shard and the sample (before, an IndexError from the embedding)."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    for path in demo_data.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    tar = bytearray((data / "train-00000.tar").read_bytes())
    for tokens_at in np.load(data / "train-00000.idx")[:, 0]:
        tar[tokens_at : tokens_at + 2] = b"\xff\xff"  # id 65535 at the start of every sample
    (data / "train-00000.tar").write_bytes(bytes(tar))
    sets = {
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.kv_heads": 2, "model.ffn_hidden": 64,
        "data.tokenizer": data / "tokenizer.model", "data.train": data, "data.validation": "null",
        "data.verify": "size", "data.num_workers": num_workers, "train.steps": 1, "train.global_batch_size": 2,
        "train.micro_batch_size": 2, "train.device": "cpu", "logging.run_dir": tmp_path / "run",
        "logging.progress_bar": "false", "logging.tensorboard": "false",
    }  # fmt: skip
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"
    argv = ["train", str(recipe), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    err = refused(capsys, data, argv, f"{data / 'train-00000.tar'}: ", "token id 65535", "corrupt shard")
    assert "sample " in err


@pytest.mark.parametrize("bad", ["5:3", "x:4", "7", "0:5000"])
def test_data_show_refuses_a_bad_range(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    root = Path(__file__).resolve().parents[2]
    assert main(["data", "show", str(root / "recipes" / "debug.yaml"), "--range", bad]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--range" in err, err


def test_data_show_prints_the_samples_of_the_order(
    capsys: pytest.CaptureFixture[str], demo_data: Path
) -> None:
    """Each global position's (dataset, sample) is the order's, and its text the tokenizer's decoding of it."""
    from framework.config.loader import load_recipe
    from framework.data.source import build_data

    root = Path(__file__).resolve().parents[2]
    sets = [f"data.tokenizer={demo_data / 'tokenizer.model'}", f"data.train={demo_data}"]
    argv = ["data", "show", str(root / "recipes" / "debug.yaml"), "--range", "10:12"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe(root / "recipes" / "debug.yaml", sets)
    tokenizer = Tokenizer(recipe.data.tokenizer)
    source, _ = build_data(recipe.data, recipe.model, tokenizer)
    for g in (10, 11):
        dataset, sample = source.order(g)
        assert f"# sample {g} (dataset {dataset}, sample {sample}, 128 tokens)" in out
        tokens, _ = source.datasets[dataset].sample(
            sample
        )  # the prepared sample, read straight from its shard
        assert tokenizer.decode(tokens[:128].tolist()) in out
