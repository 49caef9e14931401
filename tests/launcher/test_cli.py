"""The CLI in-process: user mistakes are one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

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
