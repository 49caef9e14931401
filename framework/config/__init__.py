"""Recipes: typed sections, the YAML loader and the one user-error type."""

from framework.config.errors import ConfigError
from framework.config.schema import (
    CheckpointConfig,
    DataConfig,
    LaunchConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    Recipe,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "Recipe",
    "ScheduleConfig",
    "TrainConfig",
    "WandbConfig",
]
