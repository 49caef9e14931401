"""torchrun's agent (torch.distributed.run), run by `loom train --nproc N` (launcher/local.py), with one change: a
planned preemption is quiet.

When workers exit non-zero, torchrun raises ChildFailedError and prints it with a traceback ("launcher.cli FAILED
... exitcode 75"). For a preemption that went as planned (every failed worker exited EXIT_PREEMPTED after the
checkpoint was committed) that is noise in every requeued job's log: here it ends the agent with status 75 and
no output; rank 0 already printed the one line ("loom: preempted by SIGUSR1 after step N; checkpoint: ...").
Any other failure is reported exactly as torchrun reports it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args
from torch.distributed.run import run as run_agent

from launcher.exit_codes import EXIT_PREEMPTED


def is_preemption(failed: ChildFailedError) -> bool:
    """Whether every failed worker stopped with EXIT_PREEMPTED (a planned stop, not a crash)."""
    return bool(failed.failures) and all(f.exitcode == EXIT_PREEMPTED for f in failed.failures.values())


@record
def main(argv: Sequence[str]) -> None:
    try:
        run_agent(parse_args(list(argv)))
    except ChildFailedError as failed:
        if is_preemption(failed):
            # SystemExit: `record` passes it on as it is (no error file, no report), and Python prints nothing
            raise SystemExit(EXIT_PREEMPTED) from None
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
