"""`loom submit / status / logs / cancel`: Slurm jobs rendered from a recipe (see docs/slurm.md).

`render` fills slurm/job.sbatch from the recipe's `launch` section: values that land in `#SBATCH` lines (read by
sbatch, not by a shell) are whole-matched against strict patterns, everything the script's shell reads is
`shlex.quote`d, and control characters are refused everywhere, so no recipe string can inject shell. `submit`
pipes the script to `sbatch --parsable` and records the job in .loom/jobs.json of the working directory, which
`status`, `logs` and `cancel` read.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from framework.config.errors import ConfigError
from framework.config.schema import LaunchConfig, Recipe
from launcher.exit_codes import EXIT_PREEMPTED

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "job.sbatch"
JOBS_FILE = Path(".loom") / "jobs.json"
LOG_NAME = "slurm-%j.out"
"""The job's log inside the run directory (%j: the job id); every attempt of a requeued job appends to it."""

# A path in an `#SBATCH` line: sbatch splits those lines itself, so only characters with no meaning there pass.
_DIRECTIVE_PATH = re.compile(r"[A-Za-z0-9_./+,:@=-]+")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_JOB_ID = re.compile(r"\d+(_\d+)?")


@dataclass(frozen=True)
class Job:
    """A rendered job: the script and where its log will be."""

    script: str
    name: str
    log: Path
    """The log path with %j left in (Slurm fills in the job id)."""


@dataclass(frozen=True)
class JobRecord:
    """One submitted job, as .loom/jobs.json keeps it."""

    job_id: str
    name: str
    recipe: str
    log: str
    submitted: str


def flag_overrides(
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    nproc_per_node: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
) -> list[str]:
    """`loom submit`'s flags as `--set launch.*` overrides (so the job's recipe records them too). Strings go as
    JSON, which YAML reads back as the same string (a bare 4:00:00 would be a number); --gpus-per-node G also
    means G workers per node unless --nproc-per-node says otherwise."""
    if gpus_per_node is not None and nproc_per_node is None:
        nproc_per_node = gpus_per_node
    values = {
        "nnodes": nodes,
        "gpus_per_node": gpus_per_node,
        "nproc_per_node": nproc_per_node,
        "partition": partition,
        "time": time,
        "account": account,
    }
    return [f"launch.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def render(recipe_path: str, overrides: list[str], workdir: Path | None = None) -> Job:
    """The job script for the recipe with `overrides`; ConfigError for anything that cannot run or be quoted."""
    from framework.config.loader import load_recipe
    from framework.parallel.dims import ParallelDims

    workdir = (workdir or Path.cwd()).resolve()
    recipe = load_recipe(recipe_path, overrides)
    launch = recipe.launch
    _check_placement(recipe)
    ParallelDims.from_recipe(recipe, launch.nproc_per_node * launch.nnodes)  # the layout fits the world
    name = launch.job_name or _job_name(recipe_path)
    log = workdir / recipe.logging.run_dir / LOG_NAME
    values = {
        "directives": "\n".join(_directives(launch, name, log, workdir)),
        "environment": "\n".join(f"export {_env_line(i, item)}" for i, item in enumerate(launch.env)),
        "loom": _quote_all([sys.executable, "-m", "launcher.cli"]),
        "recipe": _quote(recipe_path, "recipe"),
        "overrides": _quote_all([a for item in overrides for a in ("--set", item)], "--set"),
        "nproc": str(launch.nproc_per_node),
        "checkpoints": _quote(str(workdir / recipe.checkpoint_root()), "checkpoint.dir"),
        "exit_preempted": str(EXIT_PREEMPTED),
    }
    return Job(script=_fill(TEMPLATE.read_text(), values), name=name, log=log)


def _job_name(recipe_path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(recipe_path).name.removesuffix(".yaml").removesuffix(".yml"))
    return stem or "loom"


def _check_placement(recipe: Recipe) -> None:
    """One worker per GPU, and whole tensor-parallel groups on each node (ranks are node-major, tp innermost)."""
    launch, tp = recipe.launch, recipe.parallel.tp
    if launch.gpus_per_node and launch.nproc_per_node != launch.gpus_per_node:
        raise ConfigError(
            None,
            "launch.nproc_per_node",
            launch.nproc_per_node,
            f"must equal launch.gpus_per_node={launch.gpus_per_node} (one worker per GPU)",
            f"set launch.nproc_per_node: {launch.gpus_per_node}, or leave it to --gpus-per-node",
        )
    if launch.nproc_per_node % tp:
        raise ConfigError(
            None,
            "parallel.tp",
            tp,
            f"must divide launch.nproc_per_node={launch.nproc_per_node}: a tensor-parallel group must stay "
            "inside one node (its collectives run every layer)",
            "use a tp that divides the workers per node, e.g. tp = GPUs per node",
        )


def _directives(launch: LaunchConfig, name: str, log: Path, workdir: Path) -> list[str]:
    """The #SBATCH lines. Names and the time were whole-matched by LaunchConfig.validate; paths are checked here."""
    lines = [f"--job-name={name}", f"--nodes={launch.nnodes}", "--ntasks-per-node=1"]
    if launch.gpus_per_node:
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    lines.append(f"--cpus-per-task={launch.cpus_per_node}" if launch.cpus_per_node else "--exclusive")
    for option in ("partition", "account", "qos"):
        if getattr(launch, option) is not None:
            lines.append(f"--{option}={getattr(launch, option)}")
    lines.append(f"--time={launch.time}")
    if launch.signal_seconds:
        lines.append(f"--signal=USR1@{launch.signal_seconds}")
    lines += ["--requeue", "--open-mode=append"]
    lines.append(f"--output={_directive_path(log, 'logging.run_dir')}")
    lines.append(f"--chdir={_directive_path(workdir, 'working directory')}")
    return [f"#SBATCH {line}" for line in lines]


def _directive_path(path: Path, key: str) -> str:
    text = str(path)
    if not _DIRECTIVE_PATH.fullmatch(text.replace("%j", "")):
        raise ConfigError(
            None,
            key,
            text,
            "cannot go into an #SBATCH line: only letters, digits and _ . / + , : @ = - are allowed there",
            "use a path without spaces, quotes or shell characters",
        )
    return text


def _env_line(index: int, item: str) -> str:
    name, _, value = item.partition("=")  # LaunchConfig.validate checked the name and the form
    return f"{name}={_quote(value, f'launch.env[{index}]')}"


def _quote(value: str, key: str) -> str:
    """One shell word. Control characters (a newline ends a command) are refused rather than quoted."""
    if not value.isprintable():
        raise ConfigError(
            None, key, value, "contains control characters (e.g. a newline)", "remove them from the value"
        )
    return shlex.quote(value)


def _quote_all(values: list[str], key: str = "command") -> str:
    return " ".join(_quote(v, key) for v in values)


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a placeholder without a value (or a value without a placeholder) is a bug."""
    used = set(_PLACEHOLDER.findall(template))
    if used != set(values):
        raise RuntimeError(f"template {TEMPLATE} and renderer disagree: {sorted(used ^ set(values))}")
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return re.sub(r"\n\n\n+", "\n\n", text)  # an empty block (no launch.env) leaves no gap


# -- talking to Slurm -------------------------------------------------------------------------------------------


def slurm_command(name: str) -> str:
    """The path of a Slurm client command; a one-line ConfigError when it is not installed."""
    path = shutil.which(name)
    if path is None:
        raise ConfigError(
            "command line",
            name,
            None,
            f"Slurm's `{name}` is not on PATH (no Slurm client here)",
            "run on a Slurm login node, or install the Slurm client (e.g. apt-get install slurm-client)",
        )
    return path


def _slurm(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([slurm_command(name), *args], capture_output=True, text=True, timeout=60)


def _refused(name: str, done: subprocess.CompletedProcess[str], fix: str) -> ConfigError:
    """Slurm's own message, on one line."""
    message = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
    return ConfigError("command line", name, message, "was refused by Slurm", fix)


def submit(job: Job, recipe_path: str, workdir: Path | None = None) -> JobRecord:
    """Submit a rendered job with sbatch (script on stdin) and record it; returns the record."""
    workdir = (workdir or Path.cwd()).resolve()
    sbatch = slurm_command("sbatch")
    job.log.parent.mkdir(parents=True, exist_ok=True)  # Slurm opens the log before the script runs
    done = subprocess.run(
        [sbatch, "--parsable"], input=job.script, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise _refused(
            "sbatch", done, "check launch.partition/account/qos/time against `sinfo` and `sacctmgr`"
        )
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    record = JobRecord(job_id, job.name, recipe_path, str(job.log).replace("%j", job_id), now)
    _write_records(workdir, [*read_records(workdir), record])
    return record


def read_records(workdir: Path | None = None) -> list[JobRecord]:
    """The jobs submitted from `workdir`, oldest first."""
    from framework.outputs import read_json_file

    path = (workdir or Path.cwd()) / JOBS_FILE
    if not path.is_file():
        return []
    items = read_json_file(path, "the record of submitted jobs")
    try:
        return [JobRecord(**item) for item in items]
    except TypeError:  # not a list of records with exactly JobRecord's fields
        fix = "restore it, or move it away (`loom status` then forgets the jobs in it)"
        raise ConfigError(None, "file", str(path), "is not a list of job records", fix) from None


def _write_records(workdir: Path, records: list[JobRecord]) -> None:
    """.loom/jobs.json through a temp sibling, fsync and rename (framework/outputs.py): a reader, or a crash,
    never sees half a file, and a failed write leaves no temp file behind."""
    from framework.outputs import atomic_file

    with atomic_file(workdir / JOBS_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")


def find_record(job_id: str | None, workdir: Path | None = None) -> JobRecord:
    """The recorded job `job_id`, or the newest one when None; a ConfigError when there is none."""
    records = read_records(workdir)
    if not records:
        raise ConfigError(
            "command line", "job", job_id, "no job was submitted from this directory", "use `loom submit`"
        )
    if job_id is None:
        return records[-1]
    for record in records:
        if record.job_id == job_id:
            return record
    known = ", ".join(r.job_id for r in records[-5:])
    raise ConfigError(
        "command line", "job", job_id, "was not submitted from this directory", f"recent jobs: {known}"
    )


def job_state(job_id: str) -> dict[str, str]:
    """The controller's view of a job (JobState, RunTime, NodeList, Restarts, Reason, ...); {} once forgotten."""
    done = _slurm("scontrol", "-o", "show", "job", job_id)
    if done.returncode != 0:
        return {}
    fields = (item.partition("=") for item in done.stdout.split())
    return {key: value for key, _, value in fields}


def status(workdir: Path | None = None, limit: int = 20) -> str:
    """A table of the newest `limit` recorded jobs with their state now."""
    slurm_command("scontrol")
    records = read_records(workdir)[-limit:]
    if not records:
        return "no jobs submitted from this directory"
    rows = [("JOB", "STATE", "TIME", "RESTARTS", "NODES", "NAME", "LOG")]
    for record in records:
        state = job_state(record.job_id)
        rows.append(
            (
                record.job_id,
                state.get("JobState", "GONE"),  # finished long enough ago for the controller to forget it
                state.get("RunTime", "-"),
                state.get("Restarts", "-"),
                state.get("NodeList", "-"),
                record.name,
                record.log,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]) for row in rows)


def logs(job_id: str | None, workdir: Path | None = None) -> str:
    """The job's log so far (all attempts of a requeued job)."""
    record = find_record(job_id, workdir)
    path = Path(record.log)
    if not path.is_file():
        return f"(no log yet at {path}: the job has not started)"
    return path.read_text(errors="replace")


def cancel(job_id: str | None, workdir: Path | None = None) -> str:
    """scancel the job (the newest recorded one when None)."""
    record = find_record(job_id, workdir)
    if not _JOB_ID.fullmatch(record.job_id):
        raise ConfigError("command line", "job", record.job_id, "is not a Slurm job id", "e.g. 1234")
    done = _slurm("scancel", record.job_id)
    if done.returncode != 0:
        raise _refused("scancel", done, "see `loom status`: the job may have ended already")
    return f"cancelled job {record.job_id} ({record.name})"
