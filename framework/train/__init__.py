"""Single-process training engine: TrainModule (step mechanics), Trainer (the loop) and its callbacks."""

from framework.train.callbacks import (
    Callback,
    Checkpointer,
    MetricsLogger,
    Profiler,
    Stability,
    TrainingHalted,
    Validation,
    default_callbacks,
)
from framework.train.loss import IGNORE_INDEX, LossOutput, compute_loss, loss_sums
from framework.train.metrics import lookup_peak_tflops, peak_tflops, throughput
from framework.train.optim import build_optimizer, split_decay_groups
from framework.train.precision import Precision
from framework.train.schedule import build_scheduler, lr_multiplier
from framework.train.train_module import BaseTrainModule, StepCounters, TrainModule, resolve_device
from framework.train.trainer import Trainer, split_micro_batches

__all__ = [
    "IGNORE_INDEX",
    "BaseTrainModule",
    "Callback",
    "Checkpointer",
    "LossOutput",
    "MetricsLogger",
    "Precision",
    "Profiler",
    "Stability",
    "StepCounters",
    "TrainModule",
    "Trainer",
    "TrainingHalted",
    "Validation",
    "build_optimizer",
    "build_scheduler",
    "compute_loss",
    "default_callbacks",
    "loss_sums",
    "lookup_peak_tflops",
    "lr_multiplier",
    "peak_tflops",
    "resolve_device",
    "split_decay_groups",
    "split_micro_batches",
    "throughput",
]
