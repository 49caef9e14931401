"""use_mixer_kernels: recurrent mixers get their kernel library only when it imports; a CPU forward never calls it."""

from __future__ import annotations

import torch

from framework.config.schema import GDNConfig, LayersConfig, Mamba2Config, ModelConfig
from framework.kernels import choice, fla, mamba_ssm
from framework.models.transformer import build_model

CFG = ModelConfig(
    vocab_size=32, d_model=32, n_layers=2, n_heads=4, ffn_hidden=32, max_seq_len=16,
    layers=LayersConfig(pattern=["gdn", "mamba2"]), gdn=GDNConfig(heads=2, key_head_dim=8, value_head_dim=8),
    mamba2=Mamba2Config(heads=2, head_dim=8, state_dim=8),
)  # fmt: skip


def test_absent_libraries_leave_the_pytorch_path(monkeypatch) -> None:
    monkeypatch.setattr(fla, "available", lambda: False)
    monkeypatch.setattr(mamba_ssm, "available", lambda: False)
    model = build_model(CFG)
    assert choice.use_mixer_kernels(model) == {"fla": 0, "mamba_ssm": 0}
    assert model.layers["0"].gdn.kernel is None and model.layers["1"].mamba.kernel is None


def test_installed_kernel_is_not_called_on_cpu(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(fla, "available", lambda: True)
    monkeypatch.setattr(fla, "fla_gated_delta_rule", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(mamba_ssm, "available", lambda: False)
    model = build_model(CFG)
    ids = torch.randint(0, 32, (1, 9))
    before = model(ids)
    assert choice.use_mixer_kernels(model) == {"fla": 1, "mamba_ssm": 0}
    assert model.layers["0"].gdn.kernel is not None
    torch.testing.assert_close(model(ids), before)
    assert calls == []
