# int8 through torchao's PT2E, run compiled by Inductor (`quantize.backend: pt2e`, issue 11).
# Wrong versions these tests must catch (checked by mutating the code, scripts/mutants.py):
#  1. calibration data ignored: int8 outputs far from fp32 -> test_pt2e_int8_tracks_fp32_and_reloads_identically
#  2. the converted program not stored (a reload that recalibrates): outputs differ -> same test
#  3. int8 compiled by Inductor compared with fp32 timed in eager PyTorch only (a slower runtime than
#     the one int8 runs on), or its latency filed under PyTorch's column
#       -> test_a_quantize_run_with_pt2e_end_to_end
#  4. QAT that fine-tunes the caller's fp32 network in place (the fp32 row then reports the fine-tuned
#     weights) -> test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned
#  5. QAT converted with its batch norms still on batch statistics (eval() not switching the exported
#     graph): outputs depend on the batch -> same test
#  6. QAT whose fine-tuning never reaches the converted program (the fp32 weights converted instead) -> same test
#  6b. QAT converted without folding its batch norms into the int8 convs (the pass PTQ skips) -> same test
#  7. convert_pt2e's unused fp32 weights stored beside the int8 ones, or each node's source lines
#     (this machine's paths) kept -> test_pt2e_int8_tracks_fp32_and_reloads_identically
#  8. torchao's 8-bit activations kept on a CPU without VNNI, where oneDNN's int16 pair sums saturate,
#     or on a VNNI CPU whose oneDNN ONEDNN_MAX_CPU_ISA holds to AVX2 -> test_auto_activation_width_keeps_int8_sums_exact
#  9. ResNet50V2's block calling one ReLU module three times: torch.export makes the three calls one
#     source partition with three outputs, which X86InductorQuantizer refuses
#       -> test_resnet50v2_quantizes_through_pt2e
# 10. a network in which the quantizer annotates nothing converted anyway: the fp32 network stored and
#     reported as int8 (torch 2.11 annotated nothing in a non-strict capture, whose nodes carry no
#     source_fn_stack; that capture itself is caught only there, by
#     test_pt2e_int8_tracks_fp32_and_reloads_identically) -> test_a_network_with_nothing_to_quantize_is_refused;
#     the non-strict capture, where torch 2.14 still quantizes -> test_the_capture_records_the_source_of_each_conv_the_quantizer_looks_for
# 11. a second batch size timed on the dynamic-shape graph torch.compile makes by default when a compiled
#     function sees a new size -> test_inductor_runs_the_fp32_network_it_compiles

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.config_sections import QuantizeConfig
from rescomp.models import build_model

from conftest import quantized, write_config

pytest.importorskip("torchao")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pt2e_int8_tracks_fp32_and_reloads_identically(tmp_path):
    from rescomp.compress import quantize_pt2e
    from rescomp.compress.quantize import load_int8, save_int8

    torch.manual_seed(0)
    spec = {"arch": "cifar_resnet", "depth": 8, "width": 8, "num_classes": 10}
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]
    cfg = QuantizeConfig(backend="pt2e")
    q, info, blob = quantize_pt2e.ptq(model, cfg, data, 32)
    assert info["calibration_images"] == 64
    x = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = model(x)
    out = q(x)
    assert float((out - ref).abs().mean()) < 0.03 * float(ref.max() - ref.min())
    save_int8(tmp_path / "int8.pt", q, spec, cfg, 32, {"top1": 0.0}, blob=blob)
    again, payload = load_int8(tmp_path / "int8.pt")
    assert torch.equal(again(x), out) and payload["pt2"] == blob
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert len(blob) < 0.6 * fp32_bytes + 200_000  # int8 weights, fp32 biases and scales, and the graph itself
    from rescomp.measure import state_dict_bytes

    assert again.tensor_bytes < 0.5 * state_dict_bytes(model)  # counted as the fp32 state_dict is, without the graph
    assert str(Path(__file__).resolve().parent.parent).encode() not in blob  # no source paths of this machine


def test_resnet50v2_quantizes_through_pt2e():
    from rescomp.compress import quantize_pt2e
    from rescomp.models.resnet50v2 import BlockV2, ResNet50V2

    torch.manual_seed(0)
    model = ResNet50V2(10, blocks=(2, 2, 2, 2))
    # its own stem and forward; two narrow blocks (a projecting one, then an identity one) keep it fast
    model.stacks = torch.nn.Sequential(BlockV2(64, 4, 1, True), BlockV2(16, 4, 1, False))
    model.post_bn, model.fc = torch.nn.BatchNorm2d(16), torch.nn.Linear(16, 10)
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():  # batch statistics that are not the identity, so the BNs do something
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32, generator=g))
    model.eval()
    q, _, _ = quantize_pt2e.ptq(model, QuantizeConfig(backend="pt2e"), [torch.randn(32, 3, 32, 32, generator=g)], 32)
    x = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = model(x)
    assert float((q(x) - ref).abs().mean()) < 0.05 * float(ref.max() - ref.min())


def test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned(tmp_path):
    import copy

    import torch.nn.functional as F

    from rescomp.compress import quantize_pt2e
    from rescomp.compress.quantize import load_int8, save_int8

    torch.manual_seed(0)
    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 8, "num_classes": 10})
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    prepared = quantize_pt2e.prepare_qat(model, QuantizeConfig(backend="pt2e", method="qat"), 32)
    assert prepared.training
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        start = F.cross_entropy(prepared.eval()(x), y)
    prepared.train()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(prepared(x), y).backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the fp32 network is untouched
    with torch.no_grad():
        fake = prepared.eval()(x)
        alone = prepared(x[:3])
    assert float((alone - fake[:3]).abs().max()) < 0.02 * float(fake.max() - fake.min())  # eval: running statistics
    assert float(F.cross_entropy(fake, y)) < 0.8 * float(start)  # it learned, judged on running statistics
    q, blob = quantize_pt2e.convert_qat(prepared, 32)
    # each batch norm folded into its conv's int8 weights, none left to run in fp32 beside them
    assert not [n for n in q.net.graph.nodes if "batch_norm" in str(n.target)]
    out = q(x)
    assert float((out - fake).abs().mean()) < 0.03 * float(fake.max() - fake.min())  # int8 computes what QAT trained
    # running statistics: a sample's outputs do not depend on its batch (batch statistics move them by
    # tenths). Checked on the converted program as it is, not compiled again for a batch of 3
    with torch.no_grad():
        alone, whole = q.net(x[:3]), q.net(x)
    assert float((alone - whole[:3]).abs().max()) < 1e-5 * float(whole.abs().max())
    # what the quantize stage saves is this program's bytes, and it loads (a reload runs the same
    # program: test_pt2e_int8_tracks_fp32_and_reloads_identically; running it here would compile it again)
    cfg = QuantizeConfig(backend="pt2e", method="qat")
    save_int8(tmp_path / "int8.pt", q, {"arch": "cifar_resnet", "depth": 8, "width": 8, "num_classes": 10}, cfg, 32, {},
              blob=blob)
    _, payload = load_int8(tmp_path / "int8.pt")
    assert payload["quantize"]["method"] == "qat" and payload["pt2"] == blob


def test_a_network_with_nothing_to_quantize_is_refused():
    from rescomp.compress import quantize_pt2e
    from rescomp.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.ReLU()).eval()
    with pytest.raises(ConfigError, match="found no conv or linear to quantize"):
        quantize_pt2e.ptq(model, QuantizeConfig(backend="pt2e"), [torch.randn(2, 3, 32, 32)], 32)


def test_the_capture_records_the_source_of_each_conv_the_quantizer_looks_for():
    # X86InductorQuantizer finds convs by their nodes' source_fn_stack, which only a strict capture
    # records; torch 2.14 falls back to nn_module_stack, so only this catches a non-strict one there
    from rescomp.compress import quantize_pt2e

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3)).eval()
    prepared = quantize_pt2e._annotated(model, QuantizeConfig(backend="pt2e"), 8, qat=False)
    convs = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 2 and all(n.meta.get("source_fn_stack") for n in convs)
    assert all("quantization_annotation" in n.meta for n in convs)  # and the quantizer found each


def test_auto_activation_width_keeps_int8_sums_exact(monkeypatch):
    # 64 channels of the largest activation (255 in 8 bits) times the largest weight (127): each int16
    # pair sum of a non-VNNI kernel would hold 2 x 255 x 127 = 64,770 and saturate at 32,767
    import torch.nn as nn

    import rescomp.hardware as hw
    from rescomp.compress import quantize_pt2e

    spread, total = nn.Conv2d(3, 64, 1, bias=False), nn.Conv2d(64, 8, 1, bias=False)
    with torch.no_grad():
        spread.weight.zero_()
        spread.weight[:, 0] = 1.0
        total.weight.fill_(1.0)
    model = nn.Sequential(spread, nn.ReLU(), total).eval()
    calib = [torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    x = torch.ones(1, 3, 8, 8)  # every activation at the calibrated maximum
    q, info, _ = quantize_pt2e.ptq(model, QuantizeConfig(backend="pt2e"), calib, 8)
    assert float(q(x).min()) == pytest.approx(64.0, rel=0.03)  # auto on this CPU: exact within a step
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert quantize_pt2e.describe(QuantizeConfig(backend="pt2e"))["activation_bits"] == 7
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert quantize_pt2e.describe(QuantizeConfig(backend="pt2e"))["activation_bits"] == 8
    # a VNNI CPU whose oneDNN is held to the AVX2 kernels (the suite's second pass) saturates as one without
    for cap, bits in (("AVX2", 7), ("avx512_core", 7), ("AVX512_CORE_VNNI", 8), ("AVX512_CORE_AMX", 8)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert quantize_pt2e.describe(QuantizeConfig(backend="pt2e"))["activation_bits"] == bits, cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hw.has_vnni() and not hw.has_vnni(onednn=True)  # ONNX Runtime and FBGEMM ignore the cap


def test_inductor_runs_the_fp32_network_it_compiles():
    from rescomp.measure import InductorForward

    from torch._dynamo.utils import counters

    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}).eval()
    f = InductorForward(model)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for batch in (2, 3, 4):
            x = torch.randn(batch, 3, 32, 32)
            assert torch.allclose(f(x), model(x), atol=1e-4)
    # each batch size timed as compiled for it: a static graph each, where torch's default compiles the
    # second size seen as a dynamic-shape graph that serves the third too
    assert counters["stats"]["unique_graphs"] - before == 3


def test_a_quantize_run_with_pt2e_end_to_end(workdir, tiny):
    s = quantized(workdir, tiny, backend="pt2e", calibration_images=32)
    assert s["quantization"]["backend"] == "pt2e" and s["quantization"]["lowering"] == "Inductor, freezing"
    assert s["latency_ms_ind_b1"] > 0 and "latency_ms_cpu_b1" not in s
    assert s["fp32_latency_ms_cpu_b1"] > 0 and s["fp32_latency_ms_ind_b1"] > 0  # fp32 where int8 runs, too
    best = min(s["fp32_latency_ms_cpu_b1"], s["fp32_latency_ms_ind_b1"])
    assert s["speedup_cpu_b1"] == pytest.approx(best / s["latency_ms_ind_b1"])
    res = cli("measure", workdir / "runs/exp-ptq-pt2e/int8.pt", "--json", "--set", "measure.latency=false")
    assert res.exit_code == 0 and json.loads(res.stdout)["size_bytes"] == s["size_bytes"] < s["file_bytes"]
    # QAT's stage is the backend-independent one test_quantize.py runs; PT2E's QAT program, its
    # conversion and the int8.pt it saves are checked by test_pt2e_qat_fine_tunes_a_copy_and_converts_what_it_learned


def test_a_network_torchao_cannot_annotate_is_one_line(workdir, tiny, monkeypatch):
    # as torchao 0.18's X86InductorQuantizer does for ResNet50V2, whose pre-activations feed two convs
    import rescomp.compress.quantize_pt2e as p

    real = p._api

    def refusing():
        api = real()

        def prepare_pt2e(*a, **k):
            raise ValueError("Input partition has more than one output node")

        api.prepare = prepare_pt2e
        return api

    monkeypatch.setattr(p, "_api", refusing)
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["quantize"] = {"backend": "pt2e", "calibration_images": 8}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0
    res = cli("quantize", path)
    assert res.exit_code == 2 and "cannot annotate this network" in res.stderr and "Traceback" not in res.output
    assert not list(workdir.glob("runs/exp-ptq*"))
