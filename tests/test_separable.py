# Kastanos 2020: ResNet50V2 and its spatially / depthwise separable variants. Wrong versions this
# file must catch (each checked by mutating the code and seeing a test fail):
# - a bias on the first half of a separable pair, or a BN between the halves (the paper adds
#   nothing between them)                                    -> test_resnet50v2_parameter_counts_equal_the_papers
# - the depthwise half as a full k x k conv (no groups)        -> test_resnet50v2_parameter_counts_equal_the_papers
# - the stride on both halves, or the first spatial half
#   mapping C_in -> C_in instead of C_in -> C_out              -> test_exactly_separable_kernels_are_reproduced
# - `exclude` ignored, or the input model changed in place    -> test_separate_by_name_pattern_on_any_registry_model
# - the stem max-pool padded with -inf (nn.MaxPool2d's own padding), a ReLU before the pool, or the
#   zero pad on other sides than Keras' ZeroPadding2D(1)      -> test_resnet50v2_stem_pads_its_pool_with_zeros_as_keras
# - group convs that do not divide the parameters by the groups, or that split a conv whose channels
#   the groups do not divide                                   -> test_group_convs_divide_parameters_by_their_groups
import pytest
import torch
import torch.nn as nn

from rescomp.compress.separable import DepthwiseSeparable, SpatialSeparable, separate
from rescomp.errors import ConfigError
from rescomp.measure import count_params
from rescomp.models import build_model


def bn_stats(model: nn.Module) -> int:
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))


# Kastanos 2020, Table 1 (Keras totals count BN moving mean and variance; trainable ones do not).
@pytest.mark.parametrize("variant, keras_total, trainable", [
    ("full", 23_585_290, 23_539_850),
    ("spatial", 19_812_874, 19_767_434),
    ("depthwise", 13_559_498, 13_514_058),
])
def test_resnet50v2_parameter_counts_equal_the_papers(variant, keras_total, trainable):
    m = build_model({"arch": "resnet50v2", "num_classes": 10, "variant": variant})
    assert count_params(m) == trainable
    assert bn_stats(m) == 45_440
    assert count_params(m) + bn_stats(m) == keras_total


def test_resnet50v2_peak_activation_memory_equals_the_papers():
    from rescomp.measure import activation_bytes

    # tflite-tools in the paper: 196.61 kB for every fp32 variant (3 live 8x8x256 tensors at a block's add).
    for v in ("full", "depthwise"):
        act = activation_bytes(build_model({"arch": "resnet50v2", "num_classes": 10, "variant": v}), 32)
        assert act["act_peak_bytes"] == 196_608


def test_resnet50v2_stem_pads_its_pool_with_zeros_as_keras():
    # Keras: ZeroPadding2D(1), then MaxPool2D(3, strides=2) with no padding; no ReLU before it. With
    # the stem conv's output -1 everywhere, a window that takes in a padded pixel gives 0 and the
    # others -1. Padded, the 16 x 16 map is 18 x 18 and windows start at 0, 2, ..., 14: only those
    # starting at 0 reach a pad (the last ends at 16, before the pad at 17), so the 8 x 8 output is 0
    # on its first row and column (15 values) and -1 on the other 49. Padded with -inf, it is all -1.
    m = build_model({"arch": "resnet50v2", "num_classes": 10}).eval()
    m.conv1.weight.data.zero_()
    m.conv1.bias.data.fill_(-1.0)
    seen = []
    m.stacks.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    expected = torch.full((1, 64, 8, 8), -1.0)
    expected[:, :, 0, :] = expected[:, :, :, 0] = 0.0
    assert torch.equal(seen[0], expected) and seen[0][0, 0].sum() == -49


def test_exactly_separable_kernels_are_reproduced():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 9)
    # spatial: W[o, i] = h[o, i] (row) x v[i] (column); first half carries v per input channel
    v, h = torch.randn(4, 3), torch.randn(6, 4, 3)
    conv.weight.data = torch.einsum("oiw,ih->oihw", h, v)
    sp = SpatialSeparable(conv)
    assert sp[0].out_channels == 6
    sp[0].weight.data.zero_()
    for i in range(4):
        sp[0].weight.data[i, i, :, 0] = v[i]
    sp[1].weight.data = torch.zeros(6, 6, 1, 3)
    sp[1].weight.data[:, :4, 0, :] = h
    assert torch.allclose(sp(x), conv(x), atol=1e-5)
    # depthwise: W[o, i] = p[o, i] * d[i]
    d, p = torch.randn(4, 3, 3), torch.randn(6, 4)
    conv.weight.data = p[:, :, None, None] * d[None]
    dw = DepthwiseSeparable(conv)
    dw[0].weight.data = d[:, None]
    dw[1].weight.data = p[:, :, None, None]
    assert torch.allclose(dw(x), conv(x), atol=1e-5)


def test_separate_by_name_pattern_on_any_registry_model():
    base = build_model({"arch": "resnet20", "num_classes": 10})
    model, info = separate(base, {"mode": "depthwise", "include": ["layer*.conv*"], "exclude": ["layer3.*"]})
    assert len(info["replaced"]) == 12  # 2 stages x 3 blocks x 2 convs; stem and layer3 kept
    assert isinstance(model.layer1[0].conv1, DepthwiseSeparable) and isinstance(model.layer3[0].conv1, nn.Conv2d)
    assert isinstance(base.layer1[0].conv1, nn.Conv2d)  # the input is left alone
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # 3x3 16->16 conv: 2304 -> 144 + 256; 3x3 16->32: 4608 -> 144 + 512; 3x3 32->32: 9216 -> 288 + 1024
    saved = 6 * (2304 - 400) + (4608 - 656) + 5 * (9216 - 1312)
    assert info["params_before"] - info["params_after"] == saved


def test_separable_is_part_of_the_spec():
    spec = {"arch": "resnet56", "num_classes": 10, "separable": {"mode": "spatial", "include": ["layer*"]}}
    m = build_model(spec)
    assert isinstance(m.layer2[3].conv2, SpatialSeparable)
    assert count_params(m) == count_params(build_model(spec))


def test_no_matching_conv_is_a_clear_error():
    with pytest.raises(ConfigError, match="no k x k conv"):
        separate(build_model({"arch": "resnet20", "num_classes": 10}), {"mode": "spatial", "include": ["nope*"]})
    with pytest.raises(ConfigError, match=r"^separable.mode: Input should be 'spatial', 'depthwise' or 'group' \(got 'bogus'\)$"):
        separate(build_model({"arch": "resnet20", "num_classes": 10}), {"mode": "bogus"})  # one line, not pydantic's four


def test_group_convs_divide_parameters_by_their_groups():
    # sep-net-slides.txt: "Reducing # of parameters in convolution k times (k group convolution)"
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.Conv2d(16, 32, 3, padding=1, bias=False))
    grouped, info = separate(net, {"mode": "group", "groups": 4})
    assert info["replaced"] == ["1"] and grouped[0].groups == 1  # 3 input channels: not divisible by 4, kept
    assert grouped[1].groups == 4 and grouped[1].weight.numel() == 16 * 32 * 9 // 4 == 1152
    x = torch.randn(2, 3, 8, 8)
    assert grouped(x).shape == net(x).shape
    spec = {"arch": "resnet20", "num_classes": 10, "separable": {"mode": "group", "groups": 2, "include": ["layer*"]}}
    assert build_model(spec).layer3[1].conv2.groups == 2  # rebuilt from the spec



# Wrong versions found by a mutation survey (each checked by mutating the code; scripts/mutants.py): a
# conv's bias dropped by every mode; a group conv losing its stride or dilation; a spatial pair with its
# kernel, stride or padding halves swapped; a 1x1, an already grouped or a 'same'-padded conv separated;
# several include patterns read as all-of, several exclude patterns as all-of; `separable: {}` building
# the network unseparated.
def test_every_mode_keeps_bias_stride_and_shape_and_leaves_what_it_cannot_split():
    conv = nn.Conv2d(4, 6, 3, bias=True)
    for mode, params in (("spatial", 4 * 6 * 3 + 6 * 6 * 3 + 6), ("depthwise", 4 * 9 + 4 * 6 + 6), ("group", 2 * 2 * 9 * 3 + 6)):
        assert separate(nn.Sequential(conv), {"mode": mode})[1]["params_after"] == params, mode
    odd = nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(1, 4, 12, 12)
    for mode in ("spatial", "depthwise", "group"):
        assert separate(nn.Sequential(odd), {"mode": mode})[0](x).shape == odd(x).shape, mode
    halves = separate(nn.Sequential(odd), {"mode": "spatial"})[0][0]
    assert (halves[0].kernel_size, halves[1].kernel_size, halves[1].stride) == ((3, 1), (1, 5), (1, 2))
    mixed = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1))
    for mode in ("spatial", "depthwise"):
        assert separate(mixed, {"mode": mode})[1]["replaced"] == ["3"], mode
    r20 = build_model({"arch": "resnet20", "num_classes": 10})
    both = separate(r20, {"mode": "group", "include": ["layer1.*", "layer2.*"]})[1]["replaced"]
    assert len(both) == 12 and {n.split(".")[0] for n in both} == {"layer1", "layer2"}
    kept = separate(r20, {"mode": "depthwise", "exclude": ["layer1.*", "layer2.*"]})[1]["replaced"]
    assert kept and all(not n.startswith(("layer1", "layer2")) for n in kept)
    assert separate(nn.Sequential(conv), {"mode": "group"})[1]["groups"] == 2  # the slides' k = 2
    with pytest.raises(Exception, match="greater than or equal to 2"):  # one group is the conv itself
        separate(nn.Sequential(conv), {"mode": "group", "groups": 1})
    with pytest.raises(ConfigError, match="groups=3 divides no matching conv's in and out channels"):  # not the patterns
        separate(r20, {"mode": "group", "groups": 3})
    with pytest.raises(ConfigError, match=r"model.separable: \{\} is empty .*`separable: \{mode: depthwise\}"):
        build_model({"arch": "resnet20", "num_classes": 10, "separable": {}})  # not the network unseparated
