"""What necks accept as a pyramid (issue 21): any hashable keys, handed back as the caller gave
them; levels that get coarser from first to last, or an error naming the offending levels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilconv import BiFPN, FPNNeck

CHANNELS = [4, 8, 16]


def maps(sizes=(12, 6, 3)) -> list[torch.Tensor]:
    return [torch.randn(2, c, s, s + 1) for c, s in zip(CHANNELS, sizes, strict=True)]


def neck(kind: str, spec):
    if kind == "fpn":
        return FPNNeck(spec, 8).eval()
    return BiFPN(spec, 8, num_layers=1).eval()


KEYS = [
    pytest.param("fpn", ["c3", "c4", "c5"], id="fpn-str"),
    pytest.param("fpn", [3, 4, 5], id="fpn-int"),
    pytest.param("fpn", [("p", 3), ("p", 4), ("p", 5)], id="fpn-tuple"),
    pytest.param("bifpn", ["c3", "c4", "c5"], id="bifpn-str"),
    pytest.param("bifpn", [3, 4, 5], id="bifpn-int"),
]


@pytest.mark.parametrize("fixed", [False, True], ids=["channels-list", "channels-mapping"])
@pytest.mark.parametrize(("kind", "keys"), KEYS)
def test_the_callers_keys_come_back(kind, keys, fixed):
    spec = dict(zip(keys, CHANNELS, strict=True)) if fixed else CHANNELS
    module = neck(kind, spec)
    levels = maps()
    with torch.no_grad():
        out = module(dict(zip(keys, levels, strict=True)))
        expected = module(levels)
    assert list(out) == keys
    for got, ref in zip(out.values(), expected, strict=True):
        torch.testing.assert_close(got, ref)


def test_int_keys_fixed_by_in_channels_are_compared_as_given():
    module = FPNNeck({3: 4, 4: 8, 5: 16}, 8)
    expected = r"expected feature keys \[3, 4, 5\], got \['3', '4', '5'\]"
    with pytest.raises(ValueError, match=expected):
        module(dict(zip(["3", "4", "5"], maps(), strict=True)))


@pytest.mark.parametrize("kind", ["fpn", "bifpn"])
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((3, 6, 12), r"level 1 of size \(6, 7\) after level 0 of size \(3, 4\)"),
        ((12, 3, 6), r"level 2 of size \(6, 7\) after level 1 of size \(3, 4\)"),
    ],
    ids=["coarse-to-fine", "middle"],
)
def test_levels_that_grow_are_refused_naming_them(kind, sizes, message):
    with pytest.raises(ValueError, match=rf"expected levels fine to coarse .*{message}"):
        neck(kind, CHANNELS)(maps(sizes))


@pytest.mark.parametrize("kind", ["fpn", "bifpn"])
def test_growing_width_alone_is_refused_naming_the_keys(kind):
    levels = maps()
    levels[1] = torch.randn(2, 8, 6, 20)  # narrower than level c3 in height, wider in width
    with pytest.raises(ValueError, match=r"level c4 of size \(6, 20\) after level c3"):
        neck(kind, CHANNELS)(dict(zip(["c3", "c4", "c5"], levels, strict=True)))


@pytest.mark.parametrize("kind", ["fpn", "bifpn"])
def test_equal_sizes_are_accepted(kind):
    # Dilated backbones (output stride 8) give several levels of one size.
    out = neck(kind, CHANNELS)(maps((6, 6, 6)))
    assert [tuple(y.shape[-2:]) for y in out] == [(6, 7)] * 3


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=2, max_size=4))
def test_a_pyramid_is_accepted_exactly_when_no_level_grows(sizes):
    module = FPNNeck([2] * len(sizes), 3).eval()
    levels = [torch.randn(1, 2, h, w) for h, w in sizes]
    grows = [
        i for i in range(1, len(sizes))
        if sizes[i][0] > sizes[i - 1][0] or sizes[i][1] > sizes[i - 1][1]
    ]
    if grows:
        with pytest.raises(ValueError, match=rf"got level {grows[0]} of size"):
            module(levels)
    else:
        assert [tuple(y.shape[-2:]) for y in module(levels)] == sizes


@pytest.mark.parametrize("neck", ["fpn", "bifpn"])
def test_necks_take_timms_feature_info(neck):
    timm = pytest.importorskip("timm")
    body = timm.create_model("resnet18", features_only=True, out_indices=(2, 3, 4),
                             pretrained=False).eval()
    info = body.feature_info
    block = (FPNNeck(info, 8) if neck == "fpn" else BiFPN(info, 8, num_layers=1)).eval()
    assert block.in_channels == info.channels() == [128, 256, 512]
    with torch.no_grad():
        out = block(body(torch.randn(1, 3, 64, 64)))
    assert [tuple(y.shape[1:]) for y in out] == [(8, 8, 8), (8, 4, 4), (8, 2, 2)]
