"""BiFPNLayer and BiFPN: EfficientDet's bidirectional pyramid (fig. 2f)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import BiFPN, BiFPNLayer, WeightedFusion


def pyramid_sizes(height: int, width: int, num_levels: int) -> list[tuple[int, int]]:
    sizes = [(height, width)]
    for _ in range(num_levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def make_maps(channels, sizes, batch=2):
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(channels, sizes, strict=True)]


def shapes(maps):
    return [tuple(x.shape) for x in maps]


@settings(max_examples=15, deadline=None)
@given(
    num_levels=st.integers(2, 5),
    height=st.integers(1, 33),
    width=st.integers(1, 33),
    channels=st.integers(1, 6),
)
def test_layer_keeps_every_level_shape(num_levels, height, width, channels):
    maps = make_maps([channels] * num_levels, pyramid_sizes(height, width, num_levels))
    out = BiFPNLayer(channels, num_levels)(maps)
    assert isinstance(out, list)
    assert shapes(out) == shapes(maps)


@settings(max_examples=10, deadline=None)
@given(
    in_channels=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    height=st.integers(1, 33),
    width=st.integers(1, 33),
    channels=st.integers(1, 6),
    num_layers=st.integers(1, 2),
)
def test_bifpn_output_shapes(in_channels, height, width, channels, num_layers):
    sizes = pyramid_sizes(height, width, len(in_channels))
    out = BiFPN(in_channels, channels, num_layers)(make_maps(in_channels, sizes))
    assert shapes(out) == [(2, channels, h, w) for h, w in sizes]


@pytest.mark.parametrize(
    "sizes",
    [
        [(9, 7), (4, 4), (3, 2)],  # not ceil-halves
        [(8, 8), (8, 8), (4, 4)],  # two levels of one stride, as in EfficientNet-b4
        [(5, 6), (2, 2), (1, 1)],
    ],
)
def test_layer_lines_up_any_decreasing_sizes(sizes):
    maps = make_maps([4] * len(sizes), sizes)
    assert shapes(BiFPNLayer(4, len(sizes))(maps)) == shapes(maps)


def test_sequence_and_mapping_give_the_same_result():
    neck = BiFPN([3, 8, 5], 8, num_layers=2).eval()
    maps = make_maps([3, 8, 5], pyramid_sizes(12, 10, 3))
    as_list = neck(maps)
    as_dict = neck({"c3": maps[0], "c4": maps[1], "c5": maps[2]})
    assert isinstance(as_list, list) and isinstance(as_dict, dict)
    assert list(as_dict) == ["c3", "c4", "c5"]
    for a, b in zip(as_list, as_dict.values(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(neck(tuple(maps)), as_list)


def test_layer_mapping_keeps_keys():
    maps = make_maps([4] * 4, pyramid_sizes(16, 16, 4))
    features = {name: x for name, x in zip(["0", "1", "2", "3"], maps, strict=True)}
    out = BiFPNLayer(4, 4)(features)
    assert list(out) == list(features)
    assert shapes(out.values()) == shapes(maps)


def test_top_down_and_bottom_up_paths_connect_every_level():
    layer = BiFPNLayer(4, 4).eval()
    maps = make_maps([4] * 4, pyramid_sizes(16, 12, 4), batch=1)
    base = layer(maps)
    finer = layer([maps[0] + 1.0, *maps[1:]])
    coarser = layer([*maps[:-1], maps[-1] + 1.0])
    assert not torch.allclose(base[-1], finer[-1])  # bottom-up reaches the coarsest output
    assert not torch.allclose(base[0], coarser[0])  # top-down reaches the finest output


@pytest.mark.parametrize("fusion", ["fast", "softmax"])
@pytest.mark.parametrize("num_levels", [2, 3, 5])
def test_gradients_reach_every_fusion_weight(fusion, num_levels):
    in_channels = [3 + i for i in range(num_levels)]
    neck = BiFPN(in_channels, 4, num_layers=2, fusion=fusion)
    out = neck(make_maps(in_channels, pyramid_sizes(16, 12, num_levels)))
    sum(y.sum() for y in out).backward()
    fusions = [m for m in neck.modules() if isinstance(m, WeightedFusion)]
    assert len(fusions) == 2 * 2 * (num_levels - 1)
    for fusion_module in fusions:
        assert fusion_module.weight.grad is not None
        assert bool((fusion_module.weight.grad != 0).all())


@pytest.mark.parametrize("num_levels", [2, 3, 5])
def test_node_layout_and_parameter_count(num_levels):
    c = 6
    layer = BiFPNLayer(c, num_levels)
    arity = [len(node.fusion.weight) for node in layer.bottom_up]
    assert [len(node.fusion.weight) for node in layer.top_down] == [2] * (num_levels - 1)
    assert arity == [3] * (num_levels - 2) + [2]
    # depthwise 3x3 (no bias) + pointwise 1x1 (bias) + BatchNorm affine, per node
    per_node = 9 * c + c * c + c + 2 * c
    expected = 2 * (num_levels - 1) * per_node + 2 * (num_levels - 1) + sum(arity)
    assert sum(p.numel() for p in layer.parameters()) == expected


def test_state_dict_keys_shared():
    keys = set(BiFPN([5, 4, 7], 4, num_layers=2, projection="shared").state_dict())
    for key in [
        "projections.0.0.weight",
        "projections.0.0.bias",
        "projections.0.1.running_mean",
        "projections.2.0.weight",
        "layers.1.top_down.1.fusion.weight",
        "layers.0.bottom_up.0.depthwise.weight",
        "layers.0.bottom_up.1.pointwise.weight",
        "layers.0.bottom_up.1.pointwise.bias",
        "layers.0.top_down.0.norm.weight",
    ]:
        assert key in keys
    assert not any(key.startswith("projections.1.") for key in keys)
    assert not any(".project." in key for key in keys)
    assert "layers.0.top_down.0.depthwise.bias" not in keys


def test_state_dict_keys_per_node():
    # Levels 0 (5 ch) and 2 (7 ch) differ from 4: every node of layer 0 reading them projects
    # them itself; level 1 (4 ch) passes. top_down.1 reads x[1] and x[2] (raw, the coarsest),
    # top_down.0 reads x[0]; bottom_up.0 reads x[1], bottom_up.1 reads x[2].
    keys = set(BiFPN([5, 4, 7], 4, num_layers=2).state_dict())
    assert not any(key.startswith("projections.") for key in keys)
    projected = {key.split(".project.")[0] + ".project." + key.split(".project.")[1][0]
                 for key in keys if ".project." in key and key.endswith("0.weight")}
    assert projected == {
        "layers.0.top_down.0.project.0", "layers.0.top_down.1.project.1",
        "layers.0.bottom_up.1.project.0",
    }
    assert "layers.0.top_down.0.project.0.1.running_var" in keys
    assert "layers.0.top_down.0.project.0.0.bias" in keys
    assert not any(key.startswith("layers.1.") and ".project." in key for key in keys)


def test_redundant_bias_false_drops_every_bias_before_a_norm():
    neck = BiFPN([5, 4, 7], 4, num_layers=2, num_levels=4, redundant_bias=False)
    biased = [name for name, m in neck.named_modules()
              if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert biased == []
    no_norm = BiFPN([5, 4, 7], 4, num_layers=1, norm_layer=None, redundant_bias=False)
    assert all(m.bias is not None for m in no_norm.modules()
               if isinstance(m, nn.Conv2d) and m.groups == 1)


@pytest.mark.parametrize(
    ("in_channels", "channels"),
    [([4, 4, 4], 4), ([3, 4, 5], 4), ([3, 5, 6, 7], 4), ([8, 8], 4)],
)
def test_projections_only_where_channels_differ(in_channels, channels):
    neck = BiFPN(in_channels, channels, num_layers=1, projection="shared")
    projected = [not isinstance(p, nn.Identity) for p in neck.projections]
    assert projected == [c != channels for c in in_channels]
    convs = [m for m in neck.projections.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(c != channels for c in in_channels)
    assert len(neck.layers) == 1 and neck.out_channels == channels


@pytest.mark.parametrize(
    ("in_channels", "channels"),
    [([4, 4, 4], 4), ([3, 4, 5], 4), ([3, 5, 6, 7], 4), ([8, 8], 4)],
)
def test_per_node_projects_each_read_of_a_level(in_channels, channels):
    # Each node of layer 0 projects each raw input of other channels: level i < L-1 is read
    # by top_down[i] and bottom_up[i-1] (i > 0), the coarsest by top_down[L-2] and the last
    # bottom-up node; so a level is projected once (the finest) or twice.
    neck = BiFPN(in_channels, channels, num_layers=1)
    levels = len(in_channels)
    reads = [1] + [2] * (levels - 1)
    expected = sum(r for r, c in zip(reads, in_channels) if c != channels)
    convs = [m for m in neck.layers[0].modules() if isinstance(m, nn.Conv2d) and m.groups == 1
             and m.kernel_size == (1, 1) and m.in_channels != channels]
    assert len(convs) == expected
    assert all(isinstance(p, nn.Identity) for p in neck.projections)


@pytest.mark.parametrize("height", [7, 8, 11])
def test_extra_level(height):
    neck = BiFPN([3, 5], 4, num_layers=1, extra_level=True)
    sizes = pyramid_sizes(height, height + 3, 2)
    maps = make_maps([3, 5], sizes)
    out = neck(maps)
    h, w = sizes[-1]
    assert shapes(out) == [(2, 4, *s) for s in sizes] + [(2, 4, (h + 1) // 2, (w + 1) // 2)]
    torch.testing.assert_close(out[-1], F.max_pool2d(out[-2], 1, stride=2))
    named = neck({"c4": maps[0], "c5": maps[1]})
    assert list(named) == ["c4", "c5", "pool"]
    with pytest.raises(ValueError, match="'pool'"):
        neck({"c4": maps[0], "pool": maps[1]})


def test_wrong_levels_and_channels():
    neck = BiFPN([3, 5, 7], 4)
    maps = make_maps([3, 5, 7], pyramid_sizes(8, 8, 3))
    with pytest.raises(ValueError, match="expected 3 feature maps.*got 2"):
        neck(maps[:2])
    with pytest.raises(ValueError, match="level 1 expected 5 input channels, got 6"):
        neck([maps[0], torch.randn(2, 6, 4, 4), maps[2]])
    with pytest.raises(ValueError, match="BiFPNLayer expected 3 feature maps"):
        BiFPNLayer(4, 3)(make_maps([4] * 4, pyramid_sizes(8, 8, 4)))
    with pytest.raises(ValueError, match="4-D"):
        neck([maps[0], maps[1], torch.randn(7, 2, 2)])
    with pytest.raises(TypeError, match="one Tensor"):
        neck(maps[0])


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: BiFPN([16], 8), ValueError, "at least 2 levels"),
        (lambda: BiFPN([], 8), ValueError, "at least 2 levels"),
        (lambda: BiFPN(16, 8), TypeError, "in_channels"),
        (lambda: BiFPN([16, 0], 8), ValueError, "in_channels"),
        (lambda: BiFPN([16, 32], 0), ValueError, "channels"),
        (lambda: BiFPN([16, 32], 8, num_layers=0), ValueError, "num_layers"),
        (lambda: BiFPN([16, 32], 8, fusion="max"), ValueError, "fusion"),
        (lambda: BiFPN([16, 32], 8, eps=-1.0), ValueError, "eps"),
        (lambda: BiFPNLayer(8, num_levels=1), ValueError, "num_levels"),
        (lambda: BiFPNLayer(0), ValueError, "channels"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bfloat16_autocast_and_other_layers():
    neck = BiFPN([3, 6, 5], 4, num_layers=2, act_layer=nn.GELU, norm_layer=nn.Identity)
    maps = make_maps([3, 6, 5], pyramid_sizes(9, 7, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck(maps)
    assert all(bool(torch.isfinite(y).all()) for y in out)


def test_bfloat16_autocast_with_batchnorm():
    neck = BiFPN([3, 4], 4, num_layers=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck(make_maps([3, 4], pyramid_sizes(6, 6, 2)))
    assert all(bool(torch.isfinite(y).all()) for y in out)


def test_factory_kwargs():
    neck = BiFPN([3, 5], 4, device="meta", dtype=torch.float64)
    assert {p.device.type for p in neck.parameters()} == {"meta"}
    assert {p.dtype for p in neck.parameters()} == {torch.float64}
    layer = BiFPNLayer(4, 3, dtype=torch.float64)
    out = layer([x.double() for x in make_maps([4] * 3, pyramid_sizes(6, 6, 3))])
    assert out[0].dtype == torch.float64


def test_channels_last():
    neck = BiFPN([3, 5], 4).eval()
    maps = make_maps([3, 5], pyramid_sizes(8, 6, 2))
    expected = neck(maps)
    neck = neck.to(memory_format=torch.channels_last)
    out = neck([x.to(memory_format=torch.channels_last) for x in maps])
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# EfficientDet's new coarser levels (num_levels) and node order --------------------------------


@settings(max_examples=10, deadline=None)
@given(
    in_channels=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    new=st.integers(0, 3),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    channels=st.integers(1, 6),
)
def test_new_levels_halve_the_coarsest_input(in_channels, new, height, width, channels):
    levels = len(in_channels) + new
    sizes = pyramid_sizes(height, width, levels)
    neck = BiFPN(in_channels, channels, num_layers=1, num_levels=levels)
    out = neck(make_maps(in_channels, sizes[: len(in_channels)]))
    assert shapes(out) == [(2, channels, h, w) for h, w in sizes]
    assert all(layer.num_levels == levels for layer in neck.layers)


@pytest.mark.parametrize("c5", [320, 64], ids=["project", "same-channels"])
def test_new_levels_are_made_the_efficientdet_way(c5):
    torch.manual_seed(0)
    neck = BiFPN([40, 112, c5], 64, num_layers=1, num_levels=5).eval()
    first, second = neck.extra
    assert (first.conv is None) == (c5 == 64) and second.conv is None
    x = torch.randn(1, c5, 9, 11)
    with torch.no_grad():
        p6 = x if first.conv is None else first.norm(first.conv(x))
        p6 = F.max_pool2d(p6, 3, stride=2, padding=1)
        p7 = F.max_pool2d(p6, 3, stride=2, padding=1)
        torch.testing.assert_close(first(x), p6)
        torch.testing.assert_close(second(first(x)), p7)


def test_new_levels_take_part_in_every_layer():
    neck = BiFPN([3, 5], 4, num_layers=2, num_levels=4).train()
    maps = make_maps([3, 5], pyramid_sizes(16, 16, 2))
    neck(maps)[0].sum().backward()  # the finest output depends on the new levels only via layers
    assert neck.extra[0].conv.weight.grad.abs().sum() > 0


def test_p3_p7_keys_and_state_dict():
    neck = BiFPN({"c3": 40, "c4": 112, "c5": 320}, 64, num_layers=1, num_levels=5,
                 extra_level=True)
    feats = dict(zip(["c3", "c4", "c5"], make_maps([40, 112, 320], pyramid_sizes(32, 40, 3))))
    assert list(neck(feats)) == ["c3", "c4", "c5", "c6", "c7", "pool"]
    keys = set(neck.state_dict())
    assert {"extra.0.conv.weight", "extra.0.norm.running_mean"} <= keys
    assert not any(k.startswith("extra.1.") for k in keys)
    assert "extra.0.conv.bias" in keys  # EfficientDet's redundant bias, by default
    lean = BiFPN({"c3": 40, "c4": 112, "c5": 320}, 64, num_layers=1, num_levels=5,
                 redundant_bias=False)
    assert "extra.0.conv.bias" not in set(lean.state_dict())  # the norm's shift replaces it
    plain = BiFPN([4, 4], 4, num_layers=1, num_levels=3)
    out = plain({"a": torch.randn(1, 4, 8, 8), "b": torch.randn(1, 4, 4, 4)})
    assert list(out) == ["a", "b", "level2"]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: BiFPN([4, 8, 16], 8, num_levels=2), "num_levels must be at least"),
        (lambda: BiFPN({"x1": 4, "x2": 8, "x3": 8}, 8, num_levels=4,
                       node_order="conv_act_norm"), "node_order"),
    ],
)
def test_bad_levels_and_order_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_colliding_new_key_is_refused():
    with pytest.raises(ValueError, match="collide"):
        BiFPN({"c6": 4, "c5": 8}, 8, num_levels=3)


@pytest.mark.parametrize("order", ["conv_norm_act", "act_conv_norm"])
def test_node_order(order):
    torch.manual_seed(0)
    layer = BiFPNLayer(4, num_levels=2, node_order=order).eval()
    maps = make_maps([4, 4], [(6, 6), (3, 3)], batch=1)
    node = layer.top_down[0]
    with torch.no_grad():
        fused = node.fusion([maps[0], F.interpolate(maps[1], size=(6, 6))])
        conv = lambda x: node.pointwise(node.depthwise(x))  # noqa: E731
        expected = (node.norm(conv(F.silu(fused))) if order == "act_conv_norm"
                    else F.silu(node.norm(conv(fused))))
        got = layer(maps)
    torch.testing.assert_close(got[0], expected)
    # Same parameters and keys in either order.
    assert set(layer.state_dict()) == set(BiFPNLayer(4, num_levels=2).state_dict())


def _bifpn_and_layer():
    torch.manual_seed(0)
    neck = BiFPN([8, 16, 32], 8, num_layers=2, num_levels=5)
    feats = [torch.randn(2, c, s, s + 1) for c, s in ((8, 16), (16, 8), (32, 4))]
    layer = BiFPNLayer(8, num_levels=3)
    levels = [torch.randn(2, 8, s, s) for s in (9, 5, 3)]
    named = BiFPN({"c3": 8, "c4": 16, "c5": 32}, 8, num_layers=1, extra_level=True)
    return [(neck, feats), (layer, levels), (named, feats)]


def _call(module, levels):
    """``module`` on ``levels`` as a list, or as a mapping for the neck built with names."""
    if getattr(module, "in_keys", None) is None:
        return list(module(levels))
    return list(module(dict(zip(module.in_keys, levels, strict=True))).values())


@pytest.mark.parametrize("case", [0, 1, 2], ids=["BiFPN", "BiFPNLayer", "BiFPN-mapping-extra"])
def test_cpu_nchw_runs_channels_last_inside_and_gives_nchw_back(case, monkeypatch):
    # On the CPU the pyramid converts NCHW levels to channels_last once (its pool, up-sampling
    # and convs are faster there) and its outputs back: same values and gradients as running
    # in NCHW throughout, and the caller gets the memory format it gave.
    import dilconv.bifpn

    module, levels = _bifpn_and_layer()[case]
    seen = []
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    inputs = [x.clone().requires_grad_() for x in levels]
    out = _call(module, inputs)
    assert seen and all(seen)
    assert all(o.is_contiguous() for o in out)
    sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in out).backward()

    monkeypatch.setattr(dilconv.bifpn, "_cpu_nchw", lambda levels: False)
    seen.clear()
    reference_inputs = [x.clone().requires_grad_() for x in levels]
    reference = _call(module, reference_inputs)
    assert not any(seen)
    sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in reference).backward()
    for got, expected in zip(out, reference, strict=True):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(inputs, reference_inputs, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-4)  # conv algos


def test_channels_last_levels_stay_channels_last():
    module, levels = _bifpn_and_layer()[0]
    out = module([x.contiguous(memory_format=torch.channels_last) for x in levels])
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)


def test_bifpn_inference_equals_its_grad_enabled_forward():
    neck = BiFPN([8, 16, 32], 8, num_layers=2, num_levels=5).eval()
    feats = [torch.randn(2, c, s, s + 1) for c, s in ((8, 16), (16, 8), (32, 4))]
    with torch.no_grad():
        fast = neck(feats)
    reference = neck(feats)  # records gradients: the library kernels
    for got, expected in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)


def test_out_channels_is_the_name_and_channels_a_deprecated_alias():
    maps = make_maps([3, 5], pyramid_sizes(8, 8, 2))
    new = BiFPN([3, 5], out_channels=6, num_layers=1)
    with pytest.warns(DeprecationWarning, match="out_channels"):
        old = BiFPN([3, 5], channels=6, num_layers=1)
    old.load_state_dict(new.state_dict())
    torch.testing.assert_close(old.eval()(maps), new.eval()(maps))
    assert new.out_channels == old.out_channels == 6
    with pytest.raises(TypeError, match="both out_channels and its deprecated alias"):
        BiFPN([3, 5], 6, channels=6)
    with pytest.raises(TypeError, match="out_channels"):
        BiFPN([3, 5])


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 8), (16, 15), (33, 64)])
def test_same_padding_is_tensorflows(size):
    # TensorFlow's "SAME" for a 3x3 stride-2 pool: total padding max((ceil(H/2)-1)*2 + 3 - H, 0)
    # split with the odd pixel at the right/bottom, padding with -inf; timm's MaxPool2dSame
    # (what effdet's tf_ models use) computes it so.
    from timm.layers.pool2d_same import MaxPool2dSame

    from dilconv.bifpn import _max_pool_down

    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(_max_pool_down(x, "same"), MaxPool2dSame(3, 2)(x))
    assert _max_pool_down(x, "symmetric").shape == _max_pool_down(x, "same").shape


def test_a_0_1_state_dict_loads_into_the_shared_form():
    # dilconv 0.1's BiFPN: shared projections and new-level convs without a bias (a norm
    # follows), pointwise convs with one. Loaded with strict=False into projection="shared",
    # the only missing keys are the redundant biases, which start at zero: same outputs.
    torch.manual_seed(0)
    source = BiFPN([5, 4, 7], 4, num_layers=2, num_levels=4, projection="shared").eval()
    old_keys = {k: v for k, v in source.state_dict().items()
                if not (k.endswith(".0.bias") and k.startswith("projections."))
                and k != "extra.0.conv.bias"}
    with torch.no_grad():
        for k, v in source.state_dict().items():
            if k not in old_keys:
                v.zero_()  # what 0.1 computed: no bias there
    fresh = BiFPN([5, 4, 7], 4, num_layers=2, num_levels=4, projection="shared").eval()
    missing, unexpected = fresh.load_state_dict(old_keys, strict=False)
    assert unexpected == []
    assert sorted(missing) == ["extra.0.conv.bias", "projections.0.0.bias",
                               "projections.2.0.bias"]
    maps = make_maps([5, 4, 7], pyramid_sizes(16, 12, 3))
    for a, b in zip(fresh(maps), source(maps), strict=True):
        torch.testing.assert_close(a, b)
