"""FPNNeck: shapes over random pyramids, torchvision equivalence, containers, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from dilconv import ExtraLevels, FPNNeck, MaxPoolLevel, P6P7Levels


def pyramid(h: int, w: int, channels: list[int], batch: int = 1) -> list[torch.Tensor]:
    maps = []
    for c in channels:
        maps.append(torch.randn(batch, c, h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return maps


@given(h=st.integers(1, 33), w=st.integers(1, 33), levels=st.integers(1, 4),
       mode=st.sampled_from(["nearest", "bilinear", "transposed"]), smooth_top=st.booleans(),
       out=st.integers(1, 12))
def test_shapes(h, w, levels, mode, smooth_top, out):
    channels = [3 + i for i in range(levels)]
    neck = FPNNeck(channels, out, upsample=mode, smooth_top=smooth_top).eval()
    feats = pyramid(h, w, channels)
    outs = neck(feats)
    assert [o.shape for o in outs] == [(1, out, *f.shape[-2:]) for f in feats]


def test_same_as_torchvision_fpn():
    channels = [8, 16, 32, 64]
    ours = FPNNeck(channels, 24, extra_level=True).eval()
    theirs = FeaturePyramidNetwork(channels, 24, extra_blocks=LastLevelMaxPool()).eval()
    for i in range(len(channels)):
        theirs.inner_blocks[i][0].load_state_dict(ours.lateral[i].state_dict())
        theirs.layer_blocks[i][0].load_state_dict(ours.smooth[i].state_dict())
    feats = dict(zip("abcd", pyramid(29, 17, channels, batch=2)))
    mine, ref = ours(feats), theirs(feats)
    assert list(mine) == list(ref) == ["a", "b", "c", "d", "pool"]
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key])


def test_mapping_in_mapping_out_sequence_in_list_out():
    neck = FPNNeck([4, 8]).eval()
    feats = pyramid(9, 9, [4, 8])
    assert isinstance(neck(feats), list)
    out = neck({"c2": feats[0], "c3": feats[1]})
    assert list(out) == ["c2", "c3"]
    torch.testing.assert_close(out["c3"], neck(feats)[1])


def test_extra_level_halves_the_coarsest():
    neck = FPNNeck([4, 8], 6, extra_level=True).eval()
    outs = neck(pyramid(13, 11, [4, 8]))
    assert len(outs) == 3 and outs[-1].shape == (1, 6, 4, 3)


def test_state_dict_keys_are_stable():
    keys = set(FPNNeck([4, 8, 16], 8, smooth_top=False).state_dict())
    assert keys == {f"lateral.{i}.{p}" for i in range(3) for p in ("weight", "bias")} | {
        f"smooth.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    transposed = FPNNeck([4, 8], 8, upsample="transposed").state_dict()
    assert "upsample.0.conv.weight" in transposed and "upsample.0.norm.running_mean" in transposed


def test_smooth_top_false_passes_coarsest_lateral_through():
    neck = FPNNeck([4, 8], 6, smooth_top=False).eval()
    feats = pyramid(8, 8, [4, 8])
    torch.testing.assert_close(neck(feats)[-1], neck.lateral[-1](feats[-1]))


@pytest.mark.parametrize("kwargs, name", [
    ({"in_channels": []}, "in_channels"),
    ({"in_channels": [4, 0]}, "in_channels"),
    ({"in_channels": [4], "out_channels": 0}, "out_channels"),
    ({"in_channels": [4], "upsample": "cubic"}, "upsample"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FPNNeck(**kwargs)


def test_bad_inputs_are_clear():
    neck = FPNNeck([4, 8, 16])
    feats = pyramid(8, 8, [4, 8, 16])
    with pytest.raises(ValueError, match=r"expected 3 feature maps .* got 2"):
        neck(feats[:2])
    with pytest.raises(ValueError, match="level 1 expected 8 input channels, got 9"):
        neck([feats[0], torch.randn(1, 9, 4, 4), feats[2]])
    with pytest.raises(TypeError, match="got one Tensor"):
        neck(feats[0])
    with pytest.raises(ValueError, match="one batch size"):
        neck([feats[0], torch.randn(2, 8, 4, 4), feats[2]])


@pytest.mark.parametrize("neck_cls", ["fpn", "bifpn"])
def test_mapping_in_channels_fix_the_keys(neck_cls):
    from dilconv import BiFPN

    spec = {"c3": 4, "c4": 8, "c5": 16}
    neck = (FPNNeck(spec, 8, extra_level=True) if neck_cls == "fpn"
            else BiFPN(spec, 8, num_layers=1, extra_level=True)).eval()
    feats = dict(zip(spec, pyramid(12, 10, list(spec.values()))))
    assert list(neck(feats)) == ["c3", "c4", "c5", "pool"]
    assert len(neck(list(feats.values()))) == 4
    with pytest.raises(ValueError, match=r"expected feature keys \['c3', 'c4', 'c5'\]"):
        neck({"p3": feats["c3"], "c4": feats["c4"], "c5": feats["c5"]})
    with pytest.raises(ValueError, match="level c4 expected 8 input channels, got 3"):
        neck({**feats, "c4": torch.randn(1, 3, 6, 5)})
    with pytest.raises(ValueError, match="adds the key 'pool'"):
        FPNNeck([4, 8], extra_level=True)({"a": feats["c3"], "pool": feats["c4"]})


def test_in_channels_must_be_a_sequence_or_mapping():
    with pytest.raises(TypeError, match="in_channels"):
        FPNNeck(256)


@pytest.mark.parametrize("norm_layer", [torch.nn.BatchNorm2d, None], ids=["bn", "none"])
def test_norm_layer_same_as_torchvision_fpn(norm_layer):
    channels = [8, 16, 32]
    ours = FPNNeck(channels, 12, norm_layer=norm_layer).train()
    theirs = FeaturePyramidNetwork(channels, 12, norm_layer=norm_layer).train()
    for i in range(len(channels)):
        for mine, ref in ((ours.lateral[i], theirs.inner_blocks[i][0]),
                          (ours.smooth[i], theirs.layer_blocks[i][0])):
            assert (mine.bias is None) == (ref.bias is None) == (norm_layer is not None)
            ref.load_state_dict(mine.state_dict())
    feats = pyramid(21, 14, channels, batch=2)
    for mine, ref in zip(ours(feats), theirs(dict(enumerate(feats))).values()):
        torch.testing.assert_close(mine, ref)


def test_norm_layer_keys_and_upsampler_norm():
    keys = set(FPNNeck([4, 8], 8, norm_layer=torch.nn.BatchNorm2d).state_dict())
    assert {"lateral_norm.0.weight", "smooth_norm.1.running_var"} <= keys
    assert "lateral.0.bias" not in keys
    gn = FPNNeck([4, 8], 8, upsample="transposed", norm_layer=lambda c: torch.nn.GroupNorm(2, c))
    assert isinstance(gn.upsample[0].norm, torch.nn.GroupNorm)
    assert isinstance(FPNNeck([4, 8], 8, upsample="transposed").upsample[0].norm,
                      torch.nn.BatchNorm2d)


def test_extra_level_is_the_max_pool_block_with_the_same_keys_and_outputs():
    torch.manual_seed(0)
    shorthand = FPNNeck([4, 8], 6, extra_level=True).eval()
    block = FPNNeck([4, 8], 6, extra_levels=MaxPoolLevel()).eval()
    assert isinstance(shorthand.extra_levels, MaxPoolLevel)
    assert set(shorthand.state_dict()) == set(block.state_dict()) == set(
        FPNNeck([4, 8], 6).state_dict())
    block.load_state_dict(shorthand.state_dict())
    feats = pyramid(13, 11, [4, 8])
    for mine, ref in zip(shorthand(feats), block(feats)):
        torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(shorthand(feats)[-1], shorthand(feats)[-2][..., ::2, ::2])


@pytest.mark.parametrize("source", ["output", "input"])
def test_p6_p7_levels_come_from_the_coarsest_output_or_input(source):
    torch.manual_seed(0)
    extra = P6P7Levels(8 if source == "output" else 16, 8, source=source)
    neck = FPNNeck([4, 16], 8, extra_levels=extra).eval()
    feats = pyramid(21, 13, [4, 16])
    out = neck(dict(zip(["c4", "c5"], feats)))
    assert list(out) == ["c4", "c5", "p6", "p7"]
    taken = out["c5"] if source == "output" else feats[-1]
    p6 = extra.p6(taken)
    torch.testing.assert_close(out["p6"], p6)
    torch.testing.assert_close(out["p7"], extra.p7(torch.relu(p6)))
    assert out["p6"].shape[-2:] == (6, 4) and out["p7"].shape[-2:] == (3, 2)
    assert {"extra_levels.p6.weight", "extra_levels.p7.bias"} <= set(neck.state_dict())


def test_p6_stays_negative_where_it_is_negative():
    # P6 is an output and the input of P7's activation: an in-place ReLU would zero it.
    torch.manual_seed(0)
    for act in (torch.nn.ReLU, torch.nn.Hardswish):
        p6, _ = P6P7Levels(4, 4, act_layer=act)(torch.randn(2, 4, 9, 9))
        assert (p6 < 0).any()


def test_own_extra_levels_block():
    class AvgPoolLevel(ExtraLevels):
        names = ("avg",)
        source = "input"

        def forward(self, x):
            return [torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)]

    neck = FPNNeck([4, 8], 6, extra_levels=AvgPoolLevel()).eval()
    feats = pyramid(10, 9, [4, 8])
    out = neck({"a": feats[0], "b": feats[1]})
    assert list(out) == ["a", "b", "avg"] and out["avg"].shape == (1, 8, 3, 3)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"extra_level": True, "extra_levels": MaxPoolLevel()}, ValueError, "got both"),
    ({"extra_levels": torch.nn.MaxPool2d(1, 2)}, TypeError, "ExtraLevels block or None"),
    ({"extra_levels": P6P7Levels(16, 8)}, ValueError,
     r"takes 16 channels from the coarsest output \(source='output'\), which has 8"),
    ({"extra_levels": P6P7Levels(8, 8, source="input")}, ValueError,
     "coarsest input .* which has 16 .the last in_channels"),
])
def test_bad_extra_levels(kwargs, error, message):
    with pytest.raises(error, match=message):
        FPNNeck([4, 16], 8, **kwargs)


def test_extra_level_keys_must_be_new():
    neck = FPNNeck([4, 8], 8, extra_levels=P6P7Levels(8, 8))
    feats = pyramid(8, 8, [4, 8])
    with pytest.raises(ValueError, match=r"adds the key 'p6' for its extra levels \['p6', 'p7'\]"):
        neck({"p5": feats[0], "p6": feats[1]})


def test_p6_p7_levels_bad_arguments():
    with pytest.raises(ValueError, match="source must be one of"):
        P6P7Levels(4, 4, source="p5")
    with pytest.raises(ValueError, match="out_channels"):
        P6P7Levels(4, 0)
