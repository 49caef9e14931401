import torch
from torch import nn

from framework.config import OptimConfig
from framework.train.optim import build_optimizer, split_decay_groups, use_fused


class Net(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 4)
        self.pos_embeddings = nn.Parameter(torch.zeros(6, 4))  # a bare table, recognised by its name
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gain = nn.Parameter(torch.ones(4))
        self.output = nn.Linear(4, 10, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight


def test_only_matrices_are_decayed_and_embeddings_on_request():
    decay, no_decay = split_decay_groups(Net(), decay_embeddings=False)
    assert decay == ["proj.weight", "output.weight"]
    assert set(no_decay) == {
        "tok_embeddings.weight", "pos_embeddings", "proj.bias", "norm.weight", "norm.bias", "gain",
    }  # fmt: skip
    decay, no_decay = split_decay_groups(Net(), decay_embeddings=True)
    assert set(decay) == {"tok_embeddings.weight", "pos_embeddings", "proj.weight", "output.weight"}
    assert set(no_decay) == {"proj.bias", "norm.weight", "norm.bias", "gain"}


def test_tied_weight_appears_once():
    decay, no_decay = split_decay_groups(Net(tie=True), decay_embeddings=False)
    names = decay + no_decay
    assert len(names) == len(set(names))
    assert "tok_embeddings.weight" in no_decay and "output.weight" not in names


def test_decay_applies_to_decayed_group_only():
    """With zero gradients Adam's update is 0, so one step only applies decay: p *= 1 - lr * wd."""
    net = Net()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5)
    optimizer = build_optimizer(net, cfg, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert optimizer.param_groups[0]["betas"] == cfg.betas and optimizer.param_groups[0]["eps"] == cfg.eps
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in net.named_parameters():
        if name in ("proj.weight", "output.weight"):
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[name]), name


def test_fused_defaults_to_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_fused(OptimConfig(fused=None), cuda) is True
    assert use_fused(OptimConfig(fused=None), cpu) is False
    assert use_fused(OptimConfig(fused=False), cuda) is False
    optimizer = build_optimizer(Net(), OptimConfig(fused=True), cpu)  # torch has a fused CPU kernel too
    assert all(g["fused"] for g in optimizer.param_groups)
