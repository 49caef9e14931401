"""`loom submit / status / logs / cancel` against a real Slurm cluster (two slurmd nodes on this machine, see
slurm_cluster.py), the rendered script's directives and quoting, and one-line errors without Slurm.

The reference for a Slurm run is a local `loom train --nproc 4` of the same recipe: the same layout (TP2 x DP2) and
ranks, so the same computation. The Slurm tests skip (with the reason) when Slurm is missing and cannot be
installed (not root, no apt-get); on CI (root, apt) they run.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import launcher.exit_codes
from launcher.cli import main, run

# Tests run in importlib mode (no test folder on sys.path): the cluster module lives beside this file.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, slurm_cluster, unavailable_reason  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16

# A tiny decoder (TP2 x DP2 over 2 nodes x 2 processes, fp32, gloo), no validation or TensorBoard: seconds per run.
OVERRIDES = {
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.n_heads": 4,
    "model.kv_heads": 2,
    "model.ffn_hidden": 128,
    "data.seq_len": 32,
    "data.validation": None,
    "train.steps": STEPS,
    "train.global_batch_size": 8,
    "train.micro_batch_size": 2,
    "train.device": "cpu",
    "parallel.tp": 2,
    "logging.tensorboard": False,
    "logging.progress_bar": False,
    "launch.nnodes": 2,
    "launch.nproc_per_node": 2,
    "launch.time": "10:00",
}


def _sets(demo_data: Path, run_dir: Path) -> list[str]:
    paths = {
        "data.tokenizer": demo_data / "tokenizer.model",
        "data.train": demo_data,
        "logging.run_dir": run_dir,
    }
    values = {k: json.dumps(v) for k, v in OVERRIDES.items()} | {k: str(v) for k, v in paths.items()}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _loom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "launcher.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def _cli(cluster: SlurmCluster, workdir: Path, *argv: str) -> tuple[int, str, str]:
    """`loom ARGV` in this process (no interpreter start-up), run from `workdir` against the test cluster;
    (status, stdout, stderr). A job submitted so inherits this environment, SLURM_CONF included."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        patch.chdir(workdir)
        patch.setenv("SLURM_CONF", str(cluster.conf))
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}  # a resumed step overwrites


# -- the cluster and the runs several tests read -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no Slurm cluster: {reason}")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as started:
        yield started


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory jobs are submitted from (its .loom/jobs.json records them)."""
    return tmp_path_factory.mktemp("submit")


def _submit(cluster: SlurmCluster, workdir: Path, demo_data: Path, run_dir: Path) -> str:
    status, out, err = _cli(
        cluster, workdir, "submit", str(ROOT / "recipes/debug.yaml"), *_sets(demo_data, run_dir)
    )
    assert status == 0, err
    match = re.fullmatch(r"submitted job (\d+) \(debug\); log: (\S+)\n", out)
    assert match, out
    assert match.group(2) == str(run_dir / f"slurm-{match.group(1)}.out")
    return match.group(1)


@pytest.fixture(scope="module")
def slurm_run(cluster: SlurmCluster, workdir: Path, demo_data: Path) -> tuple[str, Path]:
    """One uninterrupted 2-node job: (job id, run directory)."""
    run_dir = workdir / "run-slurm"
    job_id = _submit(cluster, workdir, demo_data, run_dir)
    assert cluster.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240) == "COMPLETED", (
        run_dir / f"slurm-{job_id}.out"
    ).read_text()[-3000:]
    return job_id, run_dir


# -- (a) 2 nodes x 2 processes, TP2 x DP2 ------------------------------------------------------------------------


def test_two_node_job_trains_like_a_local_four_process_run(
    slurm_run: tuple[str, Path], demo_data: Path, tmp_path: Path
) -> None:
    job_id, run_dir = slurm_run
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "rendezvous 127.0.0.1:" in log  # the first node's NodeAddr: node names do not resolve here
    assert "loom: training exited with status 0" in log and "requeueing" not in log
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()

    # Placement: every tensor-parallel group (ranks sharing all coordinates but tp) sits on one node.
    node_map = re.search(r"\[rank 0\] INFO framework\.run: node map: (.*)", log).group(1)
    node_of = {
        int(rank): node
        for node, ranks in re.findall(r"(\S+) \[([\d, ]+)\]", node_map)
        for rank in ranks.split(", ")
    }
    assert sorted(node_of) == [0, 1, 2, 3] and set(node_of.values()) == {"node1", "node2"}
    coords = dict(
        re.findall(r"layout: world 4 = dp_shard 2 x tp 2 \(fsdp\); rank (\d): (dp_shard \d) tp \d", log)
    )
    groups: dict[str, set[str]] = {}
    for rank, dp in coords.items():
        groups.setdefault(dp, set()).add(node_of[int(rank)])
    assert len(coords) == 4 and len(groups) == 2 and all(len(nodes) == 1 for nodes in groups.values())

    # The same recipe run locally with 4 processes: the same losses, bit for bit (fp32, same ranks and layout).
    local_dir = tmp_path / "run-local"
    done = _loom(
        "train", str(ROOT / "recipes/debug.yaml"), "--nproc", "4", *_sets(demo_data, local_dir), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    slurm_losses, local_losses = _train_losses(run_dir), _train_losses(local_dir)
    assert sorted(slurm_losses) == list(range(1, STEPS + 1))
    assert slurm_losses == local_losses


# -- (b) preempted from outside: save, requeue, resume, same result ---------------------------------------------


@pytest.mark.skipif(
    not getattr(launcher.exit_codes, "PREEMPTION_SUPPORTED", False),
    reason="multi-process checkpoints + SIGUSR1 -> exit 75 not landed yet (launcher.exit_codes.PREEMPTION_SUPPORTED)",
)
def test_preempted_job_requeues_resumes_and_matches(
    cluster: SlurmCluster, workdir: Path, demo_data: Path, slurm_run: tuple[str, Path]
) -> None:
    run_dir = workdir / "run-preempted"
    job_id = _submit(cluster, workdir, demo_data, run_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # training is under way
        assert time.monotonic() < deadline and cluster.job_state(job_id) in ("PENDING", "RUNNING")
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", job_id)
    assert cluster.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED"), 240) == "COMPLETED"

    log = (run_dir / f"slurm-{job_id}.out").read_text()
    saved = re.search(r"loom: preempted; checkpoint \S+/(step_(\d+)) is complete: requeueing job", log)
    assert saved, log[-3000:]
    assert 2 <= int(saved.group(2)) < STEPS  # stopped mid-run
    assert f"resumed from {run_dir / 'checkpoints' / saved.group(1)}" in log
    assert f"loom: job {job_id} (restart 1)" in log
    # an expected preemption is one line, not torchrun's ChildFailedError report (issue 18)
    assert "Traceback" not in log and "ChildFailedError" not in log and "FAILED" not in log, log[-3000:]
    assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id).stdout
    losses, reference = _train_losses(run_dir), _train_losses(slurm_run[1])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference  # every step, the resumed ones included, bit for bit; so the final loss too


# -- (d) status, logs and cancel from the submitting directory --------------------------------------------------


def test_status_logs_and_cancel(
    cluster: SlurmCluster, workdir: Path, demo_data: Path, slurm_run: tuple
) -> None:
    job_id, run_dir = slurm_run
    status, out, err = _cli(cluster, workdir, "status")
    assert status == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith(f"{job_id} "))
    assert row[1] == "COMPLETED" and row[-1] == str(run_dir / f"slurm-{job_id}.out")

    status, out, _ = _cli(cluster, workdir, "logs", job_id)
    assert status == 0 and out == (run_dir / f"slurm-{job_id}.out").read_text()
    assert "node map: node1 [0, 1]; node2 [2, 3]" in out

    other = _submit(cluster, workdir, demo_data, workdir / "run-cancelled")
    status, out, err = _cli(cluster, workdir, "cancel")  # no JOB: the newest submitted from here
    assert status == 0 and out == f"cancelled job {other} (debug)\n", err
    assert cluster.wait_job(other, ("CANCELLED",), 60) == "CANCELLED"

    status, out, err = _cli(cluster, workdir, "logs", "999999")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "job = '999999': was not submitted from this directory" in err


def test_a_job_slurm_refuses_is_one_line(cluster: SlurmCluster, workdir: Path, demo_data: Path) -> None:
    sets = [*_sets(demo_data, workdir / "run-refused"), "--partition", "nosuch"]
    status, out, err = _cli(cluster, workdir, "submit", str(ROOT / "recipes/debug.yaml"), *sets)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert "sbatch = " in err and "invalid partition" in err.lower() and "was refused by Slurm" in err


# -- (c) the rendered script: directives and quoting (no cluster needed) ----------------------------------------


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert run(["submit", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_of_a_four_node_gpu_job_has_the_directives(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00"]
    script = _dry_run(capsys, "recipes/llama-8b.yaml", *flags, "--account", "proj1", "--set", "parallel.tp=8")
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=llama-8b",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={ROOT}/runs/llama-8b/slurm-%j.out",
        f"#SBATCH --chdir={ROOT}",
    ]
    assert "nproc=8\n" in script and f"checkpoints={ROOT}/runs/llama-8b/checkpoints\n" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


# Stand-ins for srun and scontrol, so the script's own logic runs in bash without a cluster: srun prints its
# arguments and exits with $FAKE_STATUS; scontrol knows one node (NodeAddr 10.1.2.3) and logs requeues.
FAKE_SLURM = """
srun() { printf '%s\\n' "$@" > srun.args; return "$FAKE_STATUS"; }
scontrol() {
  case "$1 $2" in
    "show hostnames") echo node7; echo node8 ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=$3" ;;
    "requeue "*) echo "$2" >> requeued ;;
  esac
}
"""


@pytest.mark.parametrize(
    ("status", "latest", "marker", "requeued"),
    [
        (75, "step_00000003", True, True),  # preempted with a committed checkpoint: the only requeue
        (75, "step_00000003", False, False),  # no COMPLETE marker: an interrupted save
        (75, None, False, False),  # no checkpoint at all
        (0, "step_00000003", True, False),  # finished: never requeued
        (1, "step_00000003", True, False),  # failed
    ],
)
def test_requeue_only_on_status_75_with_a_complete_checkpoint(
    status: int,
    latest: str | None,
    marker: bool,
    requeued: bool,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "ck"
    (checkpoints / "step_00000003").mkdir(parents=True)
    if latest is not None:
        (checkpoints / "latest").write_text(latest + "\n")
    if marker:
        (checkpoints / "step_00000003" / "COMPLETE").write_text("{}")
    layout = [
        "--set",
        "parallel.tp=2",
        "--set",
        "train.micro_batch_size=8",
        "--nodes",
        "2",
        "--nproc-per-node",
        "2",
    ]
    script = _dry_run(capsys, "recipes/debug.yaml", *layout, "--set", f"checkpoint.dir={checkpoints}")
    env = {
        "PATH": "/usr/bin:/bin",
        "FAKE_STATUS": str(status),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "x",
    }
    env |= {"SLURM_JOB_NUM_NODES": "2"}
    done = subprocess.run(
        ["bash", "-c", FAKE_SLURM + script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == (0 if requeued else status), done.stderr
    assert (tmp_path / "requeued").is_file() == requeued
    if requeued:
        assert (tmp_path / "requeued").read_text() == "4242\n"
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[args.index("--master") + 1] == f"10.1.2.3:{20000 + 4242}"  # node7's NodeAddr, not its name
    assert args[args.index("--resume") + 1] == "auto" and args[args.index("--nproc") + 1] == "2"


HOSTILE = '$(touch pwned); `touch pwned`; echo "it\'s" > pwned & $HOME \\ *'


def test_hostile_strings_are_quoted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Every shell value of the script, evaluated by bash, is exactly the string given and runs nothing."""
    recipe = tmp_path / "r'$(touch pwned);x.yaml"
    recipe.write_text((ROOT / "recipes/debug.yaml").read_text())
    sets = [f"data.tokenizer={json.dumps(HOSTILE)}", f"launch.env={json.dumps(['HOSTILE=' + HOSTILE])}"]
    script = _dry_run(capsys, str(recipe), *(a for s in sets for a in ("--set", s)))
    assert "#SBATCH --job-name=r___touch_pwned__x" in script
    # Run only the assignments (up to `preempted=`), then print what bash made of them.
    head = script[: script.index("\npreempted=")]
    probe = head + '\nprintf "%s\\n" "$HOSTILE" "$recipe" "${overrides[@]}"\n'
    done = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [HOSTILE, str(recipe), *(a for s in sets for a in ("--set", s))]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("launch.partition=gpu;reboot", "launch.partition = 'gpu;reboot': must be a Slurm name"),
        ("launch.account=$(id)", "launch.account = '$(id)': must be a Slurm name"),
        ('launch.job_name="a b"', "launch.job_name = 'a b': must be a Slurm name"),
        ('launch.time="1:00; reboot"', "launch.time = '1:00; reboot': is not a Slurm time limit"),
        ('launch.time="1"', "must be longer than launch.signal_seconds=120"),
        ('launch.env=["X=a\\nreboot"]', "launch.env[0] = 'X=a\\nreboot': must be NAME=VALUE"),
        ('launch.env=["X;reboot=1"]', "launch.env[0] = 'X;reboot=1': must be NAME=VALUE"),
        ("data.tokenizer=a\nreboot", "--set = 'data.tokenizer=a\\nreboot': contains control characters"),
        ('logging.run_dir="runs/a b"', "cannot go into an #SBATCH line"),
        ("logging.run_dir=runs/a'b", "cannot go into an #SBATCH line"),
        ("launch.nproc_per_node=3", "parallel.tp = 2: must divide launch.nproc_per_node=3"),
        ("launch.gpus_per_node=4", "launch.nproc_per_node = 2: must equal launch.gpus_per_node=4"),
    ],
)
def test_hostile_or_impossible_values_are_one_line_errors(
    override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = [
        "--set",
        "parallel.tp=2",
        "--set",
        "launch.nproc_per_node=2",
        "--set",
        "train.micro_batch_size=8",
    ]
    assert main(["submit", "recipes/debug.yaml", *layout, "--set", override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_missing_slurm_commands_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "")
    recipe = str(ROOT / "recipes/debug.yaml")
    for argv, command in (([*("submit", recipe)], "sbatch"), (["status"], "scontrol")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"Slurm's `{command}` is not on PATH" in err, err
    assert not (tmp_path / ".loom").exists()  # nothing recorded


@pytest.mark.parametrize(
    ("written", "directive"),
    [
        (
            "3:00",
            "3:00",
        ),  # YAML 1.1 would make it the int 180; Loom's loader keeps the text, as Slurm reads it
        ("1:30:00", "1:30:00"),  # (YAML 1.1: 5400)
        ("04:00:00", "04:00:00"),
        ("2-00:00:00", "2-00:00:00"),
        ("25:00:00", "25:00:00"),  # (YAML 1.1: 90000)
        ("30", "30"),  # a bare number: Slurm's 30 minutes
        ('"30"', "30"),
    ],
)
def test_launch_time_in_any_form_yaml_gives_it(written, directive, tmp_path, capsys) -> None:
    """Slurm's time forms as written, in a recipe and in --set: no base-60 reading of unquoted 3:00."""
    recipe = tmp_path / "job.yaml"
    recipe.write_text(f"base: {ROOT / 'recipes/debug.yaml'}\nlaunch:\n  time: {written}\n")
    for argv in (
        ["submit", str(recipe)],
        ["submit", "recipes/debug.yaml", "--set", f"launch.time={written}"],
    ):
        assert main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
        assert f"#SBATCH --time={directive}\n" in capsys.readouterr().out


def test_a_time_below_the_warning_is_one_line(capsys) -> None:
    """`time: 1:30` is 1 min 30 s to Slurm: not longer than the 120-s save-and-requeue warning."""
    assert main(["submit", "recipes/debug.yaml", "--set", "launch.time=1:30", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "launch.time = '1:30'" in err and "signal_seconds=120" in err, err


def test_the_job_record_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys) -> None:
    from launcher.slurm import JOBS_FILE, JobRecord, _write_records, read_records

    first = JobRecord("1", "a", "a.yaml", "runs/a/slurm-1.out", "2024-01-01T00:00:00+00:00")
    _write_records(tmp_path, [first])
    before = (tmp_path / JOBS_FILE).read_bytes()
    broken = JobRecord("2", "b", "b.yaml", object(), "now")  # type: ignore[arg-type]  # not JSON: the write fails
    with pytest.raises(TypeError):
        _write_records(tmp_path, [first, broken])
    assert (tmp_path / JOBS_FILE).read_bytes() == before and read_records(tmp_path) == [first]
    assert sorted(p.name for p in (tmp_path / ".loom").iterdir()) == ["jobs.json"]  # no temp file left
    monkeypatch.chdir(tmp_path)
    for garbage in ("{not json", '[{"job": 1}]'):
        (tmp_path / JOBS_FILE).write_text(garbage)
        assert main(["logs"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "jobs.json" in err and "Traceback" not in err, err
