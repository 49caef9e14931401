"""A real two-node Slurm cluster on this machine, for tests: Debian's slurmctld, two slurmd daemons (node1,
node2; one host, MULTIPLE_SLURMD) and a private munged, all configured, logging and keeping state in one temp dir.

Nothing system-wide is used but the installed packages: munged gets its own key and socket (slurm.conf points
AuthInfo at it), each daemon its own port, so a system munge or Slurm (if any) is left alone. The daemons run in the
foreground as our children and `stop` cancels every job, then ends them; it runs even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged")
NODES = ("node1", "node2")


def unavailable_reason() -> str | None:
    """Why a real cluster cannot run here (None: it can, installing the packages with apt-get if missing)."""
    if os.geteuid() != 0:
        return "the test cluster runs slurmctld/slurmd (SlurmUser=root) and installs packages: needs root"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable"
    done = _apt_install()
    if done.returncode != 0:  # stale or missing package lists: refresh them once
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        done = _apt_install()
    if done.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}"
    return None


def _apt_install() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", *PACKAGES]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """slurmctld + slurmd node1/node2 + munged under `root`. `env` is the environment for Slurm commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        for sub in ("state", "log", "spool/node1", "spool/node2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(self._slurm_conf())
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], node)
        self._wait_idle()

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.socket = self.root / "munge.socket"
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            "munged",
        )
        _wait_for(lambda: self.socket.exists(), 10, "munged did not create its socket")

    def _slurm_conf(self) -> str:
        host, r = socket.gethostname(), self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count()}"
            f" State=UNKNOWN"
            for n in NODES
        )
        # A requeued job waits cred_expire (default 120 s) before it is eligible and then for the scheduler's next
        # periodic pass (sched_interval, default 60 s): 5 s and 1 s keep the requeue test short.
        return f"""\
ClusterName=loomtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, command: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 -- the daemon keeps it open
        self._daemons.append(
            subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        )

    def _wait_idle(self) -> None:
        def idle() -> bool:
            done = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NODES)

        _wait_for(idle, 60, f"nodes not idle; see {self.root / 'log'}")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        return done

    def job_state(self, job_id: str) -> str:
        """The job's state as the controller sees it (PENDING, RUNNING, COMPLETED, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return out.split("JobState=", 1)[1].split()[0]

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """Wait until the job is in one of `states`; returns that state."""
        seen = []

        def reached() -> bool:
            seen.append(self.job_state(job_id))
            return seen[-1] in states

        _wait_for(reached, timeout, lambda: f"job {job_id} still {seen[-1]} (wanted {states})")
        return seen[-1]

    def stop(self) -> None:
        """Cancel every job, wait for them to leave the nodes, then end the daemons (each by its own pid)."""
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--partition=debug", check=False)
            _wait_for(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 40, "jobs linger")
        for daemon in reversed(self._daemons):
            daemon.terminate()
        for daemon in reversed(self._daemons):
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _wait_for(ok: object, timeout: float, message: object) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(message() if callable(message) else message)
        time.sleep(0.2)


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    """A started cluster under `root`, stopped on exit (also when starting it or a test fails)."""
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
