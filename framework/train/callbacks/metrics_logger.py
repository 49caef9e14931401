"""Step metrics to a progress bar, <run_dir>/metrics.jsonl and TensorBoard (<run_dir>/tb), rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from framework.config import LoggingConfig
from framework.train.callbacks.base import Callback
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


class MetricsLogger(Callback):
    """Logs every `logging.log_every` steps (and the last step) and every validation.

    tokens/s, TFLOP/s and MFU are over the steps since the previous record, from the Trainer's per-step wall
    time (data + compute; time spent in other callbacks such as checkpointing is not counted). `flops_per_token`
    is the training FLOPs (forward + backward) of one token; without it TFLOP/s and MFU are null.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        total_steps: int,
        flops_per_token: float | None = None,
        rank: int = 0,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.enabled = rank == 0
        self._peak: float | None = None
        self._jsonl: IO[str] | None = None
        self._tb: Any = None
        self._bar: tqdm | None = None
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
            self._bar = tqdm(total=self.total_steps, initial=module.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._interval_time += metrics.get("step_time", 0.0)
        self._interval_tokens += metrics["tokens"] - self._last_tokens
        self._last_tokens = metrics["tokens"]
        if self._bar is not None:
            self._bar.update(1)
        step = metrics["step"]
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self._log_train(metrics)

    def _log_train(self, metrics: dict[str, Any]) -> None:
        rates = throughput(self._interval_tokens, self._interval_time, self.flops_per_token, self._peak)
        self._interval_time, self._interval_tokens = 0.0, 0
        record = {key: _json_value({**metrics, **rates}.get(key)) for key in TRAIN_KEYS}
        # MoE router losses and load metrics, when the model has MoE layers (see framework/train/moe_loss.py).
        record.update({k: _json_value(v) for k, v in metrics.items() if k.startswith("moe_")})
        self._write("train", record)
        if self._bar is not None:
            loss = "nan" if record["loss"] is None else f"{record['loss']:.4f}"
            self._bar.set_postfix(loss=loss, lr=f"{metrics['lr']:.2e}", refresh=False)

    def on_validation(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write("val", {k: _json_value(v) for k, v in metrics.items()})

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key.removeprefix(kind + '_')}", value, record["step"])

    def on_close(self, trainer: Trainer) -> None:
        for resource in (self._bar, self._jsonl, self._tb):
            if resource is not None:
                resource.close()
        self._bar = self._jsonl = self._tb = None
