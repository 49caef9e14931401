"""Exit statuses of `loom train` that mean something to a scheduler (see docs/slurm.md)."""

EXIT_PREEMPTED = 75
"""The run was asked to stop (SIGUSR1, e.g. Slurm's warning before a time limit or preemption), saved a complete
checkpoint and exited early: EX_TEMPFAIL from sysexits.h, "try again later". A batch script requeues on it and the
requeued job resumes with `--resume auto`; any other status (0 = finished) never requeues."""
