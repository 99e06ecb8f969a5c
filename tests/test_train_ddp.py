"""DDP in the training harness: the probe for parameters without gradient and the wrap it decides.

The wrap is checked in this process with a one-rank gloo group: DDP's reducer works as with more
ranks, so a plain wrap of a model with an unused parameter fails on its second step here too.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from examples.harness.checkpoint import get_rng_state
from examples.harness.distributed import (
    Dist,
    params_without_grad,
    unused_on_any_rank,
    wrap_ddp,
)
from torch import Tensor, nn


class _Toy(nn.Module):
    """conv -> BN -> dropout -> linear; ``spare`` (a head nobody calls) when asked."""

    def __init__(self, spare: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 2) if spare else None
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.norm(self.conv(x))).mean((2, 3))
        return self.head(self.frozen(x))


def _loss(model: nn.Module) -> Tensor:
    x = torch.rand(4, 3, 6, 6)  # draws from the RNG: the probe must put it back
    return F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))


def _rng_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) if isinstance(x, Tensor) else x == y
               for x, y in zip(a.values(), b.values()))


def test_probe_finds_the_unused_parameters_and_leaves_no_trace():
    model = _Toy(spare=True)
    model.norm.eval()  # a frozen-BN layout: the probe must not flip it to train mode
    model.head.weight.grad = torch.full_like(model.head.weight, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.random()
    np.random.rand()
    rng = get_rng_state()
    assert params_without_grad(model, _loss) == ["spare.weight", "spare.bias"]
    assert _rng_equal(get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True]
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 3.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")


def test_probe_restores_running_statistics_that_training_would_change():
    model = _Toy(spare=False)
    means = model.norm.running_mean.clone()
    _loss(model)  # what the probe's pass does to BN when nothing puts it back
    assert not torch.equal(model.norm.running_mean, means)
    means = model.norm.running_mean.clone()
    count = int(model.norm.num_batches_tracked)
    assert params_without_grad(model, _loss) == []
    assert torch.equal(model.norm.running_mean, means)
    assert int(model.norm.num_batches_tracked) == count


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


def _two_steps(net: nn.Module) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(net).backward()
        optimizer.step()


@pytest.mark.parametrize("spare", [False, True])
def test_wrap_searches_for_unused_parameters_only_when_some_exist(one_rank_group, spare):
    model = _Toy(spare=spare)
    unused = unused_on_any_rank(model, params_without_grad(model, _loss), one_rank_group)
    assert unused == (["spare.weight", "spare.bias"] if spare else [])
    net = wrap_ddp(model, unused)
    assert net.find_unused_parameters is spare
    assert not net.static_graph
    _two_steps(net)
    assert model.spare is None or model.spare.weight.grad is None


def test_plain_wrap_of_a_model_with_an_unused_parameter_fails(one_rank_group):
    """The failure the probe prevents, so the test above can tell a wrong wrap from a right one."""
    with pytest.raises(RuntimeError, match="prior iteration"):
        _two_steps(wrap_ddp(_Toy(spare=True), []))
