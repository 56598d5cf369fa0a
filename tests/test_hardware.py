"""The CPU memory-layout decision (oneDNN #6035, ../shared/UPSTREAM.md), hardware provenance, and the
per-test time limit that keeps a native hang from blocking CI.

Wrong versions these tests must catch:
- NHWC chosen on the CPU for a network with a 1x1 stride-2 conv of < 8 input channels (the tiny
  test ResNet with projection shortcuts): hangs or trains on wrong gradients on AVX2 kernels;
- the hazard rule applied to the wrong convs (3x3, stride 1, grouped convs counted by total
  input channels instead of per group), or `channels_last: true` obeyed for such a network;
- the decision bypassed: the trainer, prune scoring or QAT putting a model in NHWC without it;
- NHWC kept where it is safe but computing different gradients than NCHW (the decision's other side);
- a latency row that does not say which instruction sets made it;
- the cores counted as the machine's (os.cpu_count) where the CPU affinity allows fewer (taskset, a
  container's cpuset): processes side by side each given threads for cores they cannot use, and a row
  that names cores its timing never had;
- a per-test limit that cannot fire while a test holds the GIL in native code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from rescomp.context import RunContext
from rescomp.hardware import cpu_record, device_name, memory_format_of, nhwc_hazards, training_layout
from rescomp.jobs import threads_per_process, usable_cores
from rescomp.models import build_model
from rescomp.provenance import stamp

from conftest import write_config

REPO = Path(__file__).resolve().parent.parent
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("conv, hazard", [
    (nn.Conv2d(4, 8, 1, stride=2), True),     # the reported case: IC < 8, 1x1, stride 2
    (nn.Conv2d(7, 8, 1, stride=2), True),
    (nn.Conv2d(12, 8, 1, stride=2), True),    # kept out for AVX-512's block of 16 (untested there)
    (nn.Conv2d(16, 8, 1, stride=2), False),
    (nn.Conv2d(4, 8, 1, stride=1), False),    # stride 1: another kernel, measured correct
    (nn.Conv2d(4, 8, 3, stride=2), False),    # 3x3: another kernel, measured correct
    (nn.Conv2d(64, 64, 1, stride=2, groups=8), True),  # 8 input channels per group
])
def test_hazard_rule_on_single_convs(conv: nn.Conv2d, hazard: bool) -> None:
    assert nhwc_hazards(nn.Sequential(nn.Identity(), conv)) == (["1"] if hazard else [])


def test_layout_decision_per_network_and_setting() -> None:
    tiny = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "shortcut": "B", "num_classes": 10})
    assert nhwc_hazards(tiny) == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]  # 4 and 8 input channels
    assert training_layout(tiny, CPU, "auto")[0] is False
    nhwc, why = training_layout(tiny, CPU, True)
    assert nhwc is False and "overridden" in why and "layer2.0.shortcut.0" in why
    assert training_layout(tiny, CUDA, "auto")[0] is True  # the bug is oneDNN's, not cuDNN's
    wide = build_model({"arch": "resnet56", "num_classes": 10})  # option B shortcuts with 16 and 32 inputs
    assert nhwc_hazards(wide) == [] and training_layout(wide, CPU, "auto")[0] is True
    assert training_layout(wide, CPU, False)[0] is False


def test_context_puts_models_in_the_decided_layout() -> None:
    ctx = RunContext(CPU)
    tiny = build_model({"arch": "cifar_resnet", "depth": 8, "width": 4, "shortcut": "B", "num_classes": 10})
    wide = build_model({"arch": "resnet20", "num_classes": 10})
    assert memory_format_of(ctx.layout(tiny.to(memory_format=torch.channels_last))) == torch.contiguous_format
    assert memory_format_of(ctx.layout(wide)) == torch.channels_last


def _isa_env() -> dict[str, str]:
    return {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}


def test_training_on_avx2_kernels_never_uses_the_broken_one(workdir: Path, tiny: dict) -> None:
    """The whole CLI path (train, fine-tune, evaluate) on the AVX2 kernels with the network that hangs
    in NHWC; a separate process, so that a hang is a timeout here and not a stuck suite."""
    tiny["model"]["shortcut"] = "B"
    tiny["train"]["channels_last"] = True  # asked for, and refused for this network
    cfg = write_config(workdir, tiny)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rescomp.cli", "train", str(cfg)], capture_output=True, text=True,
                       env=_isa_env(), timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory layout NCHW" in r.stderr and "overridden" in r.stderr
    assert time.perf_counter() - t0 < 180


_GRADS = r"""
import copy, torch, torch.nn as nn
from rescomp.hardware import nhwc_hazards
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1, stride=2),
                    nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
assert nhwc_hazards(net) == []
x = torch.randn(8, 3, 16, 16)
def grads(cl):
    m = copy.deepcopy(net)
    xi = x.contiguous(memory_format=torch.channels_last) if cl else x
    if cl: m = m.to(memory_format=torch.channels_last)
    m(xi).square().sum().backward()
    return [p.grad for p in m.parameters()]
worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads(True), grads(False)))
print(worst)
assert worst < 1e-4, worst
"""


def test_nhwc_where_allowed_gives_the_nchw_gradients_on_avx2_kernels() -> None:
    r = subprocess.run([sys.executable, "-c", _GRADS], capture_output=True, text=True, env=_isa_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_every_timing_row_names_the_instruction_sets() -> None:
    s = stamp("cpu")
    isa = s["hardware"]["cpu"]["isa"]
    assert "avx2" in isa or not isa  # an x86 CPU of this project has AVX2; another machine lists none
    assert s["hardware"]["cpu"]["logical_cores"] == os.cpu_count()
    assert ("avx2" in device_name("cpu")) == ("avx2" in isa)
    assert s["hardware"]["threads"] == torch.get_num_threads()


def test_cores_are_those_the_cpu_affinity_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})  # taskset -c 4-7 on a 64-core host
    assert usable_cores() == 4
    assert [threads_per_process(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert cpu_record()["usable_cores"] == 4 and cpu_record()["logical_cores"] == 64
    assert ", 64 cores (4 usable), " in device_name("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert ", 64 cores, " in device_name("cpu") and threads_per_process(2) == 32
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have no affinity call
    assert usable_cores() == 64


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and 2 cores")
def test_one_process_gets_the_threads_pytorch_gives_it_under_taskset() -> None:
    """The count agrees with PyTorch's own thread pool, which follows the affinity."""
    code = ("import torch; from rescomp.jobs import threads_per_process as t; "
            "print(t(1), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1"]


def test_a_test_stuck_in_native_code_fails_fast_with_its_stack(tmp_path: Path) -> None:
    """The suite's own settings (pyproject.toml) end a run whose test holds the GIL in C code."""
    (tmp_path / "test_stuck.py").write_text(
        "import ctypes\n\ndef test_stuck_in_c():\n    ctypes.PyDLL(None).sleep(120)  # holds the GIL\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                        str(tmp_path), "-p", "no:cacheprovider", "-o", "faulthandler_timeout=2", str(tmp_path)],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode != 0
    assert time.perf_counter() - t0 < 60
    assert "test_stuck_in_c" in r.stdout + r.stderr  # the stack names the test
