# SEP-Net pattern binarization (issue 13; sep-net-slides.txt). Wrong versions these tests must catch
# (each checked once by mutating the code, scripts/mutants.py):
#  1. a binarized filter that is not scale x sign (no scale, one scale per layer, sign(0) = 0)
#       -> test_the_slides_googlenet_filter_binarizes_to_its_sign_pattern
#  2. 1 x 1 filters binarized too ("1x1 filters serve as data transformation": kept)
#       -> test_only_k_by_k_filters_are_binarized_and_bq_quantizes_the_rest
#  3. no straight-through gradient (the full-precision weights never learn), or patterns that learn
#     when the slides' freeze is asked for -> test_patterns_learn_through_a_straight_gradient_unless_frozen
#  4. storage miscounted (more than 1 bit per binarized weight) or a file that decodes to other outputs
#       -> test_storage_is_one_bit_per_weight_and_a_scale_per_filter, test_a_chain_binarizes_and_its_file_decodes_exactly
#  5. `rescomp measure` of the binarized model.pt sizing it as its dense tensors, not as its file
#       -> test_a_chain_binarizes_and_its_file_decodes_exactly
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.compress import binarize as bz
from rescomp.compress import codec

from conftest import measured_as_its_row, write_config

GOOGLENET_FILTER = [[-0.0219, 0.0408, -0.0547], [-0.0855, 0.0478, -0.0510], [-0.0105, 0.0924, -0.0126]]


def test_the_slides_googlenet_filter_binarizes_to_its_sign_pattern():
    conv = nn.Conv2d(1, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight[0, 0] = torch.tensor(GOOGLENET_FILTER)
        conv.weight[1, 0] = torch.tensor([[0.0, -1.0, 2.0]] * 3)
    bz.binarize(conv)
    w = conv.weight.detach()
    assert (w[0, 0].sign() == torch.tensor([[-1.0, 1.0, -1.0]] * 3)).all()  # the slides' binarized filter
    assert w[0, 0].abs().unique().tolist() == pytest.approx([np.abs(GOOGLENET_FILTER).mean()])  # its own scale
    assert w[1, 0].tolist() == [[1.0, -1.0, 1.0]] * 3  # a sign of 0 is +1; scale mean |w| = 1


def test_only_k_by_k_filters_are_binarized_and_bq_quantizes_the_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 6, 6))
    assert bz.binarize(net) == {"0": "sign"}
    before = net[1].weight.detach().clone()
    assert torch.equal(net[1].weight, before)  # the 1 x 1 conv keeps its weights
    net2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    assert bz.binarize(net2, quantize_others=True) == {"0": "sign", "1": "int8"}
    w = net2[1].parametrizations.weight.original.detach()
    step = w.abs().max() / 127
    assert torch.allclose(net2[1].weight, torch.round(w / step) * step) and (net2[1].weight / step).abs().max() <= 127.0001


def test_patterns_learn_through_a_straight_gradient_unless_frozen():
    for frozen in (False, True):
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 3, 3, bias=False)
        bz.binarize(conv, freeze_patterns=frozen)
        x = torch.randn(1, 2, 5, 5, requires_grad=True)  # something to differentiate when the patterns are frozen
        conv(x).pow(2).sum().backward()
        latent = conv.parametrizations.weight.original
        if frozen:
            assert latent.grad is None and not latent.requires_grad
        else:  # the gradient with respect to the binarized weight, passed to the full-precision one unchanged
            q = conv.weight.detach().requires_grad_(True)
            torch.nn.functional.conv2d(x.detach(), q).pow(2).sum().backward()
            assert torch.allclose(latent.grad, q.grad)


def test_storage_is_one_bit_per_weight_and_a_scale_per_filter():
    conv = nn.Conv2d(3, 2, 3, bias=False)  # 54 weights: 54 bits in 7 bytes, and 2 float32 scales
    bz.binarize(conv)
    binary, int8, others = bz.stored(conv)
    assert list(binary) == ["weight"] and not int8 and not others
    blob = codec.encode_binary(binary, int8, others)
    header = int.from_bytes(blob[5:9], "little")
    assert len(blob) - 9 - header == 7 + 2 * 4
    assert np.array_equal(codec.decode_binary(blob)["weight"], conv.weight.detach().numpy())


def test_a_chain_binarizes_and_its_file_decodes_exactly(workdir, tiny):
    from rescomp import checkpoint

    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["binarize"] = {"quantize_others": True, "finetune_epochs": 1}
    tiny["pipeline"] = ["train", "binarize"]
    res = CliRunner().invoke(app, ["run", str(write_config(workdir, tiny))])
    assert res.exit_code == 0, res.output
    out = workdir / "runs/exp-binarize-bq"
    s = json.loads((out / "summary.json").read_text())
    last = s["rows"][-1]
    assert last["bin_bytes"] == (out / "binarized.rcbn").stat().st_size and last["bin_compression"] > 3
    assert last["binarized_layers"] == 7 and last["int8_layers"] >= 1 and "SEP-Net-BQ" in last["row"]
    measured_as_its_row(out / "step01/model.pt", last)  # `rescomp measure` of it: its row's costs and bytes
    model, payload = checkpoint.load_model(out / "step01/model.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(codec.network((out / "binarized.rcbn").read_bytes(), payload["arch"])(x), model.eval()(x))
