import json

import pytest
import torch

from rescomp import checkpoint
from rescomp.cli import app
from rescomp.compress.quantize import load_int8, ptq, save_int8
from rescomp.config import QuantizeConfig, validate
from rescomp.data import synthetic
from rescomp.config import DataConfig
from rescomp.errors import ConfigError
from rescomp.pipeline import run_quantize, run_train
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
    x = (data.test_x.float() / 255 - 0.5) / 0.25
    qmodel, info = ptq(model, QuantizeConfig(), [x[:32], x[32:]], 32)
    assert info["calibration_images"] == 64
    with torch.no_grad():
        agree = (qmodel(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree >= 0.9
    save_int8(workdir / "q.pt", qmodel, payload["arch"], QuantizeConfig(), 32, {})
    again, _ = load_int8(workdir / "q.pt")
    assert torch.equal(again(x), qmodel(x))


def test_quantize_run_measures_int8_beside_fp32(workdir, tiny):
    cfg = _trained_tiny(workdir, tiny)
    run_dir, s = run_quantize(cfg)
    assert run_dir.name == f"{cfg.run_name}-ptq"
    assert s["quantization"] == {"method": "ptq", "backend": "x86", "calibration_images": 64}
    assert abs(s["top1"] - s["fp32_top1"]) <= 5
    assert s["size_ratio"] < 0.5 and s["size_bytes"] == s["fp32_size_bytes"] * s["size_ratio"]
    assert s["speedup_cpu_b8"] > 0 and s["act_peak_bytes_b1"] < s["fp32_act_peak_bytes_b1"]
    assert (run_dir / "int8.pt").is_file() and (run_dir / "summary.json").is_file()
    res = CliRunner().invoke(app, ["measure", str(run_dir / "int8.pt"), "--json"])
    assert res.exit_code == 0, res.output
    measured = json.loads(res.stdout)
    assert measured["dtype"] == "int8" and measured["size_bytes"] == s["size_bytes"]
    assert measured["act_peak_bytes_b1"] == s["act_peak_bytes_b1"] and measured["latency_ms_cpu_b64"] > 0


def test_qat_fine_tunes_then_converts(workdir, tiny):
    cfg = _trained_tiny(workdir, tiny, epochs=2)
    cfg = validate({**cfg.to_dict(), "quantize": {"method": "qat", "calibration_images": 64, "qat": {"epochs": 1}}}, "t")
    run_dir, s = run_quantize(cfg)
    assert s["quantization"]["method"] == "qat" and run_dir.name.endswith("-qat")
    again, _ = load_int8(run_dir / "int8.pt")
    assert again(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_quantize_bad_input(workdir, tiny):
    runner = CliRunner()
    path = write_config(workdir, tiny)
    res = runner.invoke(app, ["quantize", str(path)])
    assert res.exit_code == 2 and "no trained model at" in res.stderr and "rescomp train" in res.stderr
    res = runner.invoke(app, ["quantize", str(path), "--set", "quantize.calibration_images=0"])
    assert res.exit_code == 2 and "quantize.calibration_images: Input should be greater than or equal to 1" in res.stderr
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
