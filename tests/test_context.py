"""ContextModule and identity_init_ against Yu & Koltun, ICLR 2016 (Table 1, eq. 4-5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import ContextModule, identity_init_
from dilconv.context import DEFAULT_NOISE_SCALE

PAPER_DILATIONS = (1, 1, 2, 4, 8, 16, 1, 1)
PAPER_RECEPTIVE_FIELDS = (3, 5, 9, 17, 33, 65, 67, 67)
PAPER_LARGE_MULTIPLIERS = (2, 2, 4, 8, 16, 32, 32, 1)

channels = st.integers(1, 6)
sizes = st.integers(1, 19)


def noise_error_std(module: ContextModule) -> float:
    """First-order bound on the std of ``module(x) - x`` for ``0 <= x <= 1`` at init.

    Layer i (c_i -> c_{i+1} maps, k_i taps) adds noise of std ``s C / c_{i+1}`` to each of its
    fewer than ``k_i c_i`` off-identity weights, each multiplying an activation of at most
    ``C / c_i`` (the identity path spreads a map over ``c_i / C`` equal shares). The ``c_{i+1} / C``
    output maps of one group add up into one output map downstream, so layer i contributes a
    variance of at most ``s^2 k_i C^3 / (c_i c_{i+1})``; ReLU of a non-negative signal plus
    noise moves it by no more than the noise.
    """
    c = module.out_channels
    variance = 0.0
    for conv in module.convs:
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        variance += DEFAULT_NOISE_SCALE**2 * taps * c**3 / (conv.in_channels * conv.out_channels)
    return math.sqrt(variance)


@settings(max_examples=20, deadline=None)
@given(c=channels, h=sizes, w=sizes, n=st.integers(1, 2))
def test_basic_module_is_identity_on_non_negative_input(c: int, h: int, w: int, n: int) -> None:
    module = ContextModule(c)
    x = torch.rand(n, c, h, w)
    with torch.no_grad():
        assert torch.allclose(module(x), x, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(c=st.integers(1, 4), h=sizes, w=sizes, seed=st.integers(0, 2**16))
def test_large_module_is_identity_up_to_the_init_noise(c: int, h: int, w: int, seed: int) -> None:
    torch.manual_seed(seed)
    module = ContextModule(c, "large")
    x = torch.rand(2, c, h, w)
    with torch.no_grad():
        error = module(x) - x
    std = noise_error_std(module)
    # Only a tail bound here: over a few elements (h = w = 1) the sample RMS of a normal error
    # exceeds its standard deviation often; the size of the noise is tested on a large map below.
    assert error.abs().max() <= 6 * std


def test_large_module_noise_is_present_and_of_the_predicted_size() -> None:
    torch.manual_seed(0)
    module = ContextModule(4, "large")
    x = torch.rand(2, 4, 21, 23)
    with torch.no_grad():
        rms = (module(x) - x).pow(2).mean().sqrt()
    assert 0.1 * noise_error_std(module) <= rms <= noise_error_std(module)


@pytest.mark.parametrize("c", [1, 3])
def test_large_module_without_noise_is_exactly_identity(c: int) -> None:
    module = ContextModule(c, "large")
    for conv in module.convs:
        identity_init_(conv, base_channels=c, noise_std=0.0)
    x = torch.rand(1, c, 11, 9)
    with torch.no_grad():
        assert torch.allclose(module(x), x, atol=1e-6)


def test_negative_input_is_not_passed_unchanged() -> None:
    module = ContextModule(3)
    x = -torch.rand(1, 3, 8, 8) - 0.1
    with torch.no_grad():
        y = module(x)
    assert not torch.allclose(y, x, atol=1e-6)
    assert torch.all(y == 0)


@settings(max_examples=15, deadline=None)
@given(c=st.integers(1, 64))
def test_basic_parameter_count(c: int) -> None:
    module = ContextModule(c, device="meta")
    assert sum(p.numel() for p in module.parameters()) == 64 * c**2 + 8 * c


@pytest.mark.parametrize("c", [1, 5])
def test_table1_dilations_and_widths(c: int) -> None:
    basic = ContextModule(c)
    large = ContextModule(c, "large", device="meta")
    for module in (basic, large):
        assert module.dilations == PAPER_DILATIONS
        assert tuple(conv.dilation for conv in module.convs) == tuple(
            (d, d) for d in PAPER_DILATIONS
        )
        assert tuple(conv.padding for conv in module.convs[:7]) == tuple(
            (d, d) for d in PAPER_DILATIONS[:7]
        )
        assert [conv.kernel_size for conv in module.convs] == [(3, 3)] * 7 + [(1, 1)]
        assert all(conv.bias is not None for conv in module.convs)
        assert module.widths == tuple(conv.out_channels for conv in module.convs)
        assert module.convs[0].in_channels == c
    assert basic.widths == (c,) * 8
    assert large.widths == tuple(m * c for m in PAPER_LARGE_MULTIPLIERS)


def test_receptive_fields_match_table1_and_the_gradient() -> None:
    module = ContextModule(1, identity_init=False)
    assert module.receptive_fields == PAPER_RECEPTIVE_FIELDS
    with torch.no_grad():
        for conv in module.convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    size = PAPER_RECEPTIVE_FIELDS[-1] + 4
    x = torch.rand(1, 1, size, size, requires_grad=True)
    module(x)[0, 0, size // 2, size // 2].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 == module.receptive_fields[-1]
    assert int(cols.max() - cols.min()) + 1 == module.receptive_fields[-1]


def test_state_dict_keys_are_stable() -> None:
    keys = list(ContextModule(2).state_dict())
    assert keys == [f"convs.{i}.{p}" for i in range(8) for p in ("weight", "bias")]


def test_num_classes_is_an_alias_of_channels() -> None:
    assert ContextModule(num_classes=7).out_channels == 7
    assert ContextModule(7, num_classes=7).widths == (7,) * 8
    with pytest.raises(ValueError, match="num_classes"):
        ContextModule(7, num_classes=8)
    with pytest.raises(ValueError, match="channels"):
        ContextModule()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"channels": 0}, ValueError, "channels"),
        ({"channels": -3}, ValueError, "channels"),
        ({"channels": 2.0}, TypeError, "channels"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"channels": 2, "variant": "huge"}, ValueError, "variant"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ContextModule(**kwargs)


def test_wrong_input_raises() -> None:
    module = ContextModule(3)
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        module(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        module(torch.rand(3, 8, 8))


def test_identity_init_off_uses_default_init() -> None:
    module = ContextModule(4, identity_init=False)
    x = torch.rand(1, 4, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(module(x), x, atol=1e-3)
    module.identity_init = True
    module.reset_parameters()
    with torch.no_grad():
        assert torch.allclose(module(x), x, atol=1e-6)


def test_meta_device_and_dtype() -> None:
    meta = ContextModule(8, "large", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    double = ContextModule(3, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    x = torch.rand(1, 3, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(double(x), x, atol=1e-12)


def test_identity_init_standalone_matches_eq5() -> None:
    conv = identity_init_(nn.Conv2d(2, 4, 3, padding=1), noise_std=0.0)
    expected = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5]])
    assert torch.equal(conv.weight[:, :, 1, 1].detach(), expected)
    assert torch.count_nonzero(conv.weight).item() == 4
    assert torch.all(conv.bias == 0)
    down = identity_init_(nn.Conv2d(6, 2, 1), noise_std=0.0)
    assert torch.equal(down.weight[:, :, 0, 0].detach(), torch.tensor([[1.0] * 3 + [0.0] * 3,
                                                                      [0.0] * 3 + [1.0] * 3]))


def test_identity_init_basic_is_eq4() -> None:
    conv = identity_init_(nn.Conv2d(5, 5, 3, padding=2, dilation=2))
    expected = torch.zeros(5, 5, 3, 3)
    expected[:, :, 1, 1] = torch.eye(5)
    assert torch.equal(conv.weight.detach(), expected)
    x = torch.randn(2, 5, 9, 6)
    with torch.no_grad():
        assert torch.allclose(conv(x), x, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(base=st.integers(1, 4), m_in=st.integers(1, 4), m_out=st.integers(1, 4))
def test_identity_init_keeps_group_sums(base: int, m_in: int, m_out: int) -> None:
    c_in, c_out = base * m_in, base * m_out
    conv = identity_init_(nn.Conv2d(c_in, c_out, 3, padding=1), base_channels=base,
                          noise_std=0.0)
    x = torch.rand(1, c_in, 5, 4)
    with torch.no_grad():
        y = conv(x)
    in_sums = x.reshape(1, base, m_in, 5, 4).sum(2)
    out_sums = y.reshape(1, base, m_out, 5, 4).sum(2)
    assert torch.allclose(out_sums, in_sums, atol=1e-5)


def test_identity_init_noise_level_and_generator() -> None:
    def init(seed: int) -> nn.Conv2d:
        generator = torch.Generator().manual_seed(seed)
        return identity_init_(nn.Conv2d(16, 32, 3), base_channels=16, generator=generator)

    conv = init(0)
    weight = conv.weight.detach()
    on_pattern = torch.zeros_like(weight, dtype=torch.bool)
    on_pattern[:, :, 1, 1] = torch.arange(32)[:, None] // 2 == torch.arange(16)[None, :]
    assert torch.all(weight[on_pattern] == 16 / 32)
    noise = weight[~on_pattern]
    assert noise.std().item() == pytest.approx(DEFAULT_NOISE_SCALE * 16 / 32, rel=0.1)
    assert torch.equal(init(0).weight, conv.weight)
    assert not torch.equal(init(1).weight, conv.weight)
    explicit = identity_init_(nn.Conv2d(16, 32, 3), base_channels=16, noise_std=0.1)
    assert explicit.weight[~on_pattern].std().item() == pytest.approx(0.1, rel=0.1)


def test_identity_init_meta_is_a_no_op() -> None:
    conv = nn.Conv2d(4, 8, 3, device="meta")
    assert identity_init_(conv) is conv
    assert conv.weight.is_meta


@pytest.mark.parametrize(
    ("conv", "kwargs", "error", "match"),
    [
        (nn.Conv2d(4, 6, 3), {"base_channels": 4}, ValueError, "base_channels"),
        (nn.Conv2d(4, 4, 3), {"base_channels": 0}, ValueError, "base_channels"),
        (nn.Conv2d(4, 4, 3, groups=2), {}, ValueError, "groups"),
        (nn.Conv2d(4, 4, 2), {}, ValueError, "odd kernel"),
        (nn.Conv2d(4, 4, 3), {"noise_std": -1.0}, ValueError, "noise_std"),
        (nn.Linear(4, 4), {}, TypeError, "Conv2d"),
    ],
)
def test_identity_init_bad_arguments(
    conv: nn.Module, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        identity_init_(conv, **kwargs)
