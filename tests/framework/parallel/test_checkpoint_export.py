"""`loom convert --to hf` from checkpoints saved on a parallel layout gives the model the one-process checkpoint
gives: the exported folders load in transformers with the same logits (and the same tensors)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from framework.checkpoint import save_checkpoint
from framework.config import ParallelConfig, Recipe
from framework.config.loader import recipe_to_dict
from framework.convert.consolidate import read_model_state
from framework.convert.hf.convert import recipe_from_metadata, save_hf
from framework.run import materialize_model
from tests.framework.convert.conftest import CONFIGS

AUTO = {
    "decoder": "AutoModelForCausalLM",
    "encoder": "AutoModelForMaskedLM",
    "encoder_decoder": "AutoModelForSeq2SeqLM",
}
TP2XPP2 = (4, dict(tp=2, pp=2))
TP2XFSDP2 = (4, dict(tp=2, dp_shard=2, data_parallel="fsdp"))
EP2 = (2, dict(dp_shard=2, ep=2, data_parallel="fsdp"))
CASES = {
    "llama_tied@tp2xpp2": ("llama_tied", TP2XPP2),
    "qwen3@tp2xpp2": ("qwen3", TP2XPP2),
    "t5@tp2xfsdp2": ("t5", TP2XFSDP2),
    "bert@tp2xfsdp2": ("bert", TP2XFSDP2),
    "mixtral@ep2": ("mixtral", EP2),
    "qwen3_moe@ep2": ("qwen3_moe", EP2),
}


def _recipe(family: str, parallel: dict) -> Recipe:
    model = dataclasses.replace(CONFIGS[family], vocab_size=102)  # even: the vocabulary is split over tp
    recipe = Recipe(model=model, parallel=ParallelConfig(**parallel))
    recipe.train.global_batch_size, recipe.train.micro_batch_size = 4, 2
    recipe.data.seq_len = 16
    recipe.data.objective = {"encoder": "mlm", "encoder_decoder": "span_corruption"}.get(
        model.family, "causal"
    )
    return recipe


def _inputs(recipe: Recipe) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, recipe.model.vocab_size, (2, 16), generator=gen)}
    if recipe.model.family == "encoder_decoder":
        batch["decoder_input_ids"] = torch.randint(0, recipe.model.vocab_size, (2, 9), generator=gen)
    return batch


def _logits(recipe: Recipe, folder: Path) -> torch.Tensor:
    hf = getattr(transformers, AUTO[recipe.model.family]).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(**_inputs(recipe)).logits


def _export(checkpoint: Path, out: Path) -> Path:
    """export_checkpoint's path (verify, read only the model tensors, full, with no process group), without a
    tokenizer: these tiny vocabularies fit none."""
    loaded = read_model_state(checkpoint)
    return save_hf(recipe_from_metadata(loaded.meta, loaded.path).model, loaded.tensors, out)


@pytest.mark.parametrize("case", list(CASES))
def test_export_from_a_layout_matches_one_process(dist_pool, tmp_path: Path, case: str) -> None:
    family, (world, parallel) = CASES[case]
    recipe = _recipe(family, parallel)
    dist_pool(world).run("dist_cases_resume:save_initial", recipe, str(tmp_path / "sharded"))
    one = materialize_model(recipe.model, torch.device("cpu"), recipe.train.seed)
    save_checkpoint(tmp_path / "one", 0, {"model": one.state_dict()}, {"recipe": recipe_to_dict(recipe)})

    sharded, single = (
        _export(tmp_path / "sharded", tmp_path / "hf_sharded"),
        _export(tmp_path / "one", tmp_path / "hf_one"),
    )
    a, b = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_logits(recipe, sharded), _logits(recipe, single), rtol=0, atol=1e-6)
