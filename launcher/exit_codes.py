"""Exit statuses of `loom train` that mean something to a scheduler (see docs/slurm.md)."""

EXIT_PREEMPTED = 75
"""The run was asked to stop (SIGUSR1, e.g. Slurm's warning before a time limit or preemption), saved a complete
checkpoint and exited early: EX_TEMPFAIL from sysexits.h, "try again later". A batch script requeues on it and the
requeued job resumes with `--resume auto`; any other status (0 = finished) never requeues."""

PREEMPTION_SUPPORTED = True
"""Workers save on SIGTERM/SIGUSR1 and `loom train` exits EXIT_PREEMPTED, also with several processes (the
launcher recovers the status from <run_dir>/preempted.json; torchrun reports any worker failure as 1)."""
