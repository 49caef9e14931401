"""precision.dtype fp8 with torchao's float8 training, emulated on CPU (Float8LinearConfig(emulate=True): the same
e4m3 / e5m2 casts with dynamic per-tensor scales as on an H100, the matmul itself in high precision).

The reference is the same model, data and seed trained in bf16 autocast: fp8 must track it, and must not equal it
bitwise (which would mean no float8 cast ran). Tolerance, measured first on this machine (a Loom decoder of 4
blocks, d_model 64, the 2 middle blocks' 14 Linear layers in fp8, 20 AdamW steps at lr 3e-3, loss 5.53 -> 2.71):
the per-step loss differed from bf16 by at most 2.3e-3 relative (rowwise scaling 3.3e-3, every Linear in fp8
3.8e-3), the same order as bf16 against fp32 (1.5e-3): rounding differences that AdamW carries forward. The test
allows 1e-2, about 4x the measurement. It is a tracking bound, not a detector of subtle scaling bugs: with every
scale forced to 1 (raw e4m3 range) the drift was 4.9e-3. At lr 1e-2 the runs are chaotic (bf16 vs fp32: 21%), so
the lr is kept low enough for trajectories to be comparable.
The 2-process cases (FSDP2, TP2 against one fp8 process) are tests/framework/parallel/test_fp8_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework.config.errors import ConfigError
from framework.config.schema import PrecisionConfig, Recipe
from framework.kernels import fp8
from framework.run import materialize_model
from framework.train import TrainModule

pytest.importorskip("torchao.float8", reason="the fp8 extra (torchao) is not installed")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

VOCAB, STEPS, LR, TOLERANCE = 256, 20, 3e-3, 1e-2


def _recipe(dtype: str, **precision: object) -> Recipe:
    recipe = Recipe()
    m = recipe.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.ffn_hidden, m.max_seq_len = (
        VOCAB, 64, 4, 4, 2, 128, 32,
    )  # fmt: skip
    recipe.precision = PrecisionConfig(dtype=dtype, **precision)  # type: ignore[arg-type]
    recipe.optim.lr, recipe.schedule.name, recipe.schedule.warmup_steps = LR, "constant", 0
    recipe.train.steps, recipe.data.seq_len = STEPS, 32
    recipe.validate()
    return recipe


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Learnable sequences: x[t+1] = (5 x[t] + 3) mod VOCAB from random starts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (8, 1), generator=g)
        seq = [x]
        for _ in range(32):
            seq.append((5 * seq[-1] + 3) % VOCAB)
        ids = torch.cat(seq, dim=1)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def _train(recipe: Recipe) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(0)
    model = fp8.apply_fp8(materialize_model(recipe.model, torch.device("cpu"), 0), recipe.precision, "cpu")
    module = TrainModule(model, recipe, "cpu")
    losses = []
    for batch in _batches(STEPS):
        module.train_batch([batch])
        losses.append(module.optim_step()["loss"])
    return model, losses


def test_fp8_torchao_tracks_bf16_and_converts_the_middle_blocks():
    _, bf16 = _train(_recipe("bf16"))
    model, f8 = _train(_recipe("fp8", fp8_backend="torchao"))
    converted = fp8.float8_linear_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # First and last blocks and the output head stay bf16 (fp8_skip_first_last defaults to true).
    expected = [n for n in linears if n.startswith(("layers.1.", "layers.2."))]
    assert converted == expected and len(expected) == 14
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in set(linears) - set(converted))
    assert f8 != bf16  # the float8 casts ran
    worst = max(abs(a - b) / b for a, b in zip(f8, bf16))
    assert worst < TOLERANCE, (worst, f8, bf16)
    assert sum(f8[-5:]) / 5 < 0.8 * sum(f8[:5]) / 5  # and it learns


def test_skip_first_last_off_converts_every_linear():
    recipe = _recipe("fp8", fp8_skip_first_last=False)
    model = fp8.apply_fp8(materialize_model(recipe.model, torch.device("meta"), 0), recipe.precision, "meta")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert fp8.float8_linear_names(model) == linears and "output" in linears
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in linears)


def test_filter_keeps_routers_and_odd_sizes():
    keep = fp8.fp8_filter(nn.Module(), skip_first_last=False)
    assert keep(nn.Linear(64, 64), "layers.0.attention.wq")
    assert not keep(nn.Linear(64, 8), "layers.0.feed_forward.router.gate")  # routing stays high precision
    assert not keep(nn.Linear(64, 72), "layers.0.feed_forward.router.gate")
    assert not keep(nn.Linear(64, 100), "layers.1.attention.wq")  # fp8 GEMMs need multiples of 16


@pytest.mark.parametrize(
    ("precision", "key"),
    [
        ({"dtype": "fp8", "loss_scale_init": 1024.0}, "precision.loss_scale_init"),
        ({"dtype": "fp8", "fp8_backend": "torchao", "fp8_recipe": "delayed"}, "precision.fp8_recipe"),
        ({"dtype": "fp8", "fp8_backend": "te", "fp8_recipe": "rowwise"}, "precision.fp8_recipe"),
    ],
)
def test_nonsense_fp8_settings_are_config_errors(precision, key):
    with pytest.raises(ConfigError) as err:
        PrecisionConfig(**precision).validate()
    assert err.value.key == key


def test_fp8_recipe_fields_are_ignored_outside_fp8():
    PrecisionConfig(
        dtype="bf16", fp8_backend="te", fp8_recipe="rowwise"
    ).validate()  # compare fp8 recipes in bf16


def test_te_backend_on_cpu_is_a_config_error_naming_the_gpu_extra():
    with pytest.raises(ConfigError) as err:
        fp8.check_fp8(_recipe("fp8", fp8_backend="te"), torch.device("cpu"))
    assert err.value.key == "precision.fp8_backend" and "gpu" in err.value.fix and "torchao" in err.value.fix


def test_missing_torchao_is_a_config_error_naming_the_extra(monkeypatch):
    real = fp8.importlib.import_module

    def no_torchao(name: str, *args: object):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(fp8.importlib, "import_module", no_torchao)
    with pytest.raises(ConfigError) as err:
        fp8.check_fp8(_recipe("fp8"), torch.device("cpu"))
    assert err.value.key == "precision.fp8_backend" and "loom-pretrain[fp8]" in err.value.fix
