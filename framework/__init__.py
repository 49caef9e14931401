"""Loom's training framework: config, models, data, parallelism, training, checkpoints, conversion."""
