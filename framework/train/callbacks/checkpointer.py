"""Saves checkpoints every checkpoint.every steps, at the end and on preemption; resumes from one at fit start.

One process or many: every rank saves its own shards of the model and optimizer (DTensors under FSDP2/TP/EP,
each pipeline stage its own layers) into one checkpoint, under the parameter names of the single-process model,
so any later layout can load it (DCP reshards on load). Rank 0 writes the shared JSON (step, tokens, recipe, layout,
data position, callback state); every rank writes its own RNG state. See framework/checkpoint/writer.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from framework.checkpoint import (
    complete_checkpoints,
    get_rng_state,
    load_checkpoint,
    remove_stale_temps,
    resolve_checkpoint,
    set_rng_state,
)
from framework.checkpoint.io import META
from framework.checkpoint.verify import check_compatible, read_dcp_metadata, read_meta_json, verify_checkpoint
from framework.checkpoint.writer import CheckpointWriter, rank_file
from framework.config import ConfigError, Recipe
from framework.config.loader import recipe_to_dict
from framework.models import build_model
from framework.train.callbacks.base import Callback
from framework.train.callbacks.preemption import (
    Preempted,
    PreemptionSignal,
    clear_record,
    write_record,
)
from framework.train.callbacks.stability import TrainingHalted
from framework.train.resume_check import FINGERPRINT, check_same_data, data_fingerprint

SKIPPED_DATA = "skipped_data.jsonl"
"""One JSON line per loss-spike rewind: the spiking step, the checkpoint gone back to, the skipped [start, end)."""


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line durably (a crash leaves whole lines: the file is read line by line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


if TYPE_CHECKING:
    from framework.train.trainer import Trainer

log = logging.getLogger(__name__)
_OPTIMIZER_STATE = re.compile(r"^optimizer/state/(.+)/([^/]+)$")


class Checkpointer(Callback):
    """Checkpoints under checkpoint.dir (default <logging.run_dir>/checkpoints).

    `resume`: a step directory or checkpoint root to load at fit start; "auto" = the newest complete checkpoint
    that verifies (incomplete or damaged ones are skipped with a warning), or a fresh start when there is none;
    None = start fresh. A checkpoint holds the train module's state, the data position, the callbacks' state and
    every rank's RNG state, so the resumed run continues exactly as the uninterrupted one would.
    `layout`: the parallel sizes of this run (recorded; RNG states are restored only on the same layout).
    `accept_data_change`: let a resume change a field that decides what data comes next (DATA_FIELDS), which is
    refused otherwise (`loom train --accept-data-change`, docs/checkpoints.md).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        resume: str | Path | None = None,
        rank: int = 0,
        distributed: bool = False,
        layout: dict[str, int] | None = None,
        accept_data_change: bool = False,
    ) -> None:
        self.recipe = recipe
        self.accept_data_change = accept_data_change
        self._hashed: Path | None = None  # the checkpoint --resume auto verified with hashes (rank 0)
        self._fingerprint = data_fingerprint(
            recipe.data.train
        )  # the dataset, wherever it lies (resume_check)
        self.cfg = recipe.checkpoint
        self.root = recipe.checkpoint_root()
        self.resume = resume
        self.rank = rank
        self.distributed = distributed
        self.layout = layout or {"world_size": 1}
        self.writer: CheckpointWriter | None = None
        self.signal = PreemptionSignal(distributed)
        self._last_saved: int | None = None
        self._trainer: Trainer | None = None
        self._started: dict[int, float] = {}  # checkpoint step -> when its save began (for checkpoints.jsonl)
        self._resumed: Path | None = None
        self._rewinds = 0  # loss-spike rewinds so far in this run (train.max_rewinds)

    @property
    def last_checkpoint(self) -> Path | None:
        """Rank 0: the newest committed checkpoint of this run, the last one this launch committed, else the one
        it resumed from; None when there is none. Committed means complete on disk once fit returns (or raised
        Preempted): on_fit_end and a preemption wait for the save in flight."""
        committed = self.writer.last_committed if self.writer is not None else None
        return committed or self._resumed

    # -- hooks ---------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.rank == 0:
            remove_stale_temps(self.root)  # leftovers of a crashed save; none can be in flight now
            clear_record(self.recipe.logging.run_dir)
        self._barrier()  # nobody writes into a temp directory rank 0 is still deleting
        self.writer = CheckpointWriter(
            self.root,
            rank=self.rank,
            distributed=self.distributed,
            async_save=self.cfg.async_save,
            keep_last=self.cfg.keep_last,
            keep_every=self.cfg.keep_every,
        )
        self.writer.on_commit = self._log_commit
        self._trainer = trainer
        self.signal.device = trainer.train_module.device
        self.signal.install()
        path = self._resume_path()
        if path is not None:
            self.load(trainer, path)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.rewind_request is not None:
            self.rewind(trainer, metrics)
            return
        signum = self.signal.agreed()
        if signum and trainer.step < self.recipe.train.steps:  # a finished run is finished, not preempted
            self._preempt(trainer, signum)
        if self.cfg.every and trainer.step % self.cfg.every == 0:
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.cfg.save_final and self._last_saved != trainer.step:
            self.save(trainer)
        self._wait()

    def on_close(self, trainer: Trainer) -> None:
        self.signal.uninstall()
        if self.writer is not None:
            try:
                self.writer.close()  # an in-flight save of good state still commits after a failure
            except Exception as error:  # noqa: BLE001 - do not mask the error that ended the run
                log.warning("the checkpoint in flight when the run ended was not committed: %s", error)

    # -- loss-spike rewind (train.spike_policy: rewind) ------------------------------------------------------

    def rewind(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Go back to the newest good checkpoint in these processes and step over the global samples consumed from
        its data position to the end of the spiking step, plus train.spike_skip_samples. Recorded in
        <run_dir>/skipped_data.jsonl and, through the data state, in every later checkpoint."""
        reason, trainer.rewind_request = trainer.rewind_request, None
        # counted here, not in a callback's checkpointed state: a rewind restores those
        self._rewinds += 1
        if self._rewinds > self.recipe.train.max_rewinds:
            self._halt_after_rewinds(trainer, reason, metrics)
        self._wait()  # a save in flight commits first: it may be the one to go back to
        path = self._newest_good()
        end = trainer.data_position()
        if path is None or end is None:
            log.warning(
                "loss spike at step %d: no checkpoint to rewind to; the update was skipped", trainer.step
            )
            return
        spike_step = metrics.get("step", trainer.step)
        self.load(trainer, path)
        start = trainer.data_position()
        assert start is not None
        stop = end + self.recipe.train.spike_skip_samples
        trainer.skip_data(start, stop)
        record = {"spike_step": spike_step, "reason": reason, "rewound_to_step": trainer.step,
                  "checkpoint": str(path), "samples": [start, stop], "time": time.time()}  # fmt: skip
        if self.rank == 0:
            _append_line(Path(self.recipe.logging.run_dir) / SKIPPED_DATA, record)
        log.warning("loss spike at step %d (%s): rewound to %s, skipping samples [%d, %d)", spike_step, reason,
                    path.name, start, stop)  # fmt: skip

    def _halt_after_rewinds(self, trainer: Trainer, reason: str | None, metrics: dict[str, Any]) -> None:
        limit = self.recipe.train.max_rewinds
        why = f"{reason}, after {limit} rewinds (train.max_rewinds): skipping data did not stop the spikes"
        stability = next((cb for cb in trainer.callbacks if hasattr(cb, "halt")), None)
        if stability is None:
            raise TrainingHalted(f"training halted at step {trainer.step}: {why}")
        stability.halt(trainer, why, current=metrics)  # writes the diagnostics file, raises TrainingHalted

    # -- save / load ---------------------------------------------------------------------------------------

    def save(self, trainer: Trainer) -> float:
        """Save this step (async per checkpoint.async_save); returns the seconds training stalled for it."""
        module = trainer.train_module
        metadata = {
            "tokens": module.tokens,
            "recipe": recipe_to_dict(self.recipe),
            "layout": self.layout,
            "data_state": trainer.data_state(),
            FINGERPRINT: self._fingerprint,
            "callbacks": trainer.callback_states(),
        }
        rank_state = {"rank": self.rank, "layout": self.layout, "rng": get_rng_state(module.device)}
        if self.writer is None:
            raise RuntimeError("Checkpointer.save() before on_fit_start")
        self._started[module.step] = time.perf_counter()
        engine_files = getattr(module, "save_engine_files", None)  # DeepSpeed writes its own model/optimizer
        stall = self.writer.save(module.step, module.state_dict(), metadata, rank_state, engine_files)
        self._last_saved = module.step
        return stall

    def load(self, trainer: Trainer, path: str | Path) -> Path:
        module = trainer.train_module
        path = resolve_checkpoint(path)
        self._verify_before_load(path)  # one-line errors for damaged files, before any tensor is read
        if hasattr(module, "load_engine_files"):
            self._load_engine_checkpoint(module, path)
        else:
            self._load_state(module, path)
        loaded_meta = read_meta_json(path / META)
        # Against the whole model: under a layout this rank holds a part, so the recipe's model on the meta device
        # (free at any size) stands for it; one process checks its live model.
        trainer.load_data_state(loaded_meta.get("data_state"))
        trainer.load_callback_states(loaded_meta.get("callbacks", {}))
        # Last, so that nothing above can draw from the generators after they are restored.
        self._restore_rng(path, loaded_meta, module.device)
        self._last_saved, self._resumed = module.step, path
        log.info("resumed from %s (step %d)", path, module.step)
        return path

    def _load_state(self, module: Any, path: Path) -> None:
        whole = _meta_model_state(self.recipe) if self.distributed else module.model.state_dict()
        check_compatible(path, {"model": whole})
        loaded = load_checkpoint(path, template=self._template(module, path), distributed=self.distributed)
        module.load_state_dict(loaded.state)

    def _load_engine_checkpoint(self, module: Any, path: Path) -> None:
        """An engine that keeps its own files (DeepSpeed): same layout only, then its files, then Loom's JSON."""
        saved = read_meta_json(path / META).get("layout", {"world_size": 1})
        if saved != self.layout:
            raise ConfigError(
                None, "--resume", str(path), f"was saved by layout {saved}, this run is {self.layout}",
                "resume with the saved world size and deepspeed.zero_stage, or convert it with loom ckpt consolidate",
            )  # fmt: skip
        module.load_engine_files(path)
        module.load_state_dict(load_checkpoint(path, template=None, distributed=self.distributed).state)

    def _template(self, module: Any, path: Path) -> dict[str, Any]:
        """The live state to load into, plus optimizer-state tensors a fresh optimizer does not have yet (AdamW
        creates them at its first step): each allocated like its parameter, so DTensor shards load in place."""
        state = module.state_dict()
        params = dict(module.model.named_parameters())
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for key, item in read_dcp_metadata(path).state_dict_metadata.items():
            match = _OPTIMIZER_STATE.match(key)
            if match is None or match.group(1) not in params or not hasattr(item, "size"):
                continue
            name, field = match.groups()
            param = params[name]
            dtype = item.properties.dtype
            same = tuple(item.size) == tuple(param.shape)
            value = torch.zeros_like(param, dtype=dtype) if same else torch.zeros(item.size, dtype=dtype)
            extra.setdefault(name, {})[field] = value.detach()
        state["optimizer"] = {**state["optimizer"], "state": {**extra, **state["optimizer"]["state"]}}
        return state

    def _restore_rng(self, path: Path, metadata: dict[str, Any], device: torch.device) -> None:
        own = path / rank_file(self.rank)
        saved_layout = metadata.get("layout", {"world_size": 1})
        if saved_layout == self.layout and own.is_file():
            set_rng_state(json.loads(own.read_text())["rng"], device)
        elif saved_layout == self.layout and "rng" in metadata:  # one-process checkpoints of format 1
            set_rng_state(metadata["rng"], device)
        elif saved_layout == self.layout:
            # The same layout, but this rank's file is gone: say so (every rank may miss its own file).
            warnings.warn(
                f"{own.name} is missing from {path}: random-number streams (dropout) restart from the seed",
                stacklevel=2,
            )
        elif self.rank == 0:
            # Another layout: rank r's generator state has no counterpart. Dropout masks differ from the
            # uninterrupted run from here on (model, optimizer and data order are exact).
            warnings.warn(
                f"resuming on another layout ({saved_layout} -> {self.layout}): random-number streams "
                "(dropout) restart from the seed",
                stacklevel=2,
            )

    def _resume_path(self) -> Path | None:
        if self.resume is None:
            return None
        # One decision for all ranks, made on rank 0 (they could race a concurrent commit otherwise)
        if self.resume == "auto":
            choice = self._newest_good()
        else:
            choice = _agreed(self.distributed, self.rank, lambda: resolve_checkpoint(self.resume))
        if choice is not None and not self.accept_data_change:
            check_same_data(choice, recipe_to_dict(self.recipe))
        return choice

    def _newest_good(self) -> Path | None:
        """The newest committed checkpoint whose files verify, hashes included (rank 0 reads them, every rank
        gets its answer); a damaged one is skipped with a warning naming it. None when there is no checkpoint;
        when every one fails, one ConfigError lists each and why, and none of them is touched: no fresh start
        that would overwrite and retire them."""
        return _agreed(self.distributed, self.rank, self._newest_good_here)

    def _newest_good_here(self) -> Path | None:
        failures = []
        for step, path in reversed(complete_checkpoints(self.root)):
            try:
                verify_checkpoint(path, hashes=True)
            except ConfigError as error:
                failures.append(f"step {step}: {error.value}: {error.rule}")
                warnings.warn(
                    f"--resume auto: skipping checkpoint of step {step}: {path} fails verification: "
                    f"{error.rule}; trying the one before",
                    stacklevel=3,
                )  # fmt: skip
                continue
            self._hashed = path  # load() need not read it all again
            return path
        if failures:
            rule = f"no checkpoint under {self.root} verifies: " + "; ".join(failures)
            fix = (
                "restore the damaged files, or resume from a checkpoint you trust with --resume PATH, or start a "
                "new run with another logging.run_dir (the checkpoints were left untouched)"
            )
            raise ConfigError(None, "--resume", "auto", rule, fix)
        return None

    def _verify_before_load(self, path: Path) -> None:
        """The load's verification: with hashes, unless --resume auto just checked them for this path; on rank 0
        only when distributed (all ranks share the files), every rank raising its outcome."""
        hashed = path == self._hashed

        def verify() -> None:
            with warnings.catch_warnings():
                if hashed:  # its "cannot be verified" (an old checkpoint) was said once already
                    warnings.filterwarnings("ignore", message=".*no recorded file hashes")
                verify_checkpoint(path, hashes=not hashed)

        _agreed(self.distributed, self.rank, verify)

    # -- preemption ----------------------------------------------------------------------------------------

    def _preempt(self, trainer: Trainer, signum: int) -> None:
        if self._last_saved != trainer.step:
            self.save(trainer)
        path = self._wait()
        if self.rank == 0:
            write_record(self.recipe.logging.run_dir, trainer.step, path, signum)
        self._barrier()
        raise Preempted(trainer.step, path, signum)

    def _wait(self) -> Path | None:
        path = self.writer.wait() if self.writer is not None else None
        self._barrier()
        return path

    def _log_commit(self, step: int, path: Path) -> None:
        """Rank 0, after each commit (from the writer thread when async): one line of <run_dir>/checkpoints.jsonl
        with how long the save took and how many steps training ran meanwhile."""
        started = self._started.pop(step, time.perf_counter())
        now = self._trainer.step if self._trainer is not None else step
        record = {"step": step, "path": str(path), "seconds": round(time.perf_counter() - started, 4)}
        record["steps_during_save"] = now - step
        with open(Path(self.recipe.logging.run_dir) / "checkpoints.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _agreed(distributed: bool, rank: int, compute: Any) -> Any:
    """`compute()` on rank 0; every rank returns its result, or raises its ConfigError (rebuilt from its fields:
    the exception itself does not pickle), so no rank waits in a collective for one that failed."""
    if not distributed:
        return compute()
    box: list[Any] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            box[0] = ("ok", compute())
        except ConfigError as error:
            box[0] = ("error", (error.file, error.key, str(error.value), error.rule, error.fix))
        except Exception as error:  # noqa: BLE001 - re-raised below, after the others heard of it
            failure, box[0] = error, ("failed", f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise ConfigError(*value)
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed to verify the checkpoint: {value}")
    return value


def _meta_model_state(recipe: Recipe) -> dict[str, torch.Tensor]:
    """The whole model's state (names and global shapes) on the meta device: no memory, any size."""
    with torch.device("meta"):
        return build_model(recipe.model).state_dict()
