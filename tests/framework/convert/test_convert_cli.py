"""`loom convert` in-process: a training checkpoint -> sharded HF folder with tokenizer -> back to a checkpoint
that the training resume path loads; every bad input is one line on stderr with exit status 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from framework.checkpoint import get_rng_state, save_checkpoint
from framework.config.loader import load_recipe, recipe_to_dict
from framework.config.schema import ModelConfig, Recipe
from framework.train import TrainModule
from framework.train.callbacks.checkpointer import Checkpointer
from framework.train.trainer import Trainer
from launcher.cli import EXIT_USER_ERROR, main
from tests.framework.convert.conftest import CONFIGS, random_model


def write_checkpoint(cfg: ModelConfig, root: Path, tokenizer: Path, seed: int = 0) -> torch.nn.Module:
    """A checkpoint as training writes it (TrainModule state + the Checkpointer's metadata), at step 0."""
    recipe = Recipe(model=cfg)
    recipe.data.tokenizer = str(tokenizer)
    recipe.data.seq_len = 32
    model = random_model(cfg, seed)
    module = TrainModule(model, recipe, torch.device("cpu"))
    meta = {"tokens": 0, "recipe": recipe_to_dict(recipe), "data_state": None,
            "rng": get_rng_state(torch.device("cpu")), "callbacks": {}}  # fmt: skip
    save_checkpoint(root, 0, module.state_dict(), meta)
    return model


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result: tuple[int, str, str], expected: str) -> None:
    code, out, err = result
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("loom: error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err


def test_export_sharded_then_import_and_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    cfg = dataclasses.replace(CONFIGS["llama"], vocab_size=4100)  # covers the demo tokenizer (4096 pieces)
    model = write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model")
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    code, out, err = run(
        capsys, "convert", tmp_path / "ckpt", "--to", "hf", hf_dir, "--max-shard-size", "100KB"
    )
    assert code == 0, err
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded below the threshold
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 1

    code, out, err = run(capsys, "convert", hf_dir, "--from", "hf", back)
    assert code == 0, err
    recipe = load_recipe(back / "recipe.yaml")
    assert recipe.model == cfg and Path(recipe.data.tokenizer).is_file()
    # the training resume path (Checkpointer, as `loom train --resume auto`) loads the imported checkpoint
    module = TrainModule(random_model(cfg, seed=9), recipe, torch.device("cpu"))
    checkpointer, trainer = Checkpointer(recipe, resume="auto"), Trainer(module, [], [], recipe)
    checkpointer.on_fit_start(trainer)
    checkpointer.on_close(trainer)  # restores the signal handlers
    for key, tensor in model.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], tensor), key


def test_tokenizer_ids_equal_sentencepiece_on_the_corpus(tmp_path: Path, demo_data: Path) -> None:
    from framework.convert.hf.tokenizer import save_hf_tokenizer
    from framework.data.demo import collect_documents
    from framework.data.tokenizer import Tokenizer

    save_hf_tokenizer(demo_data / "tokenizer.model", tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    sp = Tokenizer(demo_data / "tokenizer.model")
    # (a user-defined piece directly followed by text is the known difference: HF adds a dummy prefix there)
    extra = [
        "bytes: ☃ 𝔘 日本語 \x01 ok",
        "digits 12345",
        "fill the <mask>",
        "x <extra_id_0>",
        "  two  spaces\n\tend ",
    ]
    texts = collect_documents() + extra
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == sp.encode_batch(texts)
    assert any(
        sp.id_to_piece(i).startswith("<0x") for i in sp.encode(extra[0])
    )  # byte fallback was exercised
    # special tokens: the same ids, and decoding skips them as sentencepiece does
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.bos_token_id) == (0, 1, 2, 3)
    assert hf.mask_token_id == sp.mask_id and hf.convert_tokens_to_ids("<extra_id_0>") == sp.sentinel_ids[0]
    ids = sp.encode(extra[0])
    assert hf.decode([sp.bos_id, *ids, sp.eos_id], skip_special_tokens=True) == sp.decode(ids)


def test_missing_and_incomplete_checkpoints(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert_user_error(
        run(capsys, "convert", tmp_path / "nope", "--to", "hf", tmp_path / "o"), "no such checkpoint"
    )
    (tmp_path / "step_00000005").mkdir()
    result = run(capsys, "convert", tmp_path / "step_00000005", "--to", "hf", tmp_path / "o")
    assert_user_error(result, "COMPLETE")


def test_unrepresentable_architecture_lists_fields(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    cfg = dataclasses.replace(CONFIGS["llama"], soft_distance_bias=True, learned_temperature=True)
    write_checkpoint(cfg, tmp_path / "ckpt", demo_data / "tokenizer.model")
    result = run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "o")
    assert_user_error(result, "model.soft_distance_bias=True")
    assert "model.learned_temperature=True" in result[2] and not (tmp_path / "o").exists()


def test_tokenizer_larger_than_vocab(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: Path
) -> None:
    write_checkpoint(CONFIGS["llama"], tmp_path / "ckpt", demo_data / "tokenizer.model")  # vocab 101 < 4096
    assert_user_error(
        run(capsys, "convert", tmp_path / "ckpt", "--to", "hf", tmp_path / "o"), "model.vocab_size=101"
    )


def _hf_folder(tmp_path: Path) -> Path:
    from framework.convert.hf.convert import save_hf

    cfg = CONFIGS["qwen3"]
    save_hf(cfg, random_model(cfg).state_dict(), tmp_path / "hf")
    return tmp_path / "hf"


def test_import_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_user_error(
        run(capsys, "convert", tmp_path / "empty", "--from", "hf", tmp_path / "o"), "no config.json"
    )
    hf = _hf_folder(tmp_path)
    weights = load_file(hf / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, hf / "model.safetensors")
    assert_user_error(
        run(capsys, "convert", hf, "--from", "hf", tmp_path / "o"), "missing model.layers.1.mlp"
    )
    save_file({**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, hf / "model.safetensors")
    assert_user_error(run(capsys, "convert", hf, "--from", "hf", tmp_path / "o"), "has shape (3, 3)")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "opt"}))
    assert_user_error(run(capsys, "convert", hf, "--from", "hf", tmp_path / "o"), "model_type")
