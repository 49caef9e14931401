"""Model arguments from a Megatron-LM checkpoint's `common.pt`, when no megatron_config.yaml is given.

`common.pt` is a torch pickle of the non-sharded state; Megatron-LM keeps its command-line `args` (an
argparse.Namespace) there, beside the iteration and scheduler state. It is read with
`torch.load(weights_only=True)` and an allowlist: argparse.Namespace and SimpleNamespace, plus the megatron-core
classes megatron itself allowlists for this file (megatron/core/safe_globals.py), which Loom does not need and
which are rebuilt as an inert placeholder (no megatron import, no code from the file runs). Any other global is
refused unless the user passes --trust-checkpoint, which unpickles the file fully.

Megatron-LM builds TransformerConfig from `args` by field name, with a few renames (core_transformer_config_from_args
in megatron/training/arguments.py) and passes GPTModel its own arguments (pretrain_gpt.py); `lm_sections`
reproduces both.
"""

from __future__ import annotations

import argparse
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from framework.checkpoint.verify import refused_global
from framework.config.errors import ConfigError, first_line
from framework.convert.megatron import config as mconfig

# megatron-core 0.16.1's own allowlist for common.pt (megatron/core/safe_globals.py), minus the stdlib classes
_PLACEHOLDERS = (
    "megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.enums.ModelType", "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic", "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.dtypes.UInt32DType", "_io.BytesIO", "signal.Signals",
)  # fmt: skip


class _Placeholder:
    """Stands in for an allowlisted object Loom does not read: accepts any constructor arguments and state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _fix(trust: bool) -> str:
    return "pass the model arguments with --megatron-config YAML (docs/megatron.md)" + (
        "" if trust else ", or --trust-checkpoint to unpickle common.pt fully (only for files you trust)"
    )


def read_lm_args(directory: Path, trust: bool) -> argparse.Namespace:
    """Megatron-LM's `args` from DIRECTORY/common.pt (ConfigError if absent or outside the allowlist)."""
    path = directory / "common.pt"
    if not path.is_file():
        raise ConfigError(
            None, "source", str(directory), "has no megatron_config.yaml and no common.pt", _fix(True)
        )
    common = _load(path, trust)
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace | types.SimpleNamespace):
        rule = "common.pt holds no Megatron-LM `args` (megatron-core alone saves none)"
        raise ConfigError(None, "source", str(directory), rule, _fix(True))
    return args


def _load(path: Path, trust: bool) -> Any:
    if trust:
        return _load_trusted(path)
    allowed = [argparse.Namespace, types.SimpleNamespace] + [(_Placeholder, name) for name in _PLACEHOLDERS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's text names the global ("Unsupported global: GLOBAL fractions.Fraction was not an allowed
        # global", "unsupported GLOBAL posix.system whose module posix is blocked") but also advises
        # weights_only=False: only the name is kept
        name = refused_global(str(error))
        if name is None:
            rule = "cannot be read with torch.load's restricted unpickler (an unsupported pickle)"
            raise ConfigError(None, "source", str(path), rule, _fix(False)) from None
        rule = f"refers to the global {name}, which is outside the allowlist for common.pt (not unpickled)"
        raise ConfigError(None, "source", str(path), rule, _refused_fix(name)) from None
    except (RuntimeError, EOFError, ValueError) as error:  # not a torch.save file: a bad zip, a cut pickle
        rule = f"is not a readable torch.save file ({type(error).__name__}: {first_line(error)})"
        fix = "copy the checkpoint again, or " + _fix(True)
        raise ConfigError(None, "source", str(path), rule, fix) from None


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as error:
        raise ConfigError(None, "--trust-checkpoint", True, f"common.pt needs a module: {error}",
                          "pip install -e '.[megatron]' (megatron-core), or pass --megatron-config") from None  # fmt: skip
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        rule = f"cannot be unpickled ({type(error).__name__}: {first_line(error)})"
        raise ConfigError(None, "source", str(path), rule, "copy the checkpoint again") from None


# modules whose globals run commands or code: a file asking for one is an attack, not an unusual checkpoint
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "builtins", "sys", "runpy", "importlib", "code", "pty")


def _refused_fix(name: str) -> str:
    if name.split(".")[0] not in _CODE_MODULES:
        return _fix(False)
    return _fix(True) + "; the file asks to run code: do not trust it (Megatron-LM saves no such object)"


def lm_sections(args: argparse.Namespace | types.SimpleNamespace) -> dict[str, dict[str, Any]]:
    """megatron_config.yaml sections equivalent to Megatron-LM's `args`."""
    ns = vars(args)
    names = (
        {"num_layers", "hidden_size", "num_attention_heads"} | set(mconfig.TC_DEFAULTS) | set(mconfig.REFUSED)
    )
    tc = {k: ns[k] for k in names if k in ns and k not in mconfig.GPT_DEFAULTS}
    tc["layernorm_epsilon"] = ns.get("norm_epsilon", 1e-5)
    tc["num_moe_experts"] = ns.get("num_experts")
    tc["num_query_groups"] = ns.get("num_query_groups") if ns.get("group_query_attention") else None
    tc["gated_linear_unit"] = bool(ns.get("swiglu"))
    tc["activation_func"] = _activation(ns)
    gpt = {
        "vocab_size": ns.get("padded_vocab_size"), "max_sequence_length": ns.get("max_position_embeddings"),
        "position_embedding_type": ns.get("position_embedding_type", "learned_absolute"),
        "rotary_base": ns.get("rotary_base", 10000), "rotary_percent": ns.get("rotary_percent", 1.0),
        "seq_len_interpolation_factor": ns.get("rotary_seq_len_interpolation_factor"),
        "rope_scaling": bool(ns.get("use_rope_scaling")), "rope_scaling_factor": ns.get("rope_scaling_factor", 8.0),
        "share_embeddings_and_output_weights": not ns.get("untie_embeddings_and_output_weights", False),
    }  # fmt: skip
    return {"transformer_config": tc, "gpt_model": gpt, "layer_spec": {}}


def _activation(ns: dict[str, Any]) -> str:
    """Megatron-LM's choice: swiglu -> silu, squared_relu, openai_gelu (tanh form), else exact gelu."""
    if ns.get("swiglu"):
        return "silu"
    if ns.get("squared_relu"):
        return "squared_relu"  # refused by model_config: Loom has no squared ReLU
    return "openai_gelu" if ns.get("openai_gelu") else "gelu"
