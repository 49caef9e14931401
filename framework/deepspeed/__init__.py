"""The DeepSpeed engine (parallel.engine: deepspeed). Imported only when a recipe asks for it; deepspeed itself is
imported lazily (a missing install is a ConfigError naming the `deepspeed` extra)."""
