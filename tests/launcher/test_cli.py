"""The CLI in-process: user mistakes are one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import EXIT_USER_ERROR, main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check", str(RECIPES / "debug.yaml"), "--set", "model.n_layer=2"], "did you mean 'n_layers'"),
        (["check", str(RECIPES / "debug.yaml"), "--set", "model.n_layers"], "section.key=value"),
        (["check", "no/such/recipe.yaml"], "file not found"),
        (["frobnicate"], "invalid choice"),
        (["train"], "required"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("loom: error: ")
    assert "Traceback" not in err and out == ""


def test_check_prints_resolved_recipe_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", str(RECIPES / "llama-1b.yaml"), "--set", "model.n_layers=2")
    assert code == 0, err
    assert "# resolved recipe" in out and "n_layers: 2" in out
    assert "parameters: total" in out and "FLOPs per token" in out and "memory per rank" in out


def test_check_reports_total_and_active_parameters_of_moe(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", str(RECIPES / "mixtral-8x7b.yaml"))
    assert code == 0, err
    assert "parameters: total 46,702,792,704" in out and "active 12,879,925,248" in out
    assert "moe: 32 of 32 layers, 8 experts (top-2" in out and "with active experts only" in out


def test_missing_tokenizer_is_a_user_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["train", str(RECIPES / "debug.yaml"), "--set", f"data.tokenizer={tmp_path / 'absent.model'}"]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR and "data.tokenizer" in err and err.count("\n") == 1


def test_missing_train_file_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    argv = ["train", str(RECIPES / "debug.yaml"), "--set", f"data.tokenizer={demo_data / 'tokenizer.model'}"]
    argv += ["--set", f"data.train={tmp_path / 'absent.bin'}"]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USER_ERROR and "data.train" in err and err.count("\n") == 1


DEBUG = str(RECIPES / "debug.yaml")
NODES = ["--nnodes", "2", "--node-rank", "0", "--master", "127.0.0.1:29500"]


def _with(flag: str, value: str) -> list[str]:
    """NODES with one flag's value replaced."""
    out = list(NODES)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize(
    ("launch_args", "expected"),
    [
        (["--nproc", "1", "--nnodes", "2"], "--nnodes = 2: needs --node-rank, --master as well"),
        (["--nproc", "1", "--master", "h:1", "--node-rank", "0"], "needs --nnodes as well"),
        (NODES, "--nproc = None: is required with --nnodes"),
        (["--nproc", "0"], "--nproc = 0: must be >= 1"),
        (["--nproc", "1", *_with("--node-rank", "2")], "--node-rank = 2: must be in 0..1 with --nnodes 2"),
        (["--nproc", "1", *_with("--node-rank", "-1")], "--node-rank = -1: must be in 0..1"),
        (["--nproc", "1", *_with("--nnodes", "0")], "--nnodes = 0: must be >= 1"),
        (["--nproc", "1", *_with("--master", "127.0.0.1")], "must be ADDR:PORT"),
        (["--nproc", "1", *_with("--master", ":29500")], "must be ADDR:PORT"),
        (["--nproc", "1", *_with("--master", "host:http")], "must be ADDR:PORT"),
        (["--nproc", "1", *_with("--master", "host:0")], "port must be in 1..65535"),
        (["--nproc", "1", *_with("--master", "host:65536")], "port must be in 1..65535"),
        (["--nproc", "1", *_with("--nnodes", "two")], "invalid int value"),
        # the layout is checked for the whole world (3 x 1 processes) before any worker starts
        (["--nproc", "3", "--nnodes", "1", "--node-rank", "0", "--master", "h:1"], "global_batch_size"),
    ],
)
def test_launch_mistakes_are_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, launch_args: list[str], expected: str
) -> None:
    import launcher.local

    monkeypatch.setattr(launcher.local, "launch", _refuse_launch)
    code, out, err = run(capsys, "train", DEBUG, *launch_args)
    assert code == EXIT_USER_ERROR, err
    assert expected in err, err
    assert err.count("\n") == 1 and err.startswith("loom: error: ") and out == ""


def _refuse_launch(*args: object) -> int:
    raise AssertionError(f"launched despite a mistake: {args}")


def test_multi_node_launch_runs_torchrun_with_a_static_rendezvous(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import launcher.local

    calls = []
    monkeypatch.setattr(launcher.local, "launch", lambda *args, **kw: calls.append(args) or 0)
    # --npr: an abbreviation argparse accepts; the workers' command line must not carry it (they would launch too)
    sets = ["--set", "train.micro_batch_size=4"]  # 16 = 4 ranks (2 nodes x 2) x 4
    argv = ["train", DEBUG, *sets, "--npr", "2", "--nnodes", "2", "--node-rank", "1"]
    code, _, err = run(capsys, *argv, "--master", "[::1]:29501", "--resume", "auto")
    assert code == 0, err
    ((nproc, worker_args, nodes),) = calls
    assert nproc == 2 and nodes == launcher.local.Nodes(nnodes=2, node_rank=1, addr="::1", port=29501)
    assert worker_args == ["train", DEBUG, *sets, "--resume", "auto"]
    command = launcher.local.torchrun_command(nproc, worker_args, nodes)
    assert "--standalone" not in command
    flags = ["--nnodes=2", "--node-rank=1", "--master-addr=::1", "--master-port=29501", "--nproc-per-node=2"]
    assert command[command.index("torch.distributed.run") + 1 : command.index("launcher.cli") - 1] == flags
    assert command[command.index("launcher.cli") + 1 :] == worker_args


def test_one_machine_launch_keeps_its_private_rendezvous() -> None:
    from launcher.local import torchrun_command

    command = torchrun_command(2, ["train", DEBUG])
    assert "--standalone" in command and not any(c.startswith("--master") for c in command)


# ------------------------------------------------------------------------- recipe mistakes, one line each
def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


BAD_RECIPES = [
    ("optim:\n  lr: .inf\n", "optim.lr", "finite"),
    ("optim:\n  lr: .nan\n", "optim.lr", "finite"),
    ("model:\n  norm_eps: -.inf\n", "model.norm_eps", "finite"),
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "optim.lr", "lines 2 and 3"),
    ("train:\n  steps: 1e30\n", "train.steps", "whole number"),
    ("train:\n  steps: 1099511627777\n", "train.steps", "at most"),
    ("", "recipe", "is empty"),
    ("# nothing\n", "recipe", "is empty"),
    ("null\n", "recipe", "is empty"),
    ("[model, train]\n", "recipe", "mapping"),
    (b"train:\n  steps: 3 # \xe9t\xe9\n", "recipe", "not UTF-8"),
]


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize(("text", "key", "expected"), BAD_RECIPES)
def test_recipe_mistakes_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: str,
    text: str | bytes,
    key: str,
    expected: str,
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = _tree_hashes(tmp_path)
    code, out, err = run(capsys, command, str(recipe), "--set", f"logging.run_dir={tmp_path / 'run'}")
    assert code == EXIT_USER_ERROR, err
    assert err.startswith(f"loom: error: {recipe}") and f" {key} = " in err and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert _tree_hashes(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "key", "expected"),
    [
        (["optim.lr=.nan"], "optim.lr", "finite"),
        (["optim.betas=[0.9, .inf]"], "optim.betas[1]", "finite"),
        (["train.steps=1.0e+30"], "train.steps", "whole number"),
        (["model.n_layers=3000000000"], "model.n_layers", "at most 10,000"),
        (["model.d_model=100000000000000000000000"], "model.d_model", "64-bit"),
        (["model.vocab_size=4000000000"], "model.vocab_size", "at most"),
    ],
)
@pytest.mark.parametrize("command", ["check", "train"])
def test_override_mistakes_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: str,
    overrides: list[str],
    key: str,
    expected: str,
) -> None:
    sets = [a for o in [*overrides, f"logging.run_dir={tmp_path / 'run'}"] for a in ("--set", o)]
    code, out, err = run(capsys, command, DEBUG, *sets)
    assert code == EXIT_USER_ERROR, err
    assert err.startswith(f"loom: error: --set: {key} = ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sizes",
    [
        ["model.d_model=1048576", "model.n_heads=1", "model.kv_heads=1"],  # 16T parameters: 25.6 TB of fp32
        ["model.vocab_size=16000000"],
        ["model.n_layers=10000", "model.ffn_hidden=1000000"],
    ],
)
def test_train_refuses_a_model_that_cannot_fit_before_allocating(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sizes: list[str]
) -> None:
    sets = [a for o in [*sizes, f"logging.run_dir={tmp_path / 'run'}"] for a in ("--set", o)]
    code, out, err = run(capsys, "train", DEBUG, *sets)
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("loom: error: model = ") and "parameters" in err and "RAM" in err and "GiB" in err
    assert "smaller model" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    # `loom check` of the same recipe reports, rather than refuses: a cluster's recipe is checked elsewhere
    code, out, err = run(capsys, "check", DEBUG, *sets)
    assert code == 0, err
    assert "memory fit on this machine's RAM: DOES NOT FIT" in out


def test_check_reports_that_a_small_model_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", DEBUG, "--set", "train.device=cpu")
    assert code == 0, err
    assert "memory fit on this machine's RAM: fits (needs " in out


def test_a_huge_layer_count_is_refused_promptly_not_hung(tmp_path: Path) -> None:
    # It used to hang (counting parameters layer by layer): run it where a hang can be cut off and shown.
    code = (
        "import faulthandler, sys; faulthandler.dump_traceback_later(50, exit=True)\n"
        "from launcher.cli import main\n"
        f"sys.exit(main(['check', {DEBUG!r}, '--set', 'model.n_layers=3000000000']))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stderr.startswith("loom: error: --set: model.n_layers = 3000000000: must be at most")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
