"""Round trip of a real TrainModule through a checkpoint: model, optimizer, scheduler, scaler and counters."""

import copy

import torch
from torch import nn

from framework.checkpoint import load_checkpoint, save_checkpoint
from framework.config import Recipe
from framework.train import TrainModule


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.output = nn.Linear(8, 16)

    def forward(self, input_ids, **kwargs):
        return self.output(self.norm(self.tok_embeddings(input_ids)))


def _recipe(tmp_path) -> Recipe:
    recipe = Recipe()
    recipe.logging.run_dir = str(tmp_path)
    recipe.precision.dtype = "fp16"
    recipe.precision.loss_scale_init = 256.0
    recipe.precision.loss_scale_growth_interval = 2
    recipe.schedule.warmup_steps = 2
    recipe.train.steps = 10
    return recipe


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (2, 5), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 16, (2, 5), generator=g)}


def _step(module: TrainModule, seed: int) -> dict:
    module.train_batch([_batch(seed)])
    return module.optim_step()


def _assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_round_trip_restores_everything_exactly(tmp_path):
    torch.manual_seed(0)
    source = TrainModule(Net(), _recipe(tmp_path), "cpu")
    for seed in range(3):
        _step(source, seed)
    assert source.precision.scaler.get_scale() == 512.0  # grown once: not the initial scaler state
    expected = copy.deepcopy(source.state_dict())
    save_checkpoint(tmp_path / "ckpt", source.step, source.state_dict())

    torch.manual_seed(1)
    target = TrainModule(Net(), _recipe(tmp_path), "cpu")
    target.load_state_dict(load_checkpoint(tmp_path / "ckpt", template=target.state_dict()).state)
    _assert_same(target.state_dict(), expected)
    assert target.optimizer.param_groups[0]["betas"] == (0.9, 0.95)  # a tuple again after JSON
    assert target.lr == source.lr and target.scheduler.last_epoch == source.scheduler.last_epoch

    after_source, after_target = _step(source, 10), _step(target, 10)
    assert after_source == after_target
    _assert_same(target.state_dict(), source.state_dict())
