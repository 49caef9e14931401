"""`loom convert`: the direction chosen on the command line -> export or import.

Every direction follows the write rule of framework/outputs.py: OUT is checked before any work (never an input,
nor holding or inside one; an existing non-empty OUT only with `overwrite`, which replaces it whole), written into
a temporary sibling and renamed into place, so a failed conversion leaves neither OUT nor the temporary folder.
"""

from __future__ import annotations

from pathlib import Path


def convert(
    source: str,
    out: str,
    *,
    to: str | None,
    tokenizer: str | None = None,
    max_shard: str = "5GB",
    from_: str | None = None,
    megatron_config: str | None = None,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
    with_tokenizer: bool = True,
) -> str:
    """Run one conversion; returns the line to print. User mistakes raise ConfigError."""
    if tokenizer is not None and not with_tokenizer:
        from framework.config.errors import ConfigError

        raise ConfigError(
            "command line", "--no-tokenizer", True, "contradicts --tokenizer", "pass one of the two"
        )
    if to == "megatron":
        from framework.convert.megatron.convert import export_megatron

        path = export_megatron(source, out, overwrite=overwrite)
        return f"wrote megatron-core torch_dist checkpoint {path} with its GPTModel arguments megatron_config.yaml"
    if from_ == "megatron":
        from framework.convert.megatron.convert import import_megatron

        checkpoint = import_megatron(source, out, megatron_config, trust_checkpoint, overwrite=overwrite)
        return _imported(checkpoint, Path(out))
    if to == "hf":
        from framework.convert.hf.convert import export_checkpoint, export_note
        from framework.convert.hf.weights import parse_size

        shard_bytes = parse_size(max_shard)
        path = export_checkpoint(
            source, out, tokenizer=tokenizer, max_shard_bytes=shard_bytes, overwrite=overwrite,
            with_tokenizer=with_tokenizer,
        )  # fmt: skip
        return f"wrote Hugging Face model folder {path}{export_note(source)}"
    from framework.convert.hf.importer import import_hf

    return _imported(import_hf(source, out, overwrite=overwrite), Path(out))


def _imported(checkpoint: Path, out: Path) -> str:
    recipe = out / "recipe.yaml"
    return (
        f"wrote checkpoint {checkpoint} and recipe {recipe}; continue with: loom train {recipe} --resume auto"
    )
