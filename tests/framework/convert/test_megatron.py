"""loom convert --from/--to megatron against megatron-core 0.16.1 itself (GPTModel, local layer spec, CPU/gloo).

One 2-process gloo spawn (module scope, megatron_cpu.worker) builds the megatron models (dense GQA SwiGLU RMSNorm;
MoE with QK-norm, tied embeddings, interleaved RoPE, softmax top-2 routing; GPT-2 style LayerNorm/bias/GELU), saves
them at TP1 with their logits, re-saves them at TP2 / PP2 / EP2, and loads the Loom exports at TP1 / TP2 to run
them. Every comparison is fp32 logits,
max abs difference <= 1e-4.
"""

from __future__ import annotations

import argparse
import fractions
import pickle
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from framework.config.errors import ConfigError  # noqa: E402
from framework.config.loader import load_recipe  # noqa: E402
from framework.config.schema import ModelConfig, MoEConfig  # noqa: E402
from framework.convert.consolidate import read_model_state  # noqa: E402
from framework.convert.hf.importer import write_imported  # noqa: E402
from framework.convert.megatron import config as mconfig  # noqa: E402
from framework.convert.megatron import torch_dist  # noqa: E402
from framework.convert.megatron.convert import export_megatron, import_megatron, read_megatron  # noqa: E402
from framework.models import build_model  # noqa: E402
from framework.train import TrainModule  # noqa: E402
from framework.train.callbacks.checkpointer import Checkpointer  # noqa: E402
from framework.train.trainer import Trainer  # noqa: E402
from launcher.cli import main as cli_main  # noqa: E402
from tests.framework.convert.conftest import random_model, routing_margins  # noqa: E402

# importlib mode: the spawned workers import the helper from beside this file (children inherit sys.path)
_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import megatron_cpu  # noqa: E402

VOCAB, SEQ = 64, 12  # megatron's vocab-parallel embedding needs a vocab divisible by TP
TOL = 1e-4
_TC = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
           normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func="silu",
           add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
MEGATRON: dict[str, dict[str, Any]] = {
    "dense": {
        "transformer_config": _TC,
        "gpt_model": dict(
            vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope", rotary_base=500
        ),
        "layer_spec": {"normalization": "RMSNorm"},
    },
    "moe": {
        "transformer_config": _TC
        | dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=24,
            qk_layernorm=True,
            moe_aux_loss_coeff=0.0,
            rotary_interleaved=True,
        ),  # fmt: skip
        "gpt_model": dict(
            vocab_size=VOCAB,
            max_sequence_length=32,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=True,
        ),  # fmt: skip
        "layer_spec": {"normalization": "RMSNorm", "num_experts": 4, "qk_layernorm": True},
    },
    # DeepSeek-V3 style routing: sigmoid scores with an expert bias, group-limited top-4 of 8 (2 of 4 groups),
    # scaled weights, a shared expert, a dense first layer (per-layer keys, megatron's block spec)
    "moe_sigmoid": {
        "transformer_config": _TC
        | dict(
            num_moe_experts=8,
            moe_router_topk=4,
            moe_ffn_hidden_size=16,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
            moe_router_topk_scaling_factor=2.5,
            moe_shared_expert_intermediate_size=16,
            moe_layer_freq=[0, 1],
            moe_aux_loss_coeff=0.0,
        ),
        "gpt_model": dict(vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope"),
        "layer_spec": {"normalization": "RMSNorm", "num_experts": 8},
    },
    # GPT-2 style: LayerNorm with biases, biases in every linear layer, plain GELU, learned positions, MHA
    "gpt2": {
        "transformer_config": _TC
        | dict(
            normalization="LayerNorm",
            num_query_groups=None,
            gated_linear_unit=False,
            activation_func="gelu",
            add_bias_linear=True,
        ),
        "gpt_model": dict(
            vocab_size=VOCAB,
            max_sequence_length=32,
            position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=True,
        ),
        "layer_spec": {"normalization": "LayerNorm"},
    },
}
LAYOUTS = {"dense": ["tp2", "pp2"], "moe": ["tp2", "ep2"], "gpt2": ["tp2"], "moe_sigmoid": ["ep2"]}
_LOOM = dict(vocab_size=VOCAB, d_model=48, n_layers=3, n_heads=6, kv_heads=2, head_dim=8, ffn_hidden=40,
             max_seq_len=32, norm_eps=1e-6, rope_theta=1000.0)  # fmt: skip
LOOM: dict[str, ModelConfig] = {
    # PP2 needs an even layer count; untied: megatron ties a PP>1 head with `.cuda()` (setup_embeddings_and_output_layer)
    "dense": ModelConfig(**_LOOM | {"n_layers": 2}),
    # a dense first layer (megatron moe_layer_freq list -> per-layer keys), shared expert, QK-norm, tied head
    "moe": ModelConfig(
        **_LOOM,
        qk_norm=True,
        tie_embeddings=True,
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, first_dense=1, n_shared_experts=1),
    ),  # fmt: skip
    # sigmoid routing with expert bias, groups and scale; MoE layers 0 and 2 around a dense one
    "moe_sigmoid": ModelConfig(
        **_LOOM,
        moe=MoEConfig(
            n_experts=8,
            top_k=4,
            expert_hidden=16,
            every=2,
            router="sigmoid",
            n_groups=4,
            topk_groups=2,
            route_scale=2.5,
            bias_update_rate=1e-3,
        ),
    ),  # fmt: skip
}
EXPORT_LAYOUTS = {"dense": ["tp1", "tp2", "pp2"], "moe": ["tp1", "tp2", "ep2"], "moe_sigmoid": ["tp1"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _loom_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Loom exports first (pure Loom), then the one megatron spawn that saves, re-saves and runs everything."""
    root = tmp_path_factory.mktemp("megatron")
    exports, loom_logits = {}, {}
    for name, cfg in LOOM.items():
        model = random_model(cfg, seed=3)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("expert_bias"):  # random_model perturbs parameters only
                buffer.add_(0.1 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(4)))
        loom_logits[name] = _loom_logits(model)
        checkpoint = write_imported(cfg, model.state_dict(), root / f"loom_{name}", None)
        folder = export_megatron(checkpoint, root / f"export_{name}")
        args = yaml.safe_load((folder / mconfig.FILE).read_text())
        exports[f"export_{name}"] = (str(folder), args, EXPORT_LAYOUTS[name])
    for name, args in MEGATRON.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(args))
    models = {name: (args, LAYOUTS[name]) for name, args in MEGATRON.items()}
    plan = {"root": str(root), "ids": _ids(), "models": models, "exports": exports}
    mp.spawn(megatron_cpu.worker, args=(_port(), plan), nprocs=2)
    return {"root": root, "loom_logits": loom_logits}


def _megatron_logits(path: Path) -> torch.Tensor:
    return load_file(str(path))["logits"]


def _imported_model(checkpoint: Path) -> torch.nn.Module:
    from framework.convert.hf.convert import recipe_from_metadata

    state = read_model_state(checkpoint)
    model = build_model(recipe_from_metadata(state.meta, state.path).model)
    model.load_state_dict(state.tensors)
    return model


@pytest.mark.parametrize(
    "name,layout",
    [
        ("dense", "tp1"),
        ("dense", "tp2"),
        ("dense", "pp2"),
        ("moe", "tp1"),
        ("moe", "tp2"),
        ("moe", "ep2"),
        ("gpt2", "tp1"),
        ("gpt2", "tp2"),
        ("moe_sigmoid", "tp1"),
        ("moe_sigmoid", "ep2"),
    ],
)
def test_import_matches_megatron(world: dict[str, Any], tmp_path: Path, name: str, layout: str) -> None:
    root = world["root"]
    checkpoint = import_megatron(root / name / layout, tmp_path / "out", root / f"{name}.yaml")
    model = _imported_model(checkpoint)
    with routing_margins(model) as margins:
        ours = _loom_logits(model)
    reference = _megatron_logits(root / name / "logits.safetensors")
    assert reference.shape == (2, SEQ, VOCAB) and reference.abs().max() > 0.1
    assert (ours - reference).abs().max().item() <= TOL
    if name != "moe_sigmoid":  # the helper measures softmax gaps; sigmoid + bias + groups choose differently
        assert all(m > 1e-4 for m in margins)  # routing decisions are not within rounding of a tie
    assert (tmp_path / "out" / "recipe.yaml").is_file()


@pytest.mark.parametrize(
    "name,layout",
    [
        ("dense", "tp1"),
        ("dense", "tp2"),
        ("moe", "tp1"),
        ("moe", "tp2"),
        ("moe", "ep2"),
        ("moe_sigmoid", "tp1"),
    ],
)
def test_export_runs_in_megatron(world: dict[str, Any], name: str, layout: str) -> None:
    theirs = _megatron_logits(world["root"] / f"export_{name}_{layout}.safetensors")
    assert (theirs - world["loom_logits"][name]).abs().max().item() <= TOL


def test_export_loads_into_megatron_pipeline_stages(world: dict[str, Any]) -> None:
    """Each PP2 stage of megatron's GPTModel (its own layers, embedding or head) loads the dense export strictly
    (megatron_cpu.load: nothing but `_extra_state` absent, nothing left over)."""
    assert all((world["root"] / f"export_dense_pp2_rank{r}.loaded").is_file() for r in range(2))


def test_export_of_import_reproduces_megatron_tensors(world: dict[str, Any], tmp_path: Path) -> None:
    """Same keys, shapes and values as megatron-core's own TP1 save: the export writes megatron's names. (Not the
    MoE model: it uses rotary_interleaved, and exports always write the default half-split RoPE layout.)"""
    root = world["root"]
    for name in ("dense", "gpt2"):
        checkpoint = import_megatron(root / name / "tp1", tmp_path / name, root / f"{name}.yaml")
        folder = export_megatron(checkpoint, tmp_path / f"{name}_back")
        original, back = torch_dist.read_tensors(root / name / "tp1"), torch_dist.read_tensors(folder)
        assert sorted(original) == sorted(back)
        assert all(torch.equal(original[k], back[k]) for k in original)


def _renamed(tensors: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The Transformer Engine MoE spec's module names for the norms, one key per layer and per expert."""
    out = {}
    names = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}  # fmt: skip
    for key, tensor in tensors.items():
        if not key.startswith("decoder.layers."):
            out[key] = tensor
            continue
        rest = key.removeprefix("decoder.layers.")
        for i in range(n_layers):
            if rest.startswith("mlp.experts.experts."):
                for e, expert in enumerate(tensor[i]):
                    out[f"decoder.layers.{i}.mlp.experts.experts.{e}.{rest.split('.', 3)[3]}"] = expert
            else:
                out[f"decoder.layers.{i}.{names.get(rest, rest)}"] = tensor[i]
    return out


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_te_spec_names_and_per_layer_keys(world: dict[str, Any], tmp_path: Path, name: str) -> None:
    root = world["root"]
    tensors = torch_dist.read_tensors(root / name / "tp1")
    renamed = _renamed(tensors, 2)
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in renamed
    torch_dist.write_tensors(renamed, tmp_path / "te")
    cfg, state = read_megatron(tmp_path / "te", root / f"{name}.yaml")
    model = build_model(cfg)
    model.load_state_dict(state)
    ours = _loom_logits(model)
    assert (ours - _megatron_logits(root / name / "logits.safetensors")).abs().max().item() <= TOL


def test_cli_import(world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = world["root"]
    args = ["convert", str(root / "dense" / "pp2"), "--from", "megatron", str(tmp_path / "out"),
            "--megatron-config", str(root / "dense.yaml")]  # fmt: skip
    assert cli_main(args) == 0
    assert "loom train" in capsys.readouterr().out
    # the training resume path (Checkpointer, as `loom train OUT/recipe.yaml --resume auto`) loads the import
    recipe = load_recipe(tmp_path / "out" / "recipe.yaml")
    module = TrainModule(random_model(recipe.model, seed=9), recipe, torch.device("cpu"))
    checkpointer, trainer = Checkpointer(recipe, resume="auto"), Trainer(module, [], [], recipe)
    checkpointer.on_fit_start(trainer)
    checkpointer.on_close(trainer)  # restores the signal handlers
    reference = _megatron_logits(root / "dense" / "logits.safetensors")
    assert (_loom_logits(module.model) - reference).abs().max().item() <= TOL
    # no YAML and no Megatron-LM args: one line on stderr, exit 2
    assert cli_main(["convert", str(root / "dense" / "pp2"), "--from", "megatron", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "megatron-config" in err and err.count("\n") == 1


def test_cli_export_and_refusal(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = world["root"] / "loom_dense" / "checkpoints"
    assert cli_main(["convert", str(checkpoint), "--to", "megatron", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / mconfig.FILE).is_file() and (tmp_path / "m" / "metadata.json").is_file()
    assert cli_main(["convert", str(checkpoint), "--to", "megatron", str(tmp_path / "m")]) == 2  # not empty
    cfg = ModelConfig(**_LOOM | {"sliding_window": 4})
    write_imported(cfg, random_model(cfg).state_dict(), tmp_path / "windowed", None)
    capsys.readouterr()
    assert (
        cli_main(
            ["convert", str(tmp_path / "windowed" / "checkpoints"), "--to", "megatron", str(tmp_path / "w")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model.sliding_window" in err and err.count("\n") == 1 and not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------ refusals, pickle policy


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("transformer_config", "multi_latent_attention", True),
        ("gpt_model", "rotary_percent", 0.5),
        ("transformer_config", "softmax_type", "learnable"),
        ("transformer_config", "normalization", "L2Norm"),
        ("transformer_config", "add_qkv_bias", True),
        ("gpt_model", "position_embedding_type", "yarn"),
    ],
)
def test_import_refuses_unrepresentable_config(section: str, key: str, value: Any) -> None:
    args = {s: dict(v) for s, v in MEGATRON["dense"].items()}
    args[section][key] = value
    with pytest.raises(ConfigError, match=key):
        mconfig.model_config(args)


def test_import_leaves_optimizer_state_and_refuses_mtp(world: dict[str, Any], tmp_path: Path) -> None:
    """Megatron-LM saves optimizer moments (and RNG state) in the same checkpoint: not read; MTP layers refused."""
    root = world["root"]
    tensors = torch_dist.read_tensors(root / "dense" / "tp1")
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    tensors[f"optimizer.state.exp_avg.{qkv}"] = torch.full_like(tensors[qkv], float("nan"))
    torch_dist.write_tensors(tensors, tmp_path / "with_optimizer")
    cfg, state = read_megatron(tmp_path / "with_optimizer", root / "dense.yaml")
    model = build_model(cfg)
    model.load_state_dict(state)
    assert (_loom_logits(model) - _megatron_logits(root / "dense" / "logits.safetensors")).abs().max() <= TOL
    tensors["mtp.layers.0.enorm.weight"] = torch.ones(32)
    torch_dist.write_tensors(tensors, tmp_path / "with_mtp")
    with pytest.raises(ConfigError, match=r"mtp\.layers\.0\.enorm\.weight.*multi-token prediction"):
        read_megatron(tmp_path / "with_mtp", root / "dense.yaml")


def test_import_refuses_a_config_that_does_not_fit_the_tensors(world: dict[str, Any], tmp_path: Path) -> None:
    args = {s: dict(v) for s, v in MEGATRON["dense"].items()}
    args["transformer_config"]["num_attention_heads"] = (
        8  # 2 x (4 + 2) x 4 = 48 qkv rows, the checkpoint has 64
    )
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(args))
    with pytest.raises(
        ConfigError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight = \(64, 32\)"
    ):
        read_megatron(world["root"] / "dense" / "tp1", tmp_path / "wrong.yaml")


def test_import_refuses_tensors_loom_lacks(world: dict[str, Any], tmp_path: Path) -> None:
    root = world["root"]
    tensors = torch_dist.read_tensors(root / "dense" / "tp1")
    tensors["decoder.layers.self_attention.linear_qkv.bias"] = torch.zeros(2, 64)
    torch_dist.write_tensors(tensors, tmp_path / "bias")
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.bias"):
        read_megatron(tmp_path / "bias", root / "dense.yaml")
    moe = torch_dist.read_tensors(root / "moe" / "tp1")
    moe["decoder.layers.mlp.experts.weight1"] = torch.zeros(2, 32, 4 * 48)
    torch_dist.write_tensors(moe, tmp_path / "grouped")
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.mlp\.experts\.weight1.*legacy grouped-GEMM"):
        read_megatron(tmp_path / "grouped", root / "moe.yaml")


@pytest.mark.parametrize(
    "field,value",
    [("sliding_window", 4), ("position", "alibi"), ("norm_position", "post"), ("gelu_approximate", "tanh"),
     ("bias_scope", "qkv"),  # Qwen2's q/k/v-only biases (with bias: true)
     ("norm_weight_offset", True), ("sandwich_norm", True), ("embedding_scale", "sqrt_d_model"),
     ("final_logit_softcap", 30.0), ("attention_softcap", 50.0), ("norm_position", "reordered"),
     ("qk_norm_scope", "projection"),  # OLMo 2's norms
     ("attention_sinks", True), ("mlp", "clamped_swiglu")],  # gpt-oss's
)  # fmt: skip
def test_export_refuses_what_megatron_cannot_hold(field: str, value: Any) -> None:
    extra = {"qk_norm": True} if field == "qk_norm_scope" else {}
    cfg = ModelConfig(**_LOOM | {field: value, "bias": field == "bias_scope"} | extra)
    cfg.validate()
    with pytest.raises(ConfigError, match=f"model.{field}"):
        mconfig.megatron_args(cfg)


def test_export_refuses_a_fixed_expert_bias() -> None:
    """An imported GLM-4.5 router's fixed selection bias (moe.expert_bias, no update rate) has no megatron home
    in Loom's mapping, which carries megatron's expert bias only with moe_router_bias_update_rate."""
    moe = MoEConfig(n_experts=4, top_k=2, expert_hidden=16, router="sigmoid", expert_bias=True)
    cfg = ModelConfig(**_LOOM | {"moe": moe})
    cfg.validate()
    with pytest.raises(ConfigError, match="model.moe.expert_bias"):
        mconfig.megatron_args(cfg)


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path("/nonexistent-dir-loom/unpickled"),))


def test_pickles_are_never_loaded(world: dict[str, Any], tmp_path: Path) -> None:
    """With a YAML, common.pt is not read at all; a `.metadata` naming any global outside DCP's classes is
    refused."""
    root = world["root"]
    folder = tmp_path / "ckpt"
    torch_dist.write_tensors(torch_dist.read_tensors(root / "dense" / "tp1"), folder)
    (folder / torch_dist.COMMON_FILE).write_bytes(pickle.dumps({"args": _Boom()}))
    read_megatron(folder, root / "dense.yaml")  # would raise (no such folder) if common.pt were unpickled
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ConfigError, match="refused global"):
        read_megatron(folder, root / "dense.yaml")


def _megatron_lm_args() -> argparse.Namespace:
    """What Megatron-LM's pretrain_gpt.py would hold in `args` for the dense model (names from its arguments.py),
    with some of the unrelated arguments and a megatron enum, as a real common.pt has."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=2, hidden_size=32, num_attention_heads=4, group_query_attention=True, num_query_groups=2,
        ffn_hidden_size=48, normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, padded_vocab_size=VOCAB, max_position_embeddings=32,
        position_embedding_type="rope", rotary_base=500, rotary_percent=1.0, use_rope_scaling=False,
        untie_embeddings_and_output_weights=True, num_experts=None, attention_backend=AttnBackend.auto,
        params_dtype=torch.float32, tensor_model_parallel_size=2, lr=3e-4, transformer_impl="local",
    )  # fmt: skip


def _with_common(world: dict[str, Any], tmp_path: Path, common: dict[str, Any]) -> Path:
    folder = tmp_path / "iter_0000010"
    shutil.copytree(world["root"] / "dense" / "tp2", folder)
    torch.save(common, folder / torch_dist.COMMON_FILE)
    return folder


def test_import_reads_megatron_lm_args(world: dict[str, Any], tmp_path: Path) -> None:
    """No YAML: the model comes from Megatron-LM's `args` in common.pt (weights_only=True, allowlist); the save
    folder resolves to its latest iteration."""
    common = {"args": _megatron_lm_args(), "checkpoint_version": 3.0, "iteration": 10}
    _with_common(world, tmp_path, common)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    cfg, state = read_megatron(tmp_path)
    model = build_model(cfg)
    model.load_state_dict(state)
    reference = _megatron_logits(world["root"] / "dense" / "logits.safetensors")
    assert (_loom_logits(model) - reference).abs().max().item() <= TOL


def test_common_pt_outside_the_allowlist_needs_trust(world: dict[str, Any], tmp_path: Path) -> None:
    folder = _with_common(world, tmp_path, {"args": _megatron_lm_args(), "extra": fractions.Fraction(1, 3)})
    with pytest.raises(ConfigError, match=r"fractions\.Fraction.*--trust-checkpoint"):
        read_megatron(folder)
    cfg, _ = read_megatron(folder, trust=True)
    assert cfg.n_layers == 2 and cfg.kv_heads == 2
    torch.save({"args": _Boom()}, folder / torch_dist.COMMON_FILE)
    with pytest.raises(ConfigError, match="getattr, which is outside the allowlist"):
        read_megatron(folder)  # refused before anything runs (the _Boom call would raise FileNotFoundError)
    torch.save({"iteration": 3}, folder / torch_dist.COMMON_FILE)
    with pytest.raises(ConfigError, match="no Megatron-LM `args`"):
        read_megatron(folder)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"layers": "mla"}, "model.layers.pattern"),
        ({"layers": "gdn"}, "model.layers.pattern"),
        ({"mtp": True}, "model.mtp"),
    ],
)
def test_export_refuses_blocks_megatron_mapping_lacks(model: dict[str, Any], key: str) -> None:
    """MLA / Gated DeltaNet blocks and MTP depths are refused by name (one ConfigError), not written as
    SelfAttention layers."""
    from framework.config.schema import GDNConfig, LayersConfig, MLAConfig, ModelConfig, MTPConfig
    from framework.convert.megatron.config import megatron_args

    fields: dict[str, Any] = {"d_model": 32, "n_heads": 4, "n_layers": 2, "ffn_hidden": 48}
    if model.get("layers") == "mla":
        fields |= {"layers": LayersConfig(pattern=["mla"]), "mla": MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4,
                   qk_rope_head_dim=4, v_head_dim=4)}  # fmt: skip
    if model.get("layers") == "gdn":
        fields |= {"layers": LayersConfig(pattern=["gdn", "attention"]), "gdn": GDNConfig(heads=2)}
    if model.get("mtp"):
        fields["mtp"] = MTPConfig(depth=1)
    with pytest.raises(ConfigError) as err:
        megatron_args(ModelConfig(**fields))
    assert err.value.key == key and "megatron" in err.value.rule


_MLA_PROBE = """
import os, sys, torch, torch.nn.functional as F, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
import megatron_cpu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig
megatron_cpu._parallel()
with megatron_cpu.cpu_redirect():
    config = MLATransformerConfig(
        num_layers=1, hidden_size=40, num_attention_heads=5, ffn_hidden_size=48, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, q_lora_rank=10, kv_lora_rank=12,
        qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, rope_type="rope", use_cpu_initialization=True)
    try:
        GPTModel(config, get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm"),
                 vocab_size=64, max_sequence_length=32, position_embedding_type="rope")
    except TypeError as error:
        print("REFUSED", error)
    else:
        print("BUILT")
"""


def test_megatron_core_cannot_build_mla_without_transformer_engine() -> None:
    """The gap the MLA refusals name, asserted against megatron-core 0.16.1 itself: its local spec's MLA does not
    construct (its DotProductAttention takes no k_channels). When a release builds it, this fails: map MLA then."""
    import subprocess

    probe = subprocess.run(
        [sys.executable, "-c", _MLA_PROBE, _HERE, str(_port())], capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in probe.stdout and "k_channels" in probe.stdout, probe.stdout + probe.stderr[-2000:]
    with pytest.raises(ConfigError) as err:
        mconfig.model_config({"transformer_config": dict(_TC, multi_latent_attention=True),
                              "gpt_model": MEGATRON["dense"]["gpt_model"], "layer_spec": {}})  # fmt: skip
    assert "Transformer Engine" in err.value.rule and "--from hf" in err.value.fix
