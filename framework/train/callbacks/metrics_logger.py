"""Step metrics to the progress display (stderr), <run_dir>/metrics.jsonl and TensorBoard (<run_dir>/tb), rank 0
only. Every record goes out through the on_log hook, where this logger writes it, as the W&B logger does."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from framework.config import LoggingConfig
from framework.train.callbacks.base import Callback
from framework.train.callbacks.progress import BarProgress, LineProgress, make_progress
from framework.train.metrics import peak_tflops, throughput

if TYPE_CHECKING:
    from framework.train.trainer import Trainer

# Keys of every train record, in this order (missing values are written as null).
TRAIN_KEYS = (
    "step", "loss", "z_loss", "grad_norm", "lr", "tokens", "labelled_tokens", "tokens_per_s", "tflops", "mfu",
    "step_time", "skipped", "skip_reason", "skipped_steps", "loss_scale",
)  # fmt: skip


def _json_value(value: Any) -> Any:
    """Non-finite floats become null: strict JSON has no NaN/inf (skip_reason says why a loss was not finite)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def scalars(kind: str, record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) of each number in a record, named as in TensorBoard and W&B: 'train/loss', 'val/loss'
    (a val_ prefix dropped). Booleans, text and nulls are left out; so is the step, the x axis."""
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{kind}/{key.removeprefix(kind + '_')}", value


class MetricsLogger(Callback):
    """Logs every `logging.log_every` steps (and the last step) and every validation.

    tokens/s, TFLOP/s and MFU are over the steps since the previous record, from the Trainer's per-step wall
    time (data + compute; time spent in other callbacks such as checkpointing is not counted). `flops_per_token`
    is the training FLOPs (forward + backward) of one token; without it TFLOP/s and MFU are null. All three are
    per device: `devices_per_token` (tp x pp) is how many ranks share the compute of each token this rank counts
    (framework/train/metrics.py), so tokens/s is this rank's share of the tokens, not its replica's.
    `stream` takes the progress display (default stderr): a bar when it is a terminal, else plain lines
    (framework/train/callbacks/progress.py).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        total_steps: int,
        flops_per_token: float | None = None,
        rank: int = 0,
        stream: IO[str] | None = None,
        devices_per_token: int = 1,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.devices_per_token = devices_per_token
        self.enabled = rank == 0
        self.stream = stream
        self._peak: float | None = None
        self._jsonl: IO[str] | None = None
        self._tb: Any = None
        self._progress: BarProgress | LineProgress | None = None
        self._interval_time = 0.0
        self._interval_tokens = 0
        self._last_tokens = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        module = trainer.train_module
        self._peak = peak_tflops(module.device, self.cfg.peak_tflops)
        self._last_tokens = module.tokens
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.jsonl:
            # Append: a resumed run continues the file. Kept open for the run; closed in on_close.
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when wanted

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if self.cfg.progress_bar:
            self._progress = make_progress(self.total_steps, module.step, self.stream or sys.stderr)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._interval_time += metrics.get("step_time", 0.0)
        self._interval_tokens += metrics["tokens"] - self._last_tokens
        self._last_tokens = metrics["tokens"]
        if self._progress is not None:
            self._progress.advance()
        step = metrics["step"]
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            record = self._train_record(metrics)
            if self._progress is not None:
                self._progress.log(record)
            trainer.emit("on_log", "train", record)

    def _train_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        # this device's share of the tokens: its tp and pp peers counted the same ones
        share = self._interval_tokens / self.devices_per_token
        rates = throughput(share, self._interval_time, self.flops_per_token, self._peak)
        self._interval_time, self._interval_tokens = 0.0, 0
        record = {key: _json_value({**metrics, **rates}.get(key)) for key in TRAIN_KEYS}
        # MoE router losses and load metrics, when the model has MoE layers (see framework/train/moe_loss.py);
        # multi-token prediction losses with model.mtp (framework/train/mtp_loss.py); QK-clip's largest logit and
        # clipped heads with optim.qk_clip (framework/train/qk_clip.py).
        extra = ("moe_", "mtp_", "qk_")
        record.update({k: _json_value(v) for k, v in metrics.items() if k.startswith(extra)})
        return record

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        trainer.emit("on_log", "val", {k: _json_value(v) for k, v in metrics.items()})

    def on_log(self, trainer: Trainer, kind: str, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
            self._jsonl.flush()
        if (
            self._tb is not None and kind != "summary"
        ):  # TensorBoard holds the curves; the summary is one point
            for name, value in scalars(kind, record):
                self._tb.add_scalar(name, value, record["step"])

    def on_fit_end(self, trainer: Trainer) -> None:
        self._end_progress()  # before anything prints below it (the summary)

    def on_exception(self, trainer: Trainer, error: BaseException) -> None:
        self._end_progress()

    def _end_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
        self._progress = None

    def on_close(self, trainer: Trainer) -> None:
        self._end_progress()
        for resource in (self._jsonl, self._tb):
            if resource is not None:
                resource.close()
        self._jsonl = self._tb = None
