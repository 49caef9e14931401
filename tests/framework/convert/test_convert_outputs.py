"""The write rule for every conversion (`convert --to hf|megatron`, `--from hf|megatron`) and `ckpt consolidate`:
an existing non-empty OUT is refused unless --overwrite, which replaces it whole; OUT that is, holds or lies in
an input is always refused; a failed run leaves no OUT and no temporary folder. Plus the damaged inputs each of
these reads: one line naming the file, exit 2, no traceback, and the bytes of every file there before unchanged
(hashed before and after).

Each test runs in its own folder (chdir) with relative paths, so the one-line messages name short paths."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from framework.checkpoint import get_rng_state, save_checkpoint
from framework.config.loader import recipe_to_dict
from framework.config.schema import Recipe
from framework.train import TrainModule
from launcher.cli import EXIT_USER_ERROR, main
from tests.framework.convert.conftest import CONFIGS, random_model

CFG = dataclasses.replace(CONFIGS["llama"], vocab_size=4100)  # covers the demo tokenizer (4096 pieces)
SOURCES = ("ckpt", "hf", "mega")
# direction -> (the source folder it reads, its arguments with OUT last)
DIRECTIONS: dict[str, tuple[str, list[str]]] = {
    "to_hf": ("ckpt", ["convert", "ckpt", "--to", "hf"]),
    "to_megatron": ("ckpt", ["convert", "ckpt", "--to", "megatron"]),
    "from_hf": ("hf", ["convert", "hf", "--from", "hf"]),
    "from_megatron": ("mega", ["convert", "mega", "--from", "megatron"]),
    "consolidate": ("ckpt", ["ckpt", "consolidate", "ckpt"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A folder holding ckpt/ (a Loom checkpoint root, as training writes it), hf/ (its HF export, sharded) and
    mega/ (its megatron-core torch_dist export, with megatron_config.yaml)."""
    from framework.convert.hf.convert import export_checkpoint
    from framework.convert.megatron.convert import export_megatron

    root = tmp_path_factory.mktemp("sources")
    recipe = Recipe(model=CFG)
    recipe.data.tokenizer = str(demo_data / "tokenizer.model")
    recipe.data.seq_len = 32
    module = TrainModule(random_model(CFG), recipe, torch.device("cpu"))
    meta = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
            "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    save_checkpoint(root / "ckpt", 0, module.state_dict(), meta)
    export_checkpoint(root / "ckpt", root / "hf", max_shard_bytes=400_000)
    export_megatron(root / "ckpt", root / "mega")
    return root


@pytest.fixture
def work(sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the sources in the test's own folder, which becomes the working directory."""
    for name in SOURCES:
        shutil.copytree(sources / name, tmp_path / name, symlinks=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and the target of every link) under root, hidden ones included."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            found[rel] = (
                os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
        found.update({str(Path(dirpath, d).relative_to(root)) + "/": "dir" for d in dirnames})
    return found


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], names: str, root: Path) -> str:
    """Run argv; assert exit 2, one stderr line naming `names`, nothing printed, and root's bytes unchanged."""
    before = tree(root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("loom: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert names in err and out == "", err
    assert tree(root) == before
    return err


def no_temp_left(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if ".loom-tmp-" in p.name or ".loom-old-" in p.name]
    assert leftovers == []


# ------------------------------------------------------------------------------------------------- the rule


def _sharded_export(out: Path) -> None:
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (out / name).write_bytes(b"an old model's weights")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')


def _training_run(out: Path) -> None:
    (out / "checkpoints" / "step_00000009").mkdir(parents=True)
    (out / "checkpoints" / "step_00000009" / "COMPLETE").write_text('{"step": 9}')
    (out / "checkpoints" / "latest").write_text("step_00000009\n")
    (out / "recipe.yaml").write_text("model: {d_model: 8}\n")


def _a_file(out: Path) -> None:
    out.write_text("notes\n")


OCCUPANTS: dict[str, Callable[[Path], None]] = {
    "sharded_export": _sharded_export,
    "training_run": _training_run,
    "a_file": _a_file,
    "one_hidden_file": lambda out: (out.mkdir(), (out / ".keep").write_text("")),
}


@pytest.mark.parametrize("occupant", OCCUPANTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_an_existing_out_is_refused(
    capsys: pytest.CaptureFixture[str], work: Path, direction: str, occupant: str
) -> None:
    OCCUPANTS[occupant](work / "out")
    err = refused(capsys, [*DIRECTIONS[direction][1], "out"], "OUT = 'out'", work)
    assert "already exists" in err and "--overwrite" in err
    no_temp_left(work)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_overwrite_never_turns_a_file_into_a_folder(
    capsys: pytest.CaptureFixture[str], work: Path, direction: str
) -> None:
    _a_file(work / "out")
    assert "is a file" in refused(capsys, [*DIRECTIONS[direction][1], "out", "--overwrite"], "'out'", work)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_overwrite_replaces_out_whole(capsys: pytest.CaptureFixture[str], work: Path, direction: str) -> None:
    """An old sharded export beside an old training run: none of it survives beside the new output, which is
    exactly what a write into a new folder gives."""
    argv = DIRECTIONS[direction][1]
    assert main([*argv, "fresh"]) == 0
    _sharded_export(work / "out")
    _training_run(work / "out")
    assert main([*argv, "out", "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(tree(work / "out")) == sorted(tree(work / "fresh"))
    if direction in ("from_hf", "from_megatron"):  # the old run is gone, not resumed
        assert (work / "out" / "checkpoints" / "latest").read_text() == "step_00000000\n"
    no_temp_left(work)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_an_empty_out_folder_is_used(work: Path, direction: str) -> None:
    (work / "out").mkdir()
    assert main([*DIRECTIONS[direction][1], "out"]) == 0
    assert any((work / "out").iterdir())
    no_temp_left(work)


def _out_for(relation: str, source: str) -> str:
    if relation == "is":
        return source
    if relation == "inside":
        return f"{source}/sub/out"
    return "."  # holding: the folder around the source


@pytest.mark.parametrize("relation", ["is", "inside", "holding"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_out_that_is_an_input_is_refused_even_with_overwrite(
    capsys: pytest.CaptureFixture[str], work: Path, direction: str, relation: str
) -> None:
    source, argv = DIRECTIONS[direction]
    out = _out_for(relation, source)
    err = refused(capsys, [*argv, out, "--overwrite"], f"OUT = '{out}'", work)
    assert "the input" in err
    assert not (work / source / "sub").exists()


def test_the_tokenizer_and_the_megatron_config_are_inputs(
    capsys: pytest.CaptureFixture[str], work: Path, demo_data: Path
) -> None:
    (work / "tok").mkdir()
    shutil.copyfile(demo_data / "tokenizer.model", work / "tok" / "tokenizer.model")
    argv = ["convert", "ckpt", "--to", "hf", "tok", "--tokenizer", "tok/tokenizer.model", "--overwrite"]
    assert "the input tok/tokenizer.model" in refused(capsys, argv, "OUT = 'tok'", work)
    (work / "cfg").mkdir()
    shutil.move(work / "mega" / "megatron_config.yaml", work / "cfg" / "m.yaml")
    argv = ["convert", "mega", "--from", "megatron", "cfg", "--megatron-config", "cfg/m.yaml", "--overwrite"]
    assert "the input cfg/m.yaml" in refused(capsys, argv, "OUT = 'cfg'", work)


def _fail_writing(monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    """Make the write step of `direction` fail with ENOSPC after it has started writing into its folder."""

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "a shard")

    if direction in ("to_hf", "consolidate"):
        monkeypatch.setattr("framework.convert.hf.weights.save_file", full)
    elif direction == "to_megatron":
        monkeypatch.setattr("framework.convert.megatron.config.write_args", full)
    else:  # the imports write a step-0 checkpoint, then the recipe
        monkeypatch.setattr("framework.config.loader.dump_recipe", full)


@pytest.mark.parametrize("old", [False, True], ids=["new_out", "overwrite_old_out"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_failed_run_leaves_no_out_and_no_temp(
    capsys: pytest.CaptureFixture[str],
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    direction: str,
    old: bool,
) -> None:
    """A write that fails midway: no OUT (nor the parent folders it had to make), no temporary folder; with
    --overwrite, the old OUT is still there whole."""
    out = "out" if old else "new/deeper/out"
    if old:
        _training_run(work / "out")
    _fail_writing(monkeypatch, direction)
    argv = [*DIRECTIONS[direction][1], out] + (["--overwrite"] if old else [])
    refused(capsys, argv, "No space left on device", work)
    assert not (work / "new").exists()
    no_temp_left(work)


def test_a_failed_import_of_a_real_fault_leaves_no_out(
    capsys: pytest.CaptureFixture[str], work: Path
) -> None:
    shard = sorted((work / "hf").glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    refused(capsys, ["convert", "hf", "--from", "hf", "out"], f"'hf/{shard.name}'", work)
    assert not (work / "out").exists()
    no_temp_left(work)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_missing_source_is_one_line(capsys: pytest.CaptureFixture[str], work: Path, direction: str) -> None:
    argv = ["nope" if a == DIRECTIONS[direction][0] else a for a in DIRECTIONS[direction][1]]
    refused(capsys, [*argv, "out"], "'nope'", work)
    assert not (work / "out").exists()


# ------------------------------------------------------------------------------------ a damaged HF folder


def _single_file_hf(work: Path) -> Path:
    from framework.convert.hf.convert import export_checkpoint

    export_checkpoint(work / "ckpt", work / "hf1")
    return work / "hf1"


@pytest.mark.parametrize("size", ["half", "header", "empty"])
def test_a_truncated_safetensors_names_the_file(
    capsys: pytest.CaptureFixture[str], work: Path, size: str
) -> None:
    weights = _single_file_hf(work) / "model.safetensors"
    os.truncate(weights, {"half": weights.stat().st_size // 2, "header": 20, "empty": 0}[size])
    err = refused(capsys, ["convert", "hf1", "--from", "hf", "out"], "'hf1/model.safetensors'", work)
    assert "safetensors" in err and not (work / "out").exists()


@pytest.mark.parametrize(
    "text,rule",
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b"[1, 2]", "a JSON object with a model_type"),
        (b'{"model_type": 3}', "a JSON object with a model_type"),
        (b'{"model_type": "no-such-family"}', "transformers can read"),
    ],
    ids=["cut", "not_utf8", "a_list", "model_type_not_a_string", "unknown_model_type"],
)
def test_a_malformed_config_json_names_it(
    capsys: pytest.CaptureFixture[str], work: Path, text: bytes, rule: str
) -> None:
    (work / "hf" / "config.json").write_bytes(text)
    err = refused(capsys, ["convert", "hf", "--from", "hf", "out"], "'hf/config.json'", work)
    assert rule in err and not (work / "out").exists()


@pytest.mark.parametrize(
    "key,value,rule",
    [
        ("hidden_size", "abc", "expected int, got str"),
        ("num_hidden_layers", 1.5, "expected int, got float"),
        ("vocab_size", None, "expected int, got NoneType"),
        ("max_position_embeddings", 0, "model.max_seq_len = 0"),
    ],
)
def test_a_config_json_field_of_the_wrong_type_names_it(
    capsys: pytest.CaptureFixture[str], work: Path, key: str, value: object, rule: str
) -> None:
    config = json.loads((work / "hf" / "config.json").read_text())
    (work / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
    err = refused(capsys, ["convert", "hf", "--from", "hf", "out"], "config.json", work)
    assert rule in err and not (work / "out").exists()


@pytest.mark.parametrize(
    "text,rule",
    [
        ('{"weight_map": ', "not valid JSON"),
        ('{"weight_map": 3}', "no weight_map object"),
        ('{"weight_map": {"a": "../ckpt/latest"}}', "not in this folder"),
        ('{"weight_map": {"a": "model-00009-of-00009.safetensors"}}', "not in this folder"),
    ],
    ids=["cut", "not_a_map", "outside_the_folder", "missing_file"],
)
def test_a_malformed_safetensors_index_names_it(
    capsys: pytest.CaptureFixture[str], work: Path, text: str, rule: str
) -> None:
    (work / "hf" / "model.safetensors.index.json").write_text(text)
    err = refused(capsys, ["convert", "hf", "--from", "hf", "out"], "'hf/model.safetensors.index.json'", work)
    assert rule in err and not (work / "out").exists()


# -------------------------------------------------------------------------------------------------- pickles


class _System:
    """Pickles as a call of os.system (never unpickled by these tests' code paths)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def _write_common(folder: Path, kind: str) -> None:
    import fractions

    path = folder / "common.pt"
    if kind == "fraction":
        torch.save({"args": fractions.Fraction(1, 3)}, path)
    elif kind == "os_system":
        torch.save({"args": _System()}, path)
    elif kind == "os_system_raw_pickle":
        path.write_bytes(pickle.dumps({"args": _System()}, protocol=2))
    else:
        path.write_bytes(b"PK\x03\x04 not a zip")


@pytest.mark.parametrize(
    "kind,named",
    [
        ("fraction", "fractions.Fraction"),
        ("os_system", "posix.system"),
        ("os_system_raw_pickle", "posix.system"),
        ("garbage", "not a readable torch.save file"),
    ],
)
def test_common_pt_refusal_names_the_global(
    capsys: pytest.CaptureFixture[str], work: Path, kind: str, named: str
) -> None:
    """No megatron_config.yaml: the model arguments would come from common.pt, which is refused, naming the
    global it asked for; code it asks to run is never offered --trust-checkpoint."""
    (work / "mega" / "megatron_config.yaml").unlink()
    _write_common(work / "mega", kind)
    err = refused(capsys, ["convert", "mega", "--from", "megatron", "out"], "'mega/common.pt'", work)
    assert named in err
    assert "weights_only=False" not in err and not (work / "pwned").exists() and not (work / "out").exists()
    if kind.startswith("os_system"):
        assert "run code: do not trust it" in err and "or --trust-checkpoint" not in err


def _hide_a_pickle(step_dir: Path) -> None:
    """Replace the bytes of the largest tensor chunk with a torch.save pickle of an os.system call (same length,
    so the index still matches the file sizes)."""
    from framework.checkpoint.verify import read_dcp_metadata

    info = max(read_dcp_metadata(step_dir).storage_data.values(), key=lambda i: i.length)
    buffer = io.BytesIO()
    torch.save(
        _System(), buffer, _use_new_zipfile_serialization=False
    )  # a legacy pickle: trailing bytes ignored
    payload = buffer.getvalue().ljust(info.length, b"\0")
    shard = step_dir / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = payload
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("direction", [d for d, (source, _) in DIRECTIONS.items() if source != "hf"])
def test_a_pickle_in_a_distcp_shard_is_one_line_without_torch_advice(
    capsys: pytest.CaptureFixture[str], work: Path, direction: str
) -> None:
    source = DIRECTIONS[direction][0]
    _hide_a_pickle(work / "ckpt" / "step_00000000" if source == "ckpt" else work / source)
    err = refused(capsys, [*DIRECTIONS[direction][1], "out"], f"'{source}", work)
    assert "weights_only=False" not in err and not (work / "pwned").exists() and not (work / "out").exists()
    if source == "mega":  # no file hashes in a megatron checkpoint: the pickle itself is what is refused
        assert "holds a pickle referring to posix.system" in err
