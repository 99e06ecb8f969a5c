"""The numbers docs/guides/own_model.rst states about initialisation, measured on the real modules.

Each test reads the number from the guide's sentence and measures it, so the sentence cannot
drift from the code: CBAM's RMS ratio and gates at init (alone and after every stage of a
torchvision ResNet-50), and the image sizes at which a batch-1 ``BiFPN(num_levels=5)`` has a
one-pixel P7 that BatchNorm refuses in train mode, with each remedy the guide gives.
"""

from __future__ import annotations

import copy
import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv import CBAM, BiFPN

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "own_model.rst"
STAGES = ("layer1", "layer2", "layer3", "layer4")


def stated(pattern: str) -> tuple[str, ...]:
    """The groups of ``pattern`` in the guide, with its line breaks read as spaces."""
    text = " ".join(GUIDE.read_text(encoding="utf-8").split())
    found = re.search(pattern, text)
    assert found is not None, f"the guide no longer says {pattern!r}"
    return found.groups()


def rms(t: Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


# --- CBAM -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_cbam_ratio_and_gates_at_init_are_what_the_guide_says():
    (ratio,) = map(float, stated(r"output has about (0\.\d+) of its input's RMS"))
    (gate,) = map(float, stated(r"Both gates average (0\.\d+)"))
    ratios, channel_gates, spatial_gates = [], [], []
    for channels in (16, 64, 256, 2048):
        for seed in range(3):
            torch.manual_seed(seed)
            cbam = CBAM(channels)
            x = torch.randn(4, channels, 14, 14)
            refined = cbam.channel(x)
            out = cbam.spatial(refined)
            assert torch.equal(out, cbam(x))
            ratios.append(rms(out) / rms(x))
            kept = x.abs() > 1e-3  # gate = out / in, read where the division is well defined
            channel_gates.append((refined / x)[kept].mean().item())
            spatial_gates.append((out / refined)[kept].mean().item())
    mean = sum(ratios) / len(ratios)
    assert abs(mean - ratio) <= 0.02, f"measured {mean:.3f}, the guide says {ratio}"
    assert 0.2 < min(ratios) and max(ratios) < 0.4
    for gates in (channel_gates, spatial_gates):
        assert abs(sum(gates) / len(gates) - gate) <= 0.03


def with_cbam_after_every_stage(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name in STAGES:
        stage = getattr(model, name)
        setattr(model, name, nn.Sequential(stage, CBAM(stage[-1].conv3.out_channels)))
    return model


def levels(model: nn.Module, x: Tensor) -> list[Tensor]:
    """C2-C5 of a torchvision ResNet."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for name in STAGES:
        x = getattr(model, name)(x)
        out.append(x)
    return out


@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_cbam_after_every_resnet50_stage_is_what_the_guide_says():
    low, high = map(float, stated(r"every level C2-C5 has (0\.\d+) to (0\.\d+) of the RMS"))
    c4, c5 = map(float, stated(r"C4 keeps about ([\d.]+) % of its RMS and C5 about ([\d.]+) %"))
    for seed in (0, 1):
        torch.manual_seed(seed)
        plain = resnet50()
        gated = with_cbam_after_every_stage(plain)
        x = torch.randn(2, 3, 64, 64)
        train = [rms(a) / rms(p) for a, p in zip(levels(copy.deepcopy(gated).train(), x),
                                                  levels(copy.deepcopy(plain).train(), x))]
        assert all(low - 0.03 <= r <= high + 0.03 for r in train), train
        evaluated = [rms(a) / rms(p) for a, p in zip(levels(gated.eval(), x),
                                                      levels(plain.eval(), x))]
        assert evaluated == sorted(evaluated, reverse=True)  # the factors multiply
        for measured, percent in zip(evaluated[2:], (c4, c5)):
            assert percent / 2 <= 100 * measured <= 2 * percent, evaluated


# --- BiFPN's one-pixel P7 -------------------------------------------------------------------


CHANNELS = [8, 16, 32]


def features(batch: int, p3: int) -> list[Tensor]:
    """C3-C5 with a P3 of ``p3 x p3``, each next level half as large (rounded up)."""
    return [torch.randn(batch, c, -(-p3 // 2**i), -(-p3 // 2**i)) for i, c in enumerate(CHANNELS)]


def neck(**kwargs) -> BiFPN:
    torch.manual_seed(0)
    return BiFPN(CHANNELS, out_channels=16, num_layers=1, num_levels=5, **kwargs)


def test_guide_states_the_bifpn_threshold_it_measures():
    p3, image = map(int, stated(r"one pixel whenever P3 is at most (\d+)x\1, which is images "
                                r"up to (\d+)x\2 pixels for a backbone whose P3 has stride 8"))
    assert math.ceil(image / 8) == p3 and math.ceil((image + 1) / 8) == p3 + 1
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        neck()(features(1, p3))
    out = neck()(features(1, p3 + 1))
    assert out[-1].shape[-2:] == (2, 2)


@pytest.mark.parametrize("p3", [1, 2, 8, 15, 16])
def test_batch_one_fails_exactly_where_p7_is_one_pixel(p3):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        neck()(features(1, p3))


@pytest.mark.parametrize("p3", [17, 20, 32])
def test_batch_one_runs_where_p7_is_larger(p3):
    out = neck()(features(1, p3))
    assert out[-1].shape[-2:] == (-(-p3 // 16),) * 2


REMEDIES = {
    "batch of two": lambda: neck()(features(2, 8)),
    "group norm": lambda: neck(norm_layer=partial(nn.GroupNorm, 4))(features(1, 8)),
    "frozen batch norm": lambda: neck(norm_layer=FrozenBatchNorm2d)(features(1, 8)),
    "eval-mode batch norm": lambda: eval_norms(neck())(features(1, 8)),
}


def eval_norms(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return module


@pytest.mark.parametrize("name", [*REMEDIES])
def test_each_remedy_trains(name):
    out = REMEDIES[name]()
    assert [tuple(o.shape[-2:]) for o in out] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    loss = sum(o.sum() for o in out)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in out)
