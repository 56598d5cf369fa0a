import pytest
import torch.nn as nn

from rescomp.config import MeasureConfig
from rescomp.measure import activation_bytes, count_macs, count_params, measure, state_dict_bytes
from rescomp.models import build_model, model_names


def tiny_net() -> nn.Module:
    # conv 3->4, 3x3, 8x8 output; then linear 256->10
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_counts_by_hand():
    net = tiny_net()
    assert count_params(net) == 3 * 4 * 9 + 256 * 10 + 10
    assert count_macs(net, 8) == 3 * 4 * 9 * 64 + 256 * 10  # one multiply-add = one MAC
    act = activation_bytes(net, 8)
    # at the conv, its input (3*64 floats) and output (4*64) are live; flatten is a view of that
    # output (no new memory); at the linear, 256 + 10 floats.
    assert act == {"act_peak_bytes": (3 * 64 + 4 * 64) * 4, "act_max_tensor_bytes": 256 * 4}


def test_resnet56_macs_match_he_et_al():
    # He et al. quote ~125 M multiply-adds for the convolutions; fvcore also counts BN and the fc.
    macs = count_macs(build_model({"arch": "resnet56", "num_classes": 10}), 32)
    assert macs == 126_554_752


def test_size_and_latency_are_measured():
    net = tiny_net()
    assert 4 * count_params(net) < state_dict_bytes(net) < 4 * count_params(net) + 4096
    row = measure(net, 8, MeasureConfig(batch_sizes=[1, 2], warmup=1, repeats=3, threads=1))
    assert row["cpu_threads"] == 1
    assert 0 < row["latency_ms_cpu_b1"] < 1000 and 0 < row["latency_ms_cpu_b2"] < 1000
    assert "gpu_images_per_s_b256" not in row or row["gpu_images_per_s_b256"] > 0


@pytest.mark.parametrize("arch", [a for a in model_names() if a.startswith(("resnet2", "cifar", "squeeze"))])
def test_every_count_is_positive_for_registry_models(arch):
    row = measure(build_model({"arch": arch, "num_classes": 10}), 32, MeasureConfig(latency=False))
    assert row["params"] > 0 and row["macs"] > 0 and row["size_bytes"] > 4 * row["params"]
