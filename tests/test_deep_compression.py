# Deep Compression (issue 13): magnitude pruning with masks, weight sharing, storage as the papers count it.
# Wrong versions these tests must catch (each checked once by mutating the code, scripts/mutants.py):
#  1. a gap over the span stored without its filler zero, or the filler at the wrong place
#       -> test_the_slides_relative_index_example_bit_by_bit
#  2. bits miscounted: the codebook or the Huffman tables left out, index width not log2(k)
#       -> same test, test_huffman_lengths_and_bits_by_hand
#  3. a decoder that does not give back the same weights -> test_every_storage_stage_decodes_to_the_same_network
#  4. pruned weights growing back in fine-tuning (the mask not held)
#       -> test_a_chain_prunes_shares_and_writes_a_file_that_decodes_exactly
#  5. the smallest |w| not the one pruned (w instead of |w|), or a global threshold applied per layer
#       -> test_magnitude_masks_by_hand
#  6. a centroid's gradient not the sum of its members' -> test_a_centroid_gradient_is_the_sum_of_its_members
#  7. k-means initialised at random or by density instead of linearly -> test_linear_kmeans_by_hand
#  8. a compared point sized as a dense save, not as the file it is stored in
#       -> test_a_chain_prunes_shares_and_writes_a_file_that_decodes_exactly
#  9. the streaming bit writer losing or reordering the bits left over between fields, or a Huffman
#     table lookup that advances by the wrong length (also past the 20-bit table, by the bit walk), or
#     a stream cut inside its last code decoded from the padding instead of refused
#       -> test_streams_round_trip_bit_for_bit_against_a_bit_list
# 10. Han et al.'s rule (one quality parameter times each layer's std) ranked by raw |w| instead of
#     |w| / std, or by the std of the wrong layer -> test_magnitude_masks_by_hand
# 11. `rescomp measure` of a step's masked or weight-shared model.pt crashing (deepcopy of its pre-hook
#     weight), or counting its centroids as its parameters and its codes as its bytes, where the stage's row
#     measures the network its file decodes to -> test_each_stage_is_a_command_of_its_own
# 12. a compression factor inverted (stored over dense, kept over all weights)
#       -> test_a_chain_prunes_shares_and_writes_a_file_that_decodes_exactly
import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.compress import codec
from rescomp.compress import deep_compression as dc
from rescomp.models import build_model

from conftest import measured_as_its_row, write_config

SPEC = {"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}


def test_the_slides_relative_index_example_bit_by_bit():
    # sep-net-slides.txt: kept positions 1, 4, 15 with 3-bit gaps; 15 - 4 = 11 exceeds the 8 a gap can
    # span, so a filler zero goes in at 4 + 8 = 12. Our first gap counts from -1 (2, where the slides
    # count from 0 and write 1), so that position 0 can be stored; entries and filler are the same.
    w = np.zeros(16, np.float32)
    w[[1, 4, 15]] = [3.4, 0.9, 1.7]
    layer = codec.Layer.sparse(w, gap_bits=3)
    assert layer.gaps == [2, 3, 8, 3] and codec.positions(layer.gaps) == [1, 4, 12, 15]
    assert layer.values.tolist() == pytest.approx([3.4, 0.9, 0.0, 1.7])
    assert codec.layer_bits(layer) == 4 * (3 + 32)  # 4 entries of a 3-bit gap and a float32
    blob = codec.encode_layer(layer)
    assert len(blob) == 18  # 140 bits, padded to a whole byte
    assert np.array_equal(codec.decode_layer(blob, (16,), 4, 3).dense(), w)
    # the same positions as 2-bit codes into a codebook of 4 (code 0 the zero): 4 x (3 + 2) + 4 x 32 bits
    index = np.zeros(16, np.int64)
    index[[1, 4, 15]] = [1, 2, 3]
    shared = codec.Layer.shared(index, np.array([0.0, 3.4, 0.9, 1.7], np.float32), gap_bits=3, index_bits=2)
    assert codec.layer_bits(shared) == 4 * (3 + 2) + 4 * 32
    assert shared.values.tolist() == [1, 2, 0, 3]  # the filler is code 0
    assert np.array_equal(codec.decode_layer(codec.encode_layer(shared), (16,), 4, 3, 2, 4).dense(), w)
    assert codec.gaps([0], 3)[0] == [1]  # position 0 is storable
    # a gap of exactly the span (2**3) needs no filler: it is stored as 8 (written 7); one more needs one
    assert codec.gaps([7], 3) == ([8], [False]) and codec.gaps([8], 3) == ([8, 1], [True, False])
    with pytest.raises(ValueError, match="above 8 bits"):  # Huffman tables hold 8-bit symbols
        codec.encode_layer(codec.Layer((4,), 9, [1] * 4, np.zeros(4, np.float32)))


def test_huffman_lengths_and_bits_by_hand():
    symbols = [0] * 4 + [1] * 2 + [2] + [3]
    assert codec.huffman_lengths(symbols) == {0: 1, 1: 2, 2: 3, 3: 3}
    codes = codec.canonical_codes(codec.huffman_lengths(symbols))
    assert codes == {0: (0b0, 1), 1: (0b10, 2), 2: (0b110, 3), 3: (0b111, 3)}
    # 4 x 1 + 2 x 2 + 3 + 3 = 14 bits of codes, and the table: 16 bits of count, 16 per symbol
    assert codec._huffman_bits(symbols) == 14 + 16 + 4 * 16
    assert codec.huffman_lengths([5, 5, 5]) == {5: 1}
    layer = codec.Layer(tuple([8]), 3, [1] * 8, np.array(symbols), np.zeros(4, np.float32), 2)
    blob = codec.encode_layer(layer, huffman=True)
    assert len(blob) * 8 - codec.layer_bits(layer, huffman=True) in range(8)
    back = codec.decode_layer(blob, (8,), 8, 3, 2, 4, huffman=True)
    assert back.values.tolist() == symbols and back.gaps == [1] * 8


def _bit_list(fields):
    """The reference: every field's bits as a Python list, most significant first, zero-padded."""
    bits = [int(b) for value, n in fields for b in format(value, f"0{n}b")] if fields else []
    bits += [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


@pytest.mark.parametrize("seed", range(6))
def test_streams_round_trip_bit_for_bit_against_a_bit_list(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    w, fields = codec.BitWriter(), []
    for _ in range(8):  # fixed-width arrays of odd widths, in chunks smaller than an array
        n = int(rng.integers(1, 12))
        values = rng.integers(0, 1 << n, int(rng.integers(0, 40)))
        w.write_array(values, n, chunk=7)
        fields += [(int(v), n) for v in values]
    symbols = rng.choice(6, size=200, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    codes = codec.canonical_codes(codec.huffman_lengths(symbols.tolist()))
    w.write_codes(symbols, codes, chunk=13)
    fields += [codes[int(s)] for s in symbols]
    w.write(5, 3)
    fields.append((5, 3))
    blob = w.getvalue()
    assert blob == _bit_list([(v, n) for v, n in fields])
    r = codec.BitReader(blob)
    for v, n in fields[:len(fields) - len(symbols) - 1]:
        assert r.read(n) == v
    assert r.read_huffman(codes, len(symbols)).tolist() == symbols.tolist()
    assert r.read(3) == 5
    # Fibonacci counts give codes longer than the lookup table takes (held at 8 bits here): the bit walk
    skew = [s for s in range(14) for _ in range(int(round(1.618 ** s)))]
    monkeypatch.setattr(codec, "TABLE_BITS", 8)
    lengths = codec.huffman_lengths(skew)
    assert max(lengths.values()) > codec.TABLE_BITS
    layer = codec.Layer((len(skew),), 3, [1] * len(skew), np.array(skew), np.zeros(32, np.float32), 5)
    back = codec.decode_layer(codec.encode_layer(layer, huffman=True), (len(skew),), len(skew), 3, 5, 32, huffman=True)
    assert back.values.tolist() == skew
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_layer(codec.encode_layer(layer, huffman=True)[:-40], (len(skew),), len(skew), 3, 5, 32, huffman=True)
    # A stream cut inside its last code (the table path): codes a=0, b=10, c=11; "aaaaaaa" + "c" is 9 bits. Cut
    # to its first byte, the last code starts at bit 7 and reads the zero padding as "10": b, not an error.
    monkeypatch.setattr(codec, "TABLE_BITS", 16)
    three = {0: (0b0, 1), 1: (0b10, 2), 2: (0b11, 2)}
    w = codec.BitWriter()
    w.write_codes(np.array([0] * 7 + [2]), three, chunk=8)
    assert codec.BitReader(w.getvalue()).read_huffman(three, 8).tolist() == [0] * 7 + [2]
    with pytest.raises(ValueError, match="truncated"):
        codec.BitReader(w.getvalue()[:1]).read_huffman(three, 8)


def test_magnitude_masks_by_hand():
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-4.0, 0.5, -0.1, 3.0]]))
        model[1].weight.copy_(torch.tensor([[10.0, -20.0]]))
    per_layer = dc.magnitude_masks(model, 0.5, "layer")
    assert per_layer["0"].tolist() == [[True, False, False, True]] and per_layer["1"].tolist() == [[False, True]]
    everywhere = dc.magnitude_masks(model, 0.5, "global")  # 3 of 6: 0.5, -0.1 and 3.0 go, the big layer stays
    assert everywhere["0"].tolist() == [[True, False, False, False]] and everywhere["1"].tolist() == [[True, True]]
    # Han et al.: |w| < q x (the layer's std), one q for all: |w| / std ranked together. Layer 0's std is
    # 2.5085 (population, of -4, 0.5, -0.1, 3), layer 1's 15: ratios 1.595 0.199 0.040 1.196 | 0.667 1.333
    by_std = dc.magnitude_masks(model, 0.5, "std")  # 3 of 6: -0.1, 0.5 and 10 go
    assert by_std["0"].tolist() == [[True, False, False, True]] and by_std["1"].tolist() == [[False, True]]
    by_std = dc.magnitude_masks(model, 2 / 6, "std")  # one threshold: both from layer 0 (per layer: one each)
    assert by_std["0"].tolist() == [[True, False, False, True]] and by_std["1"].tolist() == [[True, True]]
    by_std = dc.magnitude_masks(model, 4 / 6, "std")  # then 3.0 (1.196), not -20 (1.333) nor -4
    assert by_std["0"].tolist() == [[True, False, False, False]] and by_std["1"].tolist() == [[False, True]]
    dc.apply_masks(model, per_layer)
    again = dc.magnitude_masks(model, 0.75, "layer")  # zeros count among the pruned: one more goes
    assert again["0"].tolist() == [[True, False, False, False]]


def test_linear_kmeans_by_hand():
    values = torch.tensor([0.0, 0.1, 0.2, 0.9, 1.0, 3.0])
    # linear start 0, 1.5, 3 -> members {0, 0.1, 0.2}, {0.9, 1.0}, {3.0}
    centroids, index = dc.linear_kmeans(values, 3, iterations=1)
    assert centroids.tolist() == pytest.approx([0.1, 0.95, 3.0]) and index.tolist() == [0, 0, 0, 1, 1, 2]
    # start 0, 1.5, 3 again: nothing is near 1.5, and an empty centroid keeps its place
    centroids, index = dc.linear_kmeans(torch.tensor([0.0, 0.1, 2.9, 3.0]), 3)
    assert centroids.tolist() == pytest.approx([0.05, 1.5, 2.95]) and index.tolist() == [0, 0, 2, 2]


def test_a_centroid_gradient_is_the_sum_of_its_members():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 1.1], [3.0, 2.9, 1.0]]))
    dc.share(layer, bits=2)  # 3 centroids + the zero code
    assert layer.weight_index.tolist() == [[1, 0, 1], [3, 3, 1]]
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    (layer(x) * torch.tensor([[1.0, -2.0], [3.0, 1.0]])).sum().backward()
    g = torch.tensor([[1.0, -2.0], [3.0, 1.0]]).T @ x  # d loss / d weight
    assert layer.centroids.grad.tolist() == pytest.approx([float(g[0, 0] + g[0, 2] + g[1, 2]), 0.0, float(g[1, 0] + g[1, 1])])


def test_every_storage_stage_decodes_to_the_same_network():
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    dc.apply_masks(model, dc.magnitude_masks(model, 0.7, "global"))
    for n, m in dc.coded_layers(model):
        dc.share(m, dc.bits_for(m, 4, 3))
    x = torch.randn(4, 3, 32, 32)
    files = dc.encodings(model)
    assert set(files) == {"dense", "sparse", "shared", "huffman"}
    with torch.no_grad():
        want = model(x)
        for stage, blob in files.items():
            assert torch.equal(codec.network(blob, SPEC)(x), want), stage
    assert len(files["huffman"]) < len(files["shared"]) < len(files["sparse"]) < len(files["dense"])


def test_a_chain_prunes_shares_and_writes_a_file_that_decodes_exactly(workdir, tiny):
    from rescomp import checkpoint

    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["magnitude_prune"] = {"share_per_step": 0.3, "steps": 2, "finetune_epochs": 1}
    tiny["weight_share"] = {"conv_bits": 4, "fc_bits": 3, "finetune_epochs": 1, "iterations": 10}
    tiny["pipeline"] = ["train", "magnitude_prune", "weight_share"]
    res = CliRunner().invoke(app, ["run", str(write_config(workdir, tiny))])
    assert res.exit_code == 0, res.output
    mp = json.loads((workdir / "runs/exp-mprune-layer-60/summary.json").read_text())
    assert [r["share"] for r in mp["rows"]] == [0.0, 0.3, 0.6]
    assert [round(r["weights_kept"], 2) for r in mp["rows"]] == [1.0, 0.7, 0.4]  # measured after fine-tuning
    assert all(v == pytest.approx(0.4, abs=0.02) for v in mp["rows"][-1]["kept_per_layer"].values())
    out = checkpoint.load(workdir / "runs/exp-mprune-layer-60/model.pt")
    assert "masked" not in out["arch"]
    coded = [k for k in out["state_dict"] if k.endswith("weight") and out["state_dict"][k].dim() > 1]
    zero = sum(int((out["state_dict"][k] == 0).sum()) for k in coded) / sum(out["state_dict"][k].numel() for k in coded)
    assert zero == pytest.approx(0.6, abs=0.01)  # the zeros held through both retrainings
    share = workdir / "runs/exp-mprune-layer-60-share-4b3b"
    s = json.loads((share / "summary.json").read_text())
    last = s["rows"][-1]
    assert last["weights_kept"] == pytest.approx(0.4, abs=0.01)
    assert last["dc_huffman_bytes"] == (share / "compressed.rcdc").stat().st_size
    assert last["dc_dense_bytes"] > last["dc_sparse_bytes"] > last["dc_shared_bytes"]
    # the compression factors, the papers' way: dense over stored, all weights over the ones kept
    best = min(last[k] for k in last if k.startswith("dc_") and k.endswith("_bytes"))
    assert last["stored_bytes"] == best and last["dc_compression"] == last["dc_dense_bytes"] / best > 1
    assert last["weights_compression"] == last["coded_weights"] / last["nonzero_weights"] == pytest.approx(2.5, abs=0.1)
    # the rows name the pruning they came from, so two pruning runs' shared rows are told apart
    assert [r["row"] for r in s["rows"]] == ["cifar_resnet before sharing (60% pruned, layer)",
                                            "cifar_resnet weight-shared (60% pruned, layer)"]
    # one storage curve per chain: dense -> sparse (each pruning step) -> shared and Huffman-coded
    assert {r["storage_curve"] for r in mp["rows"] + s["rows"]} == {"cifar_resnet, Deep Compression (layer)"}
    res = CliRunner().invoke(app, ["report", "runs/exp-mprune-layer-60", str(share), "--table", "dcr"])
    assert res.exit_code == 0, res.output
    assert (workdir / "results/dcr/accuracy_vs_storage.png").stat().st_size > 10_000
    assert "storage_curve" not in (workdir / "results/dcr/table.md").read_text()
    res = CliRunner().invoke(app, ["compare", "runs", "--table", "dc", "--baseline", "exp"])
    assert res.exit_code == 0, res.output
    pts = json.loads((workdir / "results/dc/compare.json").read_text())
    shared = next(p for p in pts if p["chain"] == "magnitude-prune → weight-share")
    assert shared["size_bytes"] == min(last["dc_shared_bytes"], last["dc_huffman_bytes"])  # the file, not a dense save
    model, payload = checkpoint.load_model(share / "step01/model.pt")
    assert set(payload["arch"]["shared"].values()) == {4, 3}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(codec.network((share / "compressed.rcdc").read_bytes(), payload["arch"])(x), model.eval()(x))


def test_each_stage_is_a_command_of_its_own(workdir, tiny):
    # `rescomp magnitude-prune` / `weight-share` / `binarize`: the one-stage chain from the config's
    # trained model, the same folders as `rescomp run`; a bad section is one line, exit 2
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["magnitude_prune"] = {"share_per_step": 0.5, "steps": 1, "finetune_epochs": 0, "scope": "std"}
    tiny["weight_share"] = {"conv_bits": 3, "fc_bits": 2, "finetune_epochs": 0, "iterations": 5}
    cfg = write_config(workdir, tiny)
    res = CliRunner().invoke(app, ["magnitude-prune", str(cfg)])
    assert res.exit_code == 0, res.output
    mp = json.loads((workdir / "runs/exp-mprune-std-50/summary.json").read_text())
    assert mp["stage"] == "magnitude_prune" and mp["rows"][-1]["weights_kept"] == pytest.approx(0.5, abs=0.01)
    # killed after its last step but before its summary: the run resumes from the finished steps
    baked = (workdir / "runs/exp-mprune-std-50/model.pt").read_bytes()
    (workdir / "runs/exp-mprune-std-50/summary.json").unlink()
    res = CliRunner().invoke(app, ["magnitude-prune", str(cfg)])
    assert res.exit_code == 0, res.output
    again = json.loads((workdir / "runs/exp-mprune-std-50/summary.json").read_text())
    assert again["rows"][-1]["kept_per_layer"] == mp["rows"][-1]["kept_per_layer"]
    assert torch.equal(*(torch.load(io.BytesIO(b), weights_only=True)["state_dict"]["conv1.weight"]
                         for b in (baked, (workdir / "runs/exp-mprune-std-50/model.pt").read_bytes())))
    assert "share of each layer's weights kept" in mp["sections"][0]["title"]
    res = CliRunner().invoke(app, ["measure", "runs/exp-mprune-std-50"])  # a folder: the network it hands on, baked
    assert res.exit_code == 2 and "the network it made is runs/exp-mprune-std-50/model.pt" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["weight-share", str(cfg), "--set", "weight_share.checkpoint=runs/exp-mprune-std-50/model.pt"])
    assert res.exit_code == 0, res.output
    assert "stored in" in res.output
    share = json.loads((workdir / "runs/exp-share-3b2b/summary.json").read_text())
    assert share["rows"][-1]["weights_kept"] == pytest.approx(0.5, abs=0.01)  # it took the pruned network
    assert share["rows"][-1]["row"] == "cifar_resnet weight-shared (50% pruned, std)"
    # `rescomp measure` of a step's network (masked, weight-shared) gives its row's costs and stored bytes
    assert measured_as_its_row(workdir / "runs/exp-share-3b2b/step01/model.pt", share["rows"][-1])["stored_as"] == "huffman"
    measured_as_its_row(workdir / "runs/exp-mprune-std-50/step01/model.pt", mp["rows"][-1])
    res = CliRunner().invoke(app, ["binarize", str(cfg), "--set", "binarize.finetune_epochs=-1"])
    assert res.exit_code == 2 and "finetune_epochs" in res.output
