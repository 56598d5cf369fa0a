import pytest
import torch

from rescomp.errors import ConfigError
from rescomp.measure import count_params
from rescomp.models import build_model, get_entry, model_names

# Wrong versions these tests must catch:
#  1. a model argument of the wrong type reaching the builder: `--set model.width=abc` said "not all arguments
#     converted during string formatting", `depth: true` built a network of depth 1, `units_per_stage: 3`
#     a TypeError -> test_a_model_argument_of_the_wrong_type_is_named_with_the_type_it_needs
#  2. the type check rejecting what the builder takes: a YAML list for a tuple, a tuple a checkpoint kept for
#     a list, an int for a float, null for an Optional
#       -> the same test, test_the_type_check_takes_what_yaml_gives_for_a_tuple_or_a_float


# He et al. 2016 CIFAR ResNets; option A has no shortcut parameters, option B adds two 1x1 projections.
@pytest.mark.parametrize("spec, params", [
    ({"arch": "resnet20"}, 269_722),
    ({"arch": "resnet32"}, 464_154),
    ({"arch": "resnet44"}, 658_586),
    ({"arch": "resnet56"}, 853_018),
    ({"arch": "resnet56", "shortcut": "B"}, 855_770),
    ({"arch": "resnet110"}, 1_727_962),
    ({"arch": "resnet56_bottleneck"}, 591_322),
    ({"arch": "resnet18"}, 11_181_642),  # torchvision, 10-class head
    ({"arch": "resnet50"}, 23_528_522),
    # Caffe's LeNet-5: Han et al.'s 431K on 1 x 28 x 28 MNIST (520 + 25,050 + 400,500 + 5,010), and on
    # CIFAR's 3 x 32 x 32 a first fully connected layer of 1250 inputs (1,520 + 25,050 + 625,500 + 5,010)
    ({"arch": "lenet5", "in_channels": 1, "input_size": 28}, 431_080),
    ({"arch": "lenet5"}, 657_080),
])
def test_exact_parameter_counts(spec, params):
    assert count_params(build_model({"num_classes": 10, **spec})) == params


def test_tiny_resnet_counted_by_hand():
    # conv1 3*4*9 + bn 8 | layer1: 2*(4*4*9 + 8) | layer2: 4*8*9 + 16 + 8*8*9 + 16
    # | layer3: 8*16*9 + 32 + 16*16*9 + 32 | fc 16*10 + 10
    by_hand = 108 + 8 + 2 * (144 + 8) + (288 + 16 + 576 + 16) + (1152 + 32 + 2304 + 32) + 170
    assert count_params(build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4})) == by_hand == 5006


def test_bottleneck_structure_matches_the_paper():
    m = build_model({"arch": "resnet56_bottleneck", "num_classes": 10})
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and "shortcut" not in n]
    assert len(convs) == 1 + 3 * 6 * 3  # stem + 3 stages x 6 units x 3 convs; + fc = 56 layers
    shortcuts = [n for n, mod in m.named_modules() if n.endswith("shortcut") and not isinstance(mod, torch.nn.Identity)]
    assert shortcuts == ["layer1.0.shortcut", "layer2.0.shortcut", "layer3.0.shortcut"]


@pytest.mark.parametrize("arch", model_names())
def test_every_registered_model_builds_and_runs(arch):
    entry = get_entry(arch)
    model = build_model({"arch": arch, "num_classes": 100}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, entry.min_input, entry.min_input))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


def test_cifar_stem_for_torchvision_resnets():
    m = build_model({"arch": "resnet18", "num_classes": 10, "stem": "cifar"})
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# Spec transforms (issue 12). Wrong versions these tests must catch:
#  - transforms applied in the order the spec lists them, not their registered order (a pruned shape
#    recorded on a separable network applied before the network is separable)
#      -> test_registered_transforms_apply_in_their_order
#  - the model builder importing the techniques for a plain network (the models -> compress cycle)
#      -> test_the_builder_imports_no_technique_for_a_plain_network
#  - a technique's transform not registered (its key refused as unknown), or pruned shapes applied after
#    the units a later layer-drop deleted (a missing layer) -> test_every_technique_key_rebuilds

def test_registered_transforms_apply_in_their_order(monkeypatch):
    import rescomp.models as models

    models.transform_keys()  # the techniques' own, registered first
    monkeypatch.setattr(models.TRANSFORMS, "_items", dict(models.TRANSFORMS._items))  # leave the registry as it was
    seen = []
    models.register_transform("zz_first", order=1)(lambda m, v: seen.append(("first", v)) or m)
    models.register_transform("aa_second", order=99)(lambda m, v: seen.append(("second", v)) or m)
    with pytest.raises(ValueError, match="registered twice"):
        models.register_transform("zz_first", order=5)(lambda m, v: m)
    build_model({"arch": "resnet20", "num_classes": 10, "aa_second": 2, "zz_first": 1})
    assert seen == [("first", 1), ("second", 2)]
    assert models.transform_keys() == ["zz_first", "separable", "gates", "shapes", "deleted", "masked", "shared", "binarized", "aa_second"]


def test_the_builder_imports_no_technique_for_a_plain_network():
    import subprocess
    import sys

    code = ("import sys; from rescomp.models import build_model; build_model({'arch': 'resnet20', 'num_classes': 10}); "
            "print(sorted(m for m in sys.modules if m.startswith('rescomp.compress'))); "
            "build_model({'arch': 'resnet20', 'num_classes': 10, 'separable': {'mode': 'depthwise'}}); "
            "print('rescomp.compress.separable' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "True"]


def test_every_technique_key_rebuilds():
    spec = {"arch": "cifar_resnet", "num_classes": 10, "depth": 14, "width": 4, "separable": {"mode": "depthwise"},
            "gates": {"init": [-1, 1]}, "deleted": ["layer1.1"], "shapes": {"fc": [16, 12],
            # a unit pruned, then deleted (layer-drop after prune): its shapes stay in the spec
            "layer1.1.bn1": [3]}, "masked": ["conv1.1"], "shared": {"fc": 3}}
    model = build_model(spec)
    keys = model.state_dict()
    assert {"conv1.1.weight_orig", "conv1.1.weight_mask", "fc.centroids", "fc.weight_index"} <= set(keys)
    assert keys["fc.centroids"].shape == (7,) and keys["fc.weight_index"].shape == (12, 16)  # shared after shapes
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DepthwiseSeparable", "Gated"} <= kinds and type(model.layer1[1]).__name__ == "Identity"
    assert tuple(model.fc.weight.shape) == (12, 16)  # Linear(16 in, 12 out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 12)


@pytest.mark.parametrize("key, value, said", [
    ("width", "abc", "model.width: 'abc' is not an integer; set it to an integer, or leave it out for the default "
                     "(arch 'cifar_resnet')"),
    ("depth", True, "model.depth: true is not an integer; set it to an integer, or leave it out for the default "
                    "(arch 'cifar_resnet')"),
    ("width", 1.0, "model.width: 1.0 is not an integer; set it to an integer, or leave it out for the default "
                   "(arch 'cifar_resnet')"),
    ("width", None, "model.width: null is not an integer; set it to an integer, or leave it out for the default "
                    "(arch 'cifar_resnet')"),
    ("block", "wide", "model.block: 'wide' is not one of 'basic', 'bottleneck'; set it to one of 'basic', "
                      "'bottleneck', or leave it out for the default (arch 'cifar_resnet')"),
    ("units_per_stage", 3, "model.units_per_stage: 3 is not a list of integers or null; set it to a list of "
                           "integers or null, or leave it out for the default (arch 'cifar_resnet')"),
    ("units_per_stage", [1, "a", 1], "model.units_per_stage: [1, 'a', 1] is not a list of integers or null; set "
                                     "it to a list of integers or null, or leave it out for the default (arch "
                                     "'cifar_resnet')"),
])
def test_a_model_argument_of_the_wrong_type_is_named_with_the_type_it_needs(key, value, said):
    with pytest.raises(ConfigError) as e:
        build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4, key: value})
    assert str(e.value) == said
    # what the builder takes passes: a list where it annotates one, a tuple kept by a checkpoint, null
    for units in ([1, 1, 1], (1, 1, 1), None):
        assert count_params(build_model({"arch": "cifar_resnet", "num_classes": 10, "width": 4, "depth": 8,
                                         "units_per_stage": units})) == 5006


def test_the_type_check_takes_what_yaml_gives_for_a_tuple_or_a_float():
    from rescomp.models import _wrong_type

    def builder(num_classes: int = 10, sizes: tuple[int, ...] = (1,), scale: float = 1.0):
        raise AssertionError("not built")

    assert _wrong_type(builder, "sizes", [1, 2]) is None  # YAML has no tuples
    assert _wrong_type(builder, "scale", 3) is None  # nor does it write 3.0 for 3
    assert _wrong_type(builder, "sizes", [1, "a"]) == "a list of integers"
    assert _wrong_type(builder, "scale", "x") == "a number"
