"""`loom convert`: the direction chosen on the command line -> export or import."""

from __future__ import annotations

from pathlib import Path


def convert(
    source: str, out: str, *, to: str | None, tokenizer: str | None = None, max_shard: str = "5GB"
) -> str:
    """Run one conversion; returns the line to print. User mistakes raise ConfigError."""
    if to == "hf":
        from framework.convert.hf.convert import export_checkpoint
        from framework.convert.hf.weights import parse_size

        path = export_checkpoint(source, out, tokenizer=tokenizer, max_shard_bytes=parse_size(max_shard))
        return f"wrote Hugging Face model folder {path}"
    from framework.convert.hf.importer import import_hf

    checkpoint = import_hf(source, out)
    recipe = Path(out) / "recipe.yaml"
    return (
        f"wrote checkpoint {checkpoint} and recipe {recipe}; continue with: loom train {recipe} --resume auto"
    )
