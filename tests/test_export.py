# `rescomp export`: ONNX files that compute what the PyTorch network computes (issue 11).
# Wrong versions these tests must catch (each checked once by mutating the code, see scripts/mutants.py):
#  1. an export whose outputs differ from PyTorch's is kept (the agreement check skipped or too loose)
#       -> test_a_graph_that_disagrees_with_pytorch_is_not_kept
#  2. the batch dimension frozen at the batch used to capture the graph (only that batch runs)
#       -> test_compressed_networks_export_with_any_batch_size
#  3. a missing runtime package as a traceback -> test_a_missing_runtime_is_one_line_and_writes_nothing
#  4. an int8 checkpoint exported as if it were fp32, or an FX one (packed ops, no ONNX form) tried
#       -> test_an_fx_int8_checkpoint_is_refused
#  5. an int8 graph whose top-1 disagrees with the int8 model's is kept (the agreement check skipped)
#       -> test_a_pt2e_int8_model_exports_as_a_qdq_graph_that_agrees
# and, checked by behaviour only: a pruned network exported with more parameters than it has
# (test_a_pruned_checkpoint_exports_its_pruned_network); a config without a trained run or a wrong
# --out suffix failing late (test_bad_targets_are_one_line).

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rescomp.cli import app
from rescomp.errors import ConfigError
from rescomp.export import export_onnx, ort_session
from rescomp.models import build_model

from conftest import write_config

onnx = pytest.importorskip("onnx")  # a dependency: present wherever rescomp is installed


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _ort(path: Path, x: torch.Tensor) -> torch.Tensor:
    s = ort_session(path)
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("spec", [
    {"arch": "cifar_resnet", "depth": 8, "width": 4, "separable": {"mode": "depthwise"}},
    {"arch": "cifar_resnet", "depth": 14, "width": 4, "gates": {"init": [-1, 1]}, "deleted": ["layer1.1", "layer2.1"]},
    {"arch": "squeezenet1_0"},
])
def test_compressed_networks_export_with_any_batch_size(tmp_path, spec):
    model = build_model({"num_classes": 10, **spec}).eval()
    info = export_onnx(model, 32, tmp_path / "m.onnx")
    assert info["opset"] == 18 and info["onnx_bytes"] == (tmp_path / "m.onnx").stat().st_size
    for batch in (1, 3, 7):  # none of them the batch the graph was captured with (4)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ours = model(x)
        assert torch.allclose(_ort(tmp_path / "m.onnx", x), ours, atol=1e-4 * max(1.0, float(ours.abs().max())))


def test_a_graph_that_disagrees_with_pytorch_is_not_kept(tmp_path, monkeypatch):
    import rescomp.export as ex

    real = ex._run
    monkeypatch.setattr(ex, "_run", lambda session, x: real(session, x) + 1e-2)  # a runtime 1 % off
    with pytest.raises(ex.ExportError, match="differ from PyTorch's by up to 0.01"):
        export_onnx(build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10}), 32,
                    tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_checkpoint_exports_its_pruned_network(workdir, tiny):
    tiny["model"] = {"arch": "resnet20", "width": 4, "shortcut": "B"}
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["prune"] = {"share_per_step": 0.2, "steps": 1, "finetune_epochs": 0, "score_batches": 1}
    path = write_config(workdir, tiny)
    assert cli("prune", path).exit_code == 0
    pruned = next(workdir.glob("runs/exp-prune-*/step01/model.pt"))
    for option in (["--set", "data.image_size=64"], ["--profile", "cpu"]):  # taken and ignored, it would say nothing
        res = cli("export", pruned, *option)
        assert res.exit_code == 2 and "applies to a config" in res.stderr and "exported as it is" in res.stderr
    assert not pruned.with_suffix(".onnx").exists()
    res = cli("export", pruned)
    assert res.exit_code == 0, res.output
    rec = json.loads(pruned.with_suffix(".onnx.json").read_text())
    assert rec["max_abs_diff"] <= rec["tolerance"] and rec["commit"] and rec["torch"] and rec["onnxruntime"]
    # the pruning run's config hash, as its rows carry it, not the hash of its step's fine-tune config
    assert rec["config_hash"] == json.loads((pruned.parent.parent / "summary.json").read_text())["config_hash"]
    from rescomp import checkpoint

    model, payload = checkpoint.load_model(pruned)
    graph = onnx.load(str(pruned.with_suffix(".onnx")))
    onnx_params = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    pytorch = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                                if not n.endswith("num_batches_tracked"))
    # conv-BN folding may merge BN tensors into convs: the graph never holds more than the pruned network
    full = build_model({k: v for k, v in payload["arch"].items() if k != "shapes"})
    assert onnx_params <= pytorch < sum(p.numel() for p in full.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_ort(pruned.with_suffix(".onnx"), x), model.eval()(x), atol=1e-4)

    res = cli("export", path, "--out", workdir / "out/r20.onnx")  # a config: its training run's model.pt
    assert res.exit_code == 0, res.output
    res = cli("export", path, "--set", "model.width=8", "--out", workdir / "out/w8.onnx")  # not that config's network
    assert res.exit_code == 2 and "holds a network made with other settings than this config's: model.width (4 -> 8)" \
        in " ".join(res.stderr.split()) and not (workdir / "out/w8.onnx").exists(), res.output
    assert (workdir / "out/r20.onnx").is_file() and (workdir / "out/r20.onnx.json").is_file()
    # its record says how it was made, with no path of this machine (an absolute --out was written as given)
    rec = json.loads((workdir / "out/r20.onnx.json").read_text())
    assert (rec["file"], rec["source"], rec["seed"]) == ("r20.onnx", "../runs/exp/model.pt", 0), rec
    assert rec["config_hash"] == json.loads((workdir / "runs/exp/summary.json").read_text())["config_hash"]
    assert rec["wall_seconds"] > 0 and str(workdir) not in (workdir / "out/r20.onnx.json").read_text()


def test_a_missing_runtime_is_one_line_and_writes_nothing(workdir, tiny, monkeypatch):
    import sys

    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    res = cli("export", workdir / "runs/exp/model.pt")
    assert res.exit_code == 2 and "pip install" in res.stderr and "onnxruntime" in res.stderr
    assert "Traceback" not in res.output and not list(workdir.glob("runs/exp/*.onnx*"))


@pytest.mark.parametrize("args, message", [
    (["exp.yaml"], "no trained model at"),
    (["exp.yaml", "--out", "m.pt"], "must end in .onnx"),
    (["notes.txt"], "neither a model.pt nor a config"),
])
def test_bad_targets_are_one_line(workdir, tiny, args, message):
    write_config(workdir, tiny)
    res = cli("export", *args)
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_an_fx_int8_checkpoint_is_refused(workdir, tiny):
    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"latency": False, "gpu_throughput": False}
    tiny["quantize"] = {"calibration_images": 16}
    path = write_config(workdir, tiny)
    assert cli("train", path).exit_code == 0 and cli("quantize", path).exit_code == 0
    for args in (["runs/exp-ptq/int8.pt"], ["exp.yaml", "--int8"]):
        res = cli("export", *args)
        assert res.exit_code == 2 and "backend x86 (torch.ao FX, packed int8 ops) has no ONNX form" in res.stderr
    res = cli("export", "runs/exp/model.pt", "--int8")
    assert res.exit_code == 2 and "is an fp32 model; --int8 exports an int8 model" in res.stderr
    for opset in ("3", "17", "999"):  # written as 18 with exit 0 before
        res = cli("export", "runs/exp/model.pt", "--opset", opset)
        assert res.exit_code == 2 and f"--opset {opset}: torch.onnx exports opsets 18 to " in res.stderr, res.output
    res = cli("export", "exp.yaml", "--int8", "--set", "quantize.backend=pt2e")
    assert res.exit_code == 2 and "no int8 model at" in res.stderr and "runs/exp-ptq-pt2e/int8.pt" in res.stderr
    assert "run `rescomp quantize exp.yaml --set quantize.backend=pt2e`" in " ".join(res.stderr.split())  # its settings
    assert not list(workdir.glob("runs/**/*.onnx*"))


def test_a_pt2e_int8_model_exports_as_a_qdq_graph_that_agrees(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    import rescomp.export as ex
    from rescomp.compress import quantize_pt2e
    from rescomp.compress.quantize import save_int8
    from rescomp.config_sections import QuantizeConfig

    torch.manual_seed(0)
    spec = {"arch": "cifar_resnet", "depth": 8, "width": 8, "num_classes": 10}
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(1)
    cfg = QuantizeConfig(backend="pt2e")
    q, _, blob = quantize_pt2e.ptq(model, cfg, [torch.randn(32, 3, 32, 32, generator=g)], 32)
    save_int8(tmp_path / "int8.pt", q, spec, cfg, 32, {}, blob=blob)
    path, rec = ex.export_checkpoint(tmp_path / "int8.pt")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and rec["int8"] and rec["backend"] == "pt2e"
    assert rec["top1_agreement"] >= 0.95 and json.loads(path.with_name("int8.onnx.json").read_text())["opset"] == 18
    x = torch.randn(3, 3, 32, 32, generator=g)  # a batch it was not captured with
    assert (_ort(path, x).argmax(1) == q(x).argmax(1)).all()
    real = ex._run
    monkeypatch.setattr(ex, "_run", lambda session, x: real(session, x).roll(1, dims=1))  # top-1 moved one class
    with pytest.raises(ex.ExportError, match="agrees with the int8 model's on"):
        ex.export_checkpoint(tmp_path / "int8.pt", tmp_path / "other.onnx")
    assert not list(tmp_path.glob("*other.onnx*"))


def test_nan_outputs_and_the_opset_written(tmp_path, monkeypatch):
    # Wrong versions: a NaN difference passing the check (max(0.0, nan) is 0.0); the opset asked for
    # recorded instead of the one the exporter wrote, or another opset written than the one asked for
    import rescomp.export as ex

    model = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "num_classes": 10})
    info = export_onnx(model, 32, tmp_path / "m.onnx", opset=21)
    written = [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain in ("", "ai.onnx")]
    assert info["opset"] == written[0] == 21
    with pytest.raises(ConfigError, match="--opset 13: torch.onnx wrote opset 18 instead"):  # it fell back, and
        export_onnx(model, 32, tmp_path / "old.onnx", opset=13)  # only logged it
    assert not list(tmp_path.glob("*old.onnx*"))
    real = ex._run
    monkeypatch.setattr(ex, "_run", lambda session, x: real(session, x) * float("nan"))
    with pytest.raises(ex.ExportError, match="NaN"):
        export_onnx(model, 32, tmp_path / "n.onnx")
    assert not (tmp_path / "n.onnx").exists()
