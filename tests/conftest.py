from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

TINY = {
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "synthetic", "synthetic": {"train_size": 64, "test_size": 32, "num_classes": 10}},
    "model": {"arch": "cifar_resnet", "depth": 8, "width": 4},
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32,
              "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "cosine"}},
    "measure": {"batch_sizes": [1, 4], "warmup": 1, "repeats": 2},
    "report": {"table": "smoke"},
}


def pytest_configure(config: pytest.Config) -> None:
    """The suite tests this checkout's rescomp, not another's: a virtual environment shared with another
    worktree (a symlinked .venv in which `make install` ran there) imports that one's code, and its
    tests then fail, or pass, for the other code. Under pytest-xdist (`make test` runs one worker per
    core), each worker's PyTorch gets its share of the cores, as each of rescomp's processes side by side
    does: two workers with every core each would make OpenMP's threads wait on each other."""
    import os

    import rescomp

    here, imported = Path(__file__).resolve().parent.parent, Path(rescomp.__file__).resolve().parent
    if imported != here / "rescomp":
        raise pytest.UsageError(f"this suite is in {here} but imports rescomp from {imported}, another checkout's "
                                f"editable install; reinstall this one: .venv/bin/pip install -e '.[dev]'")

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from rescomp.jobs import threads_per_process

        torch.set_num_threads(threads_per_process(workers))


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: torchvision may only fetch from a server a test runs on loopback."""
    import torchvision.datasets.utils as tvu

    real = tvu._urlretrieve

    def guarded(url, *args, **kwargs):
        if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise AssertionError(f"a test tried to download {url}")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(tvu, "_urlretrieve", guarded)


@pytest.fixture
def tiny() -> dict:
    """A fresh copy of the tiny synthetic experiment (a width-4 ResNet-8)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside an empty folder so runs/ and results/ land there; data caches too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESCOMP_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write_config(folder: Path, cfg: dict, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def quantized(workdir: Path, tiny: dict, **quantize) -> dict:
    """Train the tiny experiment for one epoch, quantize it with these quantize settings (latency at batch
    1, two timed passes each), and return the int8 run's summary."""
    import json

    from typer.testing import CliRunner

    from rescomp.cli import app

    tiny["train"]["epochs"] = 1
    tiny["measure"] = {"batch_sizes": [1], "repeats": 2, "max_spread": None, "gpu_throughput": False}
    tiny["quantize"] = quantize
    path = write_config(workdir, tiny)
    for command in ("train", "quantize"):
        res = CliRunner().invoke(app, [command, str(path)])
        assert res.exit_code == 0, res.output
    backend = quantize.get("backend", "x86")
    return json.loads((workdir / f"runs/exp-ptq{'' if backend == 'x86' else '-' + backend}/summary.json").read_text())


def measured_as_its_row(model_file: Path, row: dict) -> dict:
    """`rescomp measure` of a stage's saved network, checked against the row the stage recorded for it:
    the same costs and, for a network in rescomp's own format, the same stored bytes."""
    import json

    from typer.testing import CliRunner

    from rescomp.cli import app

    res = CliRunner().invoke(app, ["measure", str(model_file), "--json", "--set", "measure.latency=false"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    for key in ("params", "params_with_bn_stats", "macs", "size_bytes", "stored_bytes"):
        assert got.get(key) == row.get(key), (key, got.get(key), row.get(key))
    assert {"commit", "torch", "device"} <= set(got) and got["hardware"]["cpu"]["isa"] is not None  # how it was made
    return got
