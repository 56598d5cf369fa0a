# Wrong versions this file must catch (each checked by mutating the code and seeing a test fail):
# - weights quantized per tensor, not per output channel      -> test_weights_are_int8_per_output_channel
# - calibration on test images, not training images           -> test_calibration_sees_training_images_only
# - quantize.reduce_range ignored, or `auto` resolved to another
#   backend's default (x86/fbgemm 7-bit, qnnpack 8-bit)        -> test_reduce_range_reaches_every_activation_observer
# - the summary / row not saying which activation width ran, or
#   a finished run returned for other quantize settings       -> test_quantize_run_measures_int8_beside_fp32
# - a residual sum (an addition with no ReLU after it) on an int8 grid, which clips or coarsens the
#   values a pre-activation stream carries; or the wrong add picked (its call index off by one)
#                                                              -> test_residual_sums_stay_fp32
# - every addition in fp32, the ones fused with a ReLU too    -> test_residual_sums_with_a_relu_stay_int8
# - the batch norms that read the fp32 stream quantized       -> test_batch_norms_that_read_a_residual_stream_run_in_fp32
# - the classifier's output on an int8 grid (ties at the top) -> test_the_classifier_output_is_not_rounded
# - the classifier traced only to the output's own module     -> test_the_classifier_is_traced_back_to_its_last_weighted_layer
# - the stem's zero pad re-quantized with scales of its own    -> test_zero_pad_keeps_its_inputs_int8_grid
# - 8-bit activations on x86 without VNNI not flagged         -> test_saturation_risk_is_flagged
# - a bad reduce_range value not one clear line (exit 2)       -> test_quantize_bad_input
# - a layer left fp32 counted as int8 (the classifier of FX, any layer of an fp32 graph), or a run
#   that stores an "int8" network with no int8 layer             -> test_every_backend_saves_what_reloads_with_identical_outputs,
#       test_a_layer_left_fp32_is_not_counted_as_int8_by_any_backend, test_an_int8_network_with_no_int8_layer_is_refused,
#       test_quantize_run_measures_int8_beside_fp32 (which `rescomp measure int8.pt` reports too)
# - a QAT run that only calibrates (no fine-tuning), or its row not saying QAT -> test_qat_fine_tunes_then_converts
# - an FX QAT int8.pt rebuilt as a PTQ graph, so that a pre-activation network's (ResNet50V2's) cannot be
#   reloaded, measured or exported -> test_an_fx_qat_network_reloads_with_identical_outputs
# - an int8.pt whose state_dict lost its module versions (LeNet-5's quantized Linear cannot reload)
#       -> test_every_backend_saves_what_reloads_with_identical_outputs[x86-lenet5]
# - int8 far from fp32; a reload that recalibrates or differs -> test_int8_agrees_with_fp32_and_reloads_identically
# - a registered backend whose int8.pt reloads as another backend's, or not at all
#       -> test_every_backend_saves_what_reloads_with_identical_outputs (parametrized over the registry)
# - the top-1 drop's standard error taken as two unpaired binomial errors, or without the mean
#   difference's square; agreement counted as "both right or both wrong" instead of "same class";
#   the images only fp32 / only int8 gets right swapped
#       -> test_paired_counts_only_the_images_the_two_differ_on, test_quantize_run_measures_int8_beside_fp32
import json

import operator

import pytest
import torch

from rescomp import checkpoint
from rescomp.cli import app
from rescomp.compress.quantize import load_int8, ptq, save_int8
from rescomp.config import validate
from rescomp.config_sections import QuantizeConfig
from rescomp.data import synthetic
from rescomp.config import DataConfig
from rescomp.errors import ConfigError
from rescomp.stages.quantize import run_quantize
from rescomp.stages.train import run_train
from typer.testing import CliRunner

from conftest import write_config


def _trained_tiny(workdir, tiny, epochs=8):
    tiny["train"]["epochs"] = epochs
    tiny["data"]["synthetic"].update(train_size=256, test_size=512)
    tiny["model"]["width"] = 8
    tiny["measure"].update(batch_sizes=[1, 8])
    cfg = validate({**tiny, "quantize": {"calibration_images": 64}}, "t")
    run_train(cfg)
    return cfg


def test_int8_agrees_with_fp32_and_reloads_identically(workdir, tiny):
    cfg = _trained_tiny(workdir, tiny)
    model, payload = checkpoint.load_model(workdir / f"runs/{cfg.run_name}/model.pt")
    model.eval()
    data = synthetic(DataConfig(dataset="synthetic", synthetic={"train_size": 64, "test_size": 64}))
    calib, x = ((d.float() / 255 - 0.5) / 0.25 for d in (data.train_x, data.test_x))
    qmodel, info = ptq(model, QuantizeConfig(), [calib[:32], calib[32:]], 32)
    assert info["calibration_images"] == 64
    with torch.no_grad():
        agree = (qmodel(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree >= 0.9
    save_int8(workdir / "q.pt", qmodel, payload["arch"], QuantizeConfig(), 32, {})
    again, _ = load_int8(workdir / "q.pt")
    assert torch.equal(again(x), qmodel(x))


def _backends() -> list[str]:
    from rescomp.compress.quantize import BACKENDS, backend

    backend("x86")  # every backend module registers its own
    return BACKENDS.names()


# LeNet-5's hidden Linear layers are int8 (its classifier is not): an FX reload needs the state_dict's
# module versions (_metadata), which a checkpoint that rebuilds its dicts would drop (KeyError '5.weight').
# The other backends save a graph's bytes, not a state_dict: ResNet-8 alone for them.
RESNET8, LENET5 = ({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}, 16), ({"arch": "lenet5", "num_classes": 10}, 32)


@pytest.mark.parametrize("name, spec, size", [pytest.param(n, *RESNET8, id=n) for n in _backends()]
                         + [pytest.param(n, *LENET5, id=f"{n}-lenet5") for n in ("x86", "fbgemm", "qnnpack")])
def test_every_backend_saves_what_reloads_with_identical_outputs(tmp_path, name, spec, size):
    from rescomp.compress.quantize import backend
    from rescomp.models import build_model

    if name == "qnnpack" and "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    torch.manual_seed(0)
    model, cfg = build_model(spec).eval(), QuantizeConfig(backend=name)
    q, info, blob = backend(name).ptq(model, cfg, [torch.randn(16, 3, size, size)], size)
    assert info["backend"] == name and info["calibration_images"] == 16
    save_int8(tmp_path / "int8.pt", q, spec, cfg, size, {}, blob=blob)
    again, payload = load_int8(tmp_path / "int8.pt")
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        assert torch.equal(again(x), q(x)) and payload["quantize"]["backend"] == name
    # ResNet-8: a stem, 6 block convs (option A shortcuts have none) and the classifier; Caffe's LeNet-5:
    # 2 convs and 2 linears. FX keeps the classifier fp32; ONNX Runtime and PT2E quantize every one
    weighted = 4 if spec["arch"] == "lenet5" else 8
    expected = (weighted - 1, weighted) if name in ("x86", "fbgemm", "qnnpack") else (weighted, weighted)
    assert backend(name).layers(q) == expected == backend(name).layers(again)


def test_a_layer_left_fp32_is_not_counted_as_int8_by_any_backend(tmp_path):
    # each counter reads the fp32 network's own form (module, ONNX graph, exported program) as 0 int8
    from types import SimpleNamespace

    from rescomp.compress.quantize import backend
    from rescomp.export import export_onnx
    from rescomp.models import build_model

    model = build_model(RESNET8[0]).eval()
    export_onnx(model, 16, tmp_path / "fp32.onnx")
    program = torch.export.export(model, (torch.zeros(2, 3, 16, 16),)).module()
    assert backend("x86").layers(model) == (0, 8)
    assert backend("onnxruntime").layers(SimpleNamespace(model=(tmp_path / "fp32.onnx").read_bytes())) == (0, 8)
    assert backend("pt2e").layers(SimpleNamespace(net=program)) == (0, 8)


def test_an_int8_network_with_no_int8_layer_is_refused():
    from rescomp.compress.quantize import backend, counted_layers

    b = backend("x86")
    classifier_only = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10)).eval()
    q, _, _ = b.ptq(classifier_only, QuantizeConfig(), [torch.randn(8, 3, 4, 4)], 4)  # FX keeps it fp32
    with pytest.raises(ConfigError, match="FX x86 left all 1 conv and linear layers of this network in fp32"):
        counted_layers(b, q)
    with pytest.raises(ConfigError, match="has no conv or linear layer"):
        counted_layers(b, torch.nn.Sequential(torch.nn.ReLU()))


def test_quantize_run_measures_int8_beside_fp32(workdir, tiny):
    cfg = _trained_tiny(workdir, tiny)
    run_dir, s = run_quantize(cfg)
    assert run_dir.name == f"{cfg.run_name}-ptq"
    assert s["quantization"] == {"method": "ptq", "backend": "x86", "activation_bits": 7, "calibration_images": 64}
    assert s["row"] == f"{cfg.run_name} int8 FX x86 (7-bit act.)"
    assert (s["int8_layers"], s["weight_layers"]) == (7, 8)  # ResNet-8's classifier stays fp32
    assert abs(s["top1"] - s["fp32_top1"]) <= 5
    n = s["test_images"]
    assert s["top1_drop"] == pytest.approx(100 * (s["only_fp32_right"] - s["only_int8_right"]) / n)
    assert 100 - s["agreement"] >= 100 * (s["only_fp32_right"] + s["only_int8_right"]) / n - 1e-9
    assert s["size_ratio"] < 0.5 and s["size_bytes"] == s["fp32_size_bytes"] * s["size_ratio"]
    assert s["speedup_cpu_b8"] > 0 and s["act_peak_bytes_b1"] < s["fp32_act_peak_bytes_b1"]
    assert (run_dir / "int8.pt").is_file() and (run_dir / "summary.json").is_file()
    res = CliRunner().invoke(app, ["measure", str(run_dir / "int8.pt"), "--json"])
    assert res.exit_code == 0, res.output
    measured = json.loads(res.stdout)
    assert measured["dtype"] == "int8" and measured["size_bytes"] == s["size_bytes"]
    assert (measured["int8_layers"], measured["weight_layers"]) == (7, 8)  # counted again on the reloaded int8.pt
    assert measured["act_peak_bytes_b1"] == s["act_peak_bytes_b1"] and measured["latency_ms_cpu_b64"] > 0
    assert run_quantize(cfg)[1] == s  # done: found, not redone
    other = validate({**cfg.to_dict(), "quantize": {**cfg.quantize.model_dump(), "reduce_range": False}}, "t")
    with pytest.raises(ConfigError, match=r"other settings: quantize.reduce_range \('auto' -> False\)"):
        run_quantize(other)  # never the 7-bit result for an 8-bit request


def test_paired_counts_only_the_images_the_two_differ_on():
    from rescomp.train import paired

    t = torch.arange(10)
    a = {"pred": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0]), "target": t}  # 8 right
    b = {"pred": torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 8, 1]), "target": t}  # 8 right: loses 7, gains 8
    p = paired(a, b)
    # same class on images 0-6 only: 9 is wrong in both, but with different classes
    assert p["agreement"] == 70.0 and (p["only_a_right"], p["only_b_right"]) == (1, 1)
    assert p["diff_se"] == pytest.approx(100 * (2 / 10 / 10) ** 0.5)  # unpaired: 100 * (2 * .8 * .2 / 10) ** .5 = 17.9
    c = {"pred": torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 0, 0]), "target": t}  # 6 right, both losses a's gains
    p = paired(a, c)
    assert (p["only_a_right"], p["only_b_right"]) == (2, 0) and p["agreement"] == 80.0
    # D = right_a - right_c is 1 on two images, 0 elsewhere: variance 0.2 - 0.2 ** 2 = 0.16
    assert p["diff_se"] == pytest.approx(100 * (0.16 / 10) ** 0.5)
    with pytest.raises(ValueError, match="same images"):
        paired(a, {"pred": a["pred"], "target": t.flip(0)})


def test_qat_fine_tunes_then_converts(workdir, tiny):
    cfg = _trained_tiny(workdir, tiny, epochs=2)
    cfg = validate({**cfg.to_dict(), "quantize": {"method": "qat", "calibration_images": 64, "qat": {"epochs": 1}}}, "t")
    run_dir, s = run_quantize(cfg)
    assert s["quantization"]["method"] == "qat" and run_dir.name.endswith("-qat")
    assert s["quantization"]["qat_epochs"] == 1  # fine-tuning ran (a PTQ run would name the method too)
    assert s["row"].startswith(f"{cfg.run_name} int8 FX x86 QAT (")
    again, _ = load_int8(run_dir / "int8.pt")
    assert again(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_an_fx_qat_network_reloads_with_identical_outputs(tmp_path):
    # ResNet50V2 (pre-activation): QAT quantizes its residual sums and standalone BatchNorms, which PTQ
    # keeps in fp32, so its int8.pt reloads only into a skeleton made the way it was made (QAT)
    from rescomp.compress.quantize import backend
    from rescomp.models import build_model

    torch.manual_seed(0)
    spec, cfg = {"arch": "resnet50v2", "num_classes": 10}, QuantizeConfig(backend="x86", method="qat")
    b = backend("x86")
    prepared = b.prepare_qat(build_model(spec), cfg, 32)
    prepared(torch.randn(4, 3, 32, 32))  # a training step's forward: the fake-quant ranges
    q, _ = b.convert_qat(prepared, 32)
    save_int8(tmp_path / "int8.pt", q, spec, cfg, 32, {})
    again, _ = load_int8(tmp_path / "int8.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


def test_quantize_bad_input(workdir, tiny):
    runner = CliRunner()
    path = write_config(workdir, tiny)
    res = runner.invoke(app, ["quantize", str(path)])
    assert res.exit_code == 2 and "no trained model at" in res.stderr and "rescomp train" in res.stderr
    (workdir / "runs/exp").mkdir(parents=True)  # a run folder given for its model.pt
    res = runner.invoke(app, ["quantize", str(path), "--set", "quantize.checkpoint=runs/exp"])
    assert res.exit_code == 2 and "quantize.checkpoint 'runs/exp' is a folder; pass runs/exp/model.pt" in res.stderr
    (workdir / "runs/exp").rmdir()
    (workdir / "runs").rmdir()
    res = runner.invoke(app, ["quantize", str(path), "--set", "quantize.calibration_images=0"])
    assert res.exit_code == 2 and "quantize.calibration_images: Input should be greater than or equal to 1" in res.stderr
    res = runner.invoke(app, ["quantize", str(path), "--set", "quantize.reduce_range=7"])
    assert res.exit_code == 2 and "quantize.reduce_range: Input should be 'auto', True or False (got 7)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    untrained = workdir / "untrained.pt"
    from rescomp.models import build_model
    spec = {"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}
    checkpoint.save(untrained, {"arch": spec, "state_dict": build_model(spec).state_dict()})
    res = runner.invoke(app, ["quantize", str(path), "--set", f"quantize.checkpoint={untrained}"])
    assert res.exit_code == 2 and "not a trained model" in res.stderr
    assert not (workdir / "runs").exists()


def test_untraceable_model_is_a_clear_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ConfigError, match="cannot trace this model"):
        ptq(Branchy(), QuantizeConfig(), [torch.zeros(1, 3, 32, 32)], 32)


def test_weights_are_int8_per_output_channel():
    # Output channel c's weights are 10**c times channel 0's: one scale per channel keeps each to
    # 8 bits (scale = max|w_c| / 127.5, the symmetric qint8 observer); one scale for the tensor
    # would round channel 0's weights to zero.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    conv.weight.data *= torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1, 1)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).eval()  # and a classifier (fp32)
    x = torch.randn(16, 3, 8, 8)
    qmodel, _ = ptq(model, QuantizeConfig(), [x], 8)
    w = qmodel.get_submodule("0").weight()
    assert w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0
    amax = conv.weight.detach().flatten(1).abs().amax(1)
    assert torch.allclose(w.q_per_channel_scales().float(), amax / 127.5, rtol=1e-5)
    err = (w.dequantize() - conv.weight.detach()).flatten(1).abs().amax(1) / amax
    assert (err <= 0.5 / 127.5 + 1e-6).all()  # half a step; per tensor, channel 0 is all zeros (error 1.0)
    # and so is every conv and linear of a ResNet whose BNs were folded into its convs
    from torch.ao.nn.quantized import Conv2d as QConv2d, Linear as QLinear

    from rescomp.models import build_model
    resnet = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}).eval()
    q, _ = ptq(resnet, QuantizeConfig(), [torch.randn(4, 3, 32, 32)], 32)
    packed = [m for m in q.modules() if isinstance(m, (QConv2d, QLinear))]
    assert len(packed) == 7  # 7 convs (option A shortcuts have none); the classifier stays fp32
    assert type(q.get_submodule("fc")) is torch.nn.Linear
    for m in packed:
        assert m.weight().qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        assert m.weight().q_per_channel_scales().numel() == m.weight().shape[0]


def _input_qparams(qmodel) -> tuple[float, int]:
    """Scale and zero point with which the int8 model quantizes its input image."""
    node = next(n for n in qmodel.graph.nodes if n.target is torch.quantize_per_tensor)
    return float(getattr(qmodel, node.args[1].target)), int(getattr(qmodel, node.args[2].target))


def test_calibration_sees_training_images_only(workdir, tiny, monkeypatch):
    # Training images are dark (pixels 0..100: -2.0..-0.4 once normalized), test images bright
    # (155..255: 0.43..2.0). The input's 7-bit grid, from its zero point and scale, must span the
    # training images' values and not the test images'.
    import rescomp.runner as runner
    from rescomp.compress.quantize import load_int8
    from rescomp.models import build_model

    real = runner.prepare

    def dark_train_bright_test(cfg, seed):
        s = real(cfg, seed)
        s.train_x = (s.train_x.float() * 100 / 255).round().to(torch.uint8)
        s.test_x = (155 + s.test_x.float() * 100 / 255).round().to(torch.uint8)
        return s

    monkeypatch.setattr(runner, "prepare", dark_train_bright_test)
    spec = {"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}
    torch.manual_seed(0)
    checkpoint.save(workdir / "m.pt", {"arch": spec, "state_dict": build_model(spec).state_dict(),
                                       "metrics": {"test_top1": 10.0}})
    tiny["measure"].update(latency=False, batch_sizes=[1])
    cfg = validate({**tiny, "quantize": {"checkpoint": str(workdir / "m.pt"), "calibration_images": 32}}, "t")
    run_dir, s = run_quantize(cfg)
    assert s["quantization"]["calibration_images"] == 32
    scale, zp = _input_qparams(load_int8(run_dir / "int8.pt")[0])
    lowest, highest = -zp * scale, (127 - zp) * scale  # the real values the 7-bit grid spans
    assert lowest < -1.5 and highest < 0.4  # test images: lowest 0 (grids hold 0), highest about 2


@pytest.mark.parametrize("backend, setting, bits", [
    ("x86", "auto", 7), ("fbgemm", "auto", 7), ("qnnpack", "auto", 8),
    ("x86", False, 8), ("qnnpack", True, 7),
])
@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_reduce_range_reaches_every_activation_observer(backend, setting, bits, method):
    from torch.ao.quantization import get_default_qconfig
    from torch.ao.quantization.observer import ObserverBase

    from rescomp.compress import quantize as q

    # `auto` is torch's own default for the backend (torch.ao.quantization.get_default_qconfig)
    assert q.DEFAULT_REDUCE_RANGE[backend] == get_default_qconfig(backend).activation.p.keywords["reduce_range"]
    cfg = QuantizeConfig(backend=backend, reduce_range=setting, method=method)
    assert q.describe(cfg)["activation_bits"] == bits
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    prepared = q.prepare(model, cfg, 8)
    acts = [m for m in prepared.modules() if isinstance(m, ObserverBase) and m.dtype == torch.quint8]
    assert len(acts) >= 3  # the input and both convs' outputs (the classifier's is fp32)
    assert {(m.quant_min, m.quant_max) for m in acts} == {(0, 2**bits - 1)}


class _PreAct(torch.nn.Module):
    """x + conv2(relu(conv1(x))), both convs 1x1 identities: a pre-activation residual unit, whose sum
    has no ReLU after it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu, self.conv2 = torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1)
        for c in (self.conv1, self.conv2):
            c.weight.data, c.bias.data = torch.eye(3).view(3, 3, 1, 1), torch.zeros(3)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


def test_residual_sums_stay_fp32():
    # 196,608 values, N(0, 1) but for one in a thousand drawn far out (exponential, mean 50): the
    # shape of a pre-activation residual stream. The sum x + conv2(relu(conv1(x))) (1x1 identities)
    # spans -249.7 .. 500.1. Where x is far below zero the ReLU branch is exactly 0 (its zero point),
    # so the fp32 sum returns x itself. A 7-bit grid of that sum would be off by up to half a step
    # (min/max: 750 / 127 / 2 = 2.9), or by far more where torch's HistogramObserver clips it (to about
    # -191 .. 373, measured): the values the identity shortcuts carry to the classifier.
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    k = x.numel() // 1000
    far = torch.randperm(x.numel())[:k]
    x.view(-1)[far] = torch.distributions.Exponential(1 / 50).sample((k,)) * torch.randn(k).sign()
    model = _PreAct().eval()
    qmodel, _ = ptq(model, QuantizeConfig(), [x[:32], x[32:]], 32)
    with torch.no_grad():
        out = qmodel(x)
    below = x < -20
    assert below.sum() > 50
    assert torch.equal(out[below], x[below])
    assert not any(n.target is torch.ops.quantized.add for n in qmodel.graph.nodes)
    # the ReLU branch stays int8, its grid clipped by the histogram for a finer step (to about 186)
    relu_step = qmodel.conv1.scale  # min/max would end its grid at the ReLU's maximum, to rounding
    assert (127 - qmodel.conv1.zero_point) * relu_step < float(torch.relu(x).max()) - 2 * relu_step


def test_residual_sums_with_a_relu_stay_int8():
    # ResNet-56's blocks end in relu(conv + shortcut): that addition is fused with its ReLU and runs
    # in int8, one per block (depth 8: one block per stage, three stages). Only sums with no ReLU after
    # them (a pre-activation stream) run in fp32.
    from rescomp.models import build_model

    torch.manual_seed(0)
    resnet = build_model({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}).eval()
    q, _ = ptq(resnet, QuantizeConfig(), [torch.randn(4, 3, 32, 32)], 32)
    targets = [n.target for n in q.graph.nodes]
    assert targets.count(torch.ops.quantized.add_relu) == 3
    assert operator.add not in targets and torch.add not in targets


def test_batch_norms_that_read_a_residual_stream_run_in_fp32():
    # The second of two ResNet50V2 blocks: its pre-activation BN + ReLU reads the first block's sum.
    # On the fp32 stream the BN runs in fp32; a quantized BN would put the stream back on a histogram's
    # 7-bit grid at its input (the trained ResNet50V2 fell to 26.21 %). The BNs folded into conv1 and
    # conv2 stay in int8 convs.
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    from rescomp.models.resnet50v2 import BlockV2

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), BlockV2(16, 4, 1, False), BlockV2(16, 4, 1, False)).eval()
    q, _ = ptq(model, QuantizeConfig(), [torch.randn(8, 3, 8, 8)], 8)
    bn = q.get_submodule("2.preact_bn")
    assert "quantized" not in type(bn).__module__  # a float BN + ReLU (torch.ao.nn.intrinsic.BNReLU2d)
    feeds = []
    bn.register_forward_pre_hook(lambda m, inp: feeds.append(inp[0].is_quantized))
    with torch.no_grad():
        q(torch.randn(2, 3, 8, 8))
    assert feeds == [False]
    assert sum(isinstance(m, ConvReLU2d) for m in q.get_submodule("2").modules()) == 2  # conv1/2 + BN + ReLU


def test_the_classifier_output_is_not_rounded():
    # Two logits 5.00 and 5.01: on a 7-bit grid spanning the logits (step about 0.08) they round to
    # the same step, and argmax takes the first; the fp32 classifier keeps them apart.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(1, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)), model[0].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0], [1.002], [-1.0]])), model[3].bias.zero_()
    x = torch.full((1, 3, 1, 1), 5.0)
    calibration = [torch.linspace(0, 5, 16).view(16, 1, 1, 1).expand(16, 3, 1, 1)]
    qmodel, _ = ptq(model.eval(), QuantizeConfig(), calibration, 1)
    with torch.no_grad():
        logits = qmodel(x)[0]
    assert int(logits.argmax()) == 1
    assert abs(float(logits[1] - logits[0]) - 0.002 * float(logits[0])) < 1e-5


def test_the_classifier_is_traced_back_to_its_last_weighted_layer():
    # torchvision's SqueezeNet ends in Dropout, a 1x1 conv, ReLU, global pooling and a flatten: the
    # conv, its ReLU and the pool run in fp32; a CIFAR ResNet ends in fc alone.
    from rescomp.compress.quantize import _fx_api, classifier
    from rescomp.models import build_model

    for spec, names in (({"arch": "squeezenet1_1", "num_classes": 10}, ["classifier.3", "classifier.2", "classifier.1"]),
                        ({"arch": "cifar_resnet", "num_classes": 10, "depth": 8, "width": 4}, ["fc"])):
        model = build_model(spec)
        with _fx_api() as fx:
            tracer = fx.Tracer([], [])
            assert classifier(tracer.trace(model), model) == names


def test_zero_pad_keeps_its_inputs_int8_grid():
    # ResNet50V2's stem: conv, ZeroPad2d(1), max-pool. torch leaves the pad between a dequantize and
    # a quantize; with its input's scale and zero point that round trip is exact.
    from rescomp.models.resnet50v2 import BlockV2, ResNet50V2

    torch.manual_seed(0)
    model = ResNet50V2(10, blocks=(2, 2, 2, 2))
    # its own stem and forward, one narrow block after them to keep the test fast
    model.stacks, model.post_bn, model.fc = BlockV2(64, 4, 1, True), torch.nn.BatchNorm2d(16), torch.nn.Linear(16, 10)
    qmodel, _ = ptq(model.eval(), QuantizeConfig(), [torch.randn(8, 3, 32, 32)], 32)
    pad = next(n for n in qmodel.graph.nodes if n.target == "pad1")
    requant = next(iter(pad.users))
    assert requant.target is torch.quantize_per_tensor
    scale, zp = (float(getattr(qmodel, a.target)) for a in requant.args[1:3])
    assert (scale, zp) == (qmodel.conv1.scale, qmodel.conv1.zero_point)


@pytest.mark.parametrize("backend, setting, flags, risky", [
    ("x86", False, {"avx2"}, True), ("fbgemm", False, {"avx2"}, True), ("x86", "auto", {"avx2"}, False),
    ("pt2e", False, {"avx2"}, True), ("pt2e", "auto", {"avx2"}, False), ("pt2e", "auto", {"avx2", "avx512_vnni"}, False),
    ("qnnpack", False, {"avx2"}, False), ("x86", False, {"avx2", "avx512_vnni"}, False),
    ("x86", False, {"avx2", "avx_vnni"}, False),
    # a VNNI CPU whose oneDNN is held to AVX2 (ONEDNN_MAX_CPU_ISA): oneDNN's kernels saturate, FBGEMM's do not
    ("x86", False, {"avx2", "avx512_vnni", "cap:AVX2"}, True), ("pt2e", False, {"avx2", "avx512_vnni", "cap:AVX2"}, True),
    ("fbgemm", False, {"avx2", "avx512_vnni", "cap:AVX2"}, False), ("pt2e", "auto", {"avx2", "avx512_vnni", "cap:AVX2"}, False),
])
def test_saturation_risk_is_flagged(monkeypatch, backend, setting, flags, risky):
    import rescomp.hardware as hw
    from rescomp.compress import quantize as q

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    caps = [f[4:] for f in flags if f.startswith("cap:")]
    if caps:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", caps[0])
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(f for f in flags if not f.startswith("cap:")))
    assert q.may_saturate(QuantizeConfig(backend=backend, reduce_range=setting)) is risky
