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
