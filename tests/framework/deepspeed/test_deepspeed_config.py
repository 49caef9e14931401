"""The DeepSpeed config Loom generates, the check of user-added DeepSpeed keys, and what the engine refuses."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

from framework.config.errors import ConfigError  # noqa: E402
from framework.config.loader import load_recipe  # noqa: E402
from framework.deepspeed.config import check_deepspeed, ds_config, known_keys  # noqa: E402

BASE = ["parallel.engine=deepspeed", "checkpoint.every=0", "checkpoint.save_final=false"]
BASE += ["train.global_batch_size=16", "train.micro_batch_size=2"]


def _recipe(*sets: str):
    return load_recipe("recipes/debug.yaml", [*BASE, *sets])


def test_generated_config_follows_the_recipe() -> None:
    recipe = _recipe("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu",
                     "optim.grad_clip=0.5", "deepspeed.config={zero_optimization: {reduce_bucket_size: 1000}}")  # fmt: skip
    config = ds_config(recipe, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 2  # 16 = 2 per micro-batch x 4 ranks x 2
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000  # user keys merge into the section
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    check_deepspeed(recipe, 4, None)  # valid as a whole


@pytest.mark.parametrize(
    ("extra", "key", "hint"),
    [
        ("{zero_optimisation: {stage: 2}}", "deepspeed.config.zero_optimisation", "zero_optimization"),
        ("{zero_optimization: {reduce_bucket_sise: 5}}", "deepspeed.config.zero_optimization.reduce_bucket_sise",
         "reduce_bucket_size"),
        ("{zero_optimization: {offload_optimizer: {devcie: cpu}}}",
         "deepspeed.config.zero_optimization.offload_optimizer.devcie", ""),
        ("{bf16: {enabeld: true}}", "deepspeed.config.bf16.enabeld", "enabled"),
    ],
    ids=["top_level", "nested", "two_levels", "bf16"],
)  # fmt: skip
def test_a_misspelt_deepspeed_key_is_an_error(extra: str, key: str, hint: str) -> None:
    recipe = _recipe(f"deepspeed.config={extra}")
    with pytest.raises(ConfigError) as err:
        check_deepspeed(recipe, 2, None)
    assert err.value.key == key, str(err.value)
    assert hint in str(err.value)


def test_known_keys_include_what_deepspeed_reads() -> None:
    keys = set(known_keys())
    assert {"zero_optimization", "bf16", "fp16", "gradient_clipping", "activation_checkpointing"} <= keys


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["parallel.tp=2"], "parallel.tp"),
        (["parallel.pp=2"], "parallel.pp"),
        (["parallel.cpu_offload=true"], "parallel.cpu_offload"),
        (["precision.dtype=fp8"], "precision.dtype"),
        (["precision.dtype=fp16", "precision.loss_scale_init=1000"], "precision.loss_scale_init"),
        (
            ["precision.dtype=fp16", "precision.loss_scale_growth_factor=4"],
            "precision.loss_scale_growth_factor",
        ),
        (["train.spike_sigma=3"], "train.spike_sigma"),
        (["checkpoint.async_save=true"], "checkpoint.async_save"),
        (["train.global_batch_size=6"], "train.global_batch_size"),
    ],
)
def test_layouts_deepspeed_cannot_run_are_refused(sets: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_deepspeed(_recipe(*sets), 2, None)
    assert err.value.key == key, str(err.value)


def test_offload_params_needs_zero_3() -> None:
    with pytest.raises(ConfigError) as err:
        _recipe("deepspeed.zero_stage=2", "deepspeed.offload_params=cpu")
    assert err.value.key == "deepspeed.offload_params"


def test_fp16_uses_deepspeeds_loss_scaler_and_is_refused_on_cpu() -> None:
    recipe = _recipe(
        "precision.dtype=fp16", "precision.loss_scale_init=1024", "precision.loss_scale_growth_interval=50"
    )
    fp16 = ds_config(recipe, world_size=2)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic
    assert fp16["initial_scale_power"] == 10 and fp16["loss_scale_window"] == 50
    check_deepspeed(recipe, 2, None)  # valid on a GPU
    with pytest.raises(ConfigError) as err:
        check_deepspeed(recipe, 2, None, torch.device("cpu"))
    assert err.value.key == "precision.dtype" and "CPU accelerator has no fp16" in str(err.value)


def test_a_missing_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from framework.deepspeed.config import import_deepspeed

    monkeypatch.setitem(
        sys.modules, "deepspeed", None
    )  # import deepspeed -> ImportError, as when not installed
    with pytest.raises(ConfigError) as err:
        import_deepspeed(torch.device("cpu"))
    assert err.value.key == "parallel.engine" and "loom-pretrain[deepspeed]" in str(err.value)


def test_muon_is_refused_on_zero() -> None:
    """ZeRO partitions flat buffers; Muon needs whole matrices (FSDP2's owner scheme does that)."""
    with pytest.raises(ConfigError) as err:
        check_deepspeed(_recipe("optim.name=muon"), 2, None)
    assert err.value.key == "optim.name"
