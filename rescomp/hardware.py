"""What machine a number came from, and the one memory-layout decision every CPU path takes.

Two x86 CPUs with the same model name can differ in instruction sets (AVX2 only, AVX-512, VNNI, AMX),
and oneDNN picks different kernels for each: a latency or throughput figure is only comparable with
another made on the same instruction sets, so every row records them (`device_record`).

The layout decision (`training_layout`) exists because of oneDNN issue #6035 (../shared/UPSTREAM.md):
on x86 CPUs the 1x1 stride-2 backward-weights kernel, in channels_last (NHWC), with fewer input
channels than its register block, hangs or silently computes wrong weight gradients. Measured on an
AVX2-only AMD EPYC with torch 2.14.1 (`python scripts/cpu_layout.py`, results/bench/cpu_layout.md):
wrong or hung for 2-7 input channels, correct for 8 and more, for stride 1 and 3, for 3x3 kernels, and
for forward passes and input gradients in every case. NHWC is otherwise as fast or faster on the CPU
(same file), so NHWC is kept for every network without such a conv and NCHW is used for any network
with one. The threshold is 16, the block of the AVX-512 kernels, which no machine here could test.
"""

from __future__ import annotations

import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn

from rescomp.jobs import usable_cores

# Instruction sets that change which int8 / fp32 kernels oneDNN and FBGEMM run (flags of /proc/cpuinfo).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
NHWC_MIN_IN_CHANNELS = 16  # oneDNN #6035: AVX2's block is 8 (measured), AVX-512's is 16 (kept out, untested)

Setting = Union[Literal["auto"], bool]


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def cpu_name() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    m = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.M)
    return frozenset(m.group(1).split()) if m else frozenset()


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) whose kernels have no VNNI: under one of these oneDNN runs
# the saturating int16-pair int8 kernels even on a CPU with VNNI (measured on a Xeon with AVX512-VNNI
# and AMX: an all-255 x all-127 1x1 conv over 64 channels gave 64.0 natively, 31.6 under AVX2).
NO_VNNI_CAPS = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"})


def has_vnni(onednn: bool = False) -> bool:
    """Whether int8 dot products sum into int32 (AVX512-VNNI or AVX-VNNI). Without VNNI, x86 int8
    kernels add pairs of u8 x s8 products in a saturating int16 (rescomp.compress.quantize).
    `onednn`: whether oneDNN's kernels do, which ONEDNN_MAX_CPU_ISA can hold below the CPU's VNNI
    (FBGEMM and ONNX Runtime's MLAS ignore that variable: leave it False for them)."""
    flags = cpu_flags()
    if not {"avx512_vnni", "avx_vnni"} & flags:
        return False
    cap = (onednn_isa_cap() or "").upper() if onednn else ""
    if cap in NO_VNNI_CAPS:
        return False
    if cap.startswith("AVX2_VNNI"):  # the AVX2 kernels with VNNI: only where the CPU has AVX-VNNI itself
        return "avx_vnni" in flags
    return True


def cpu_isa() -> list[str]:
    """The instruction sets of ISA_FLAGS this CPU has, in that order."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def onednn_isa_cap() -> str | None:
    """ONEDNN_MAX_CPU_ISA (or its old name) when set: oneDNN then uses no kernel above that ISA."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None


def _physical_cores() -> int | None:
    cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", _cpuinfo(), re.M | re.S))
    return len(cores) or None


@lru_cache(maxsize=1)
def onednn_version() -> str | None:
    m = re.search(r"(?:oneDNN|MKL-DNN)\s*v?([\d.]+)", torch.__config__.show())
    return m.group(1) if m else None


def cpu_record() -> dict[str, Any]:
    return {
        "model": cpu_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),  # the CPU affinity's: what the threads may run on
        "physical_cores": _physical_cores(),
        "isa": cpu_isa(),
        "onednn_max_cpu_isa": onednn_isa_cap(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": onednn_version(),
    }


def isa_summary() -> str:
    """'avx2', 'avx2 avx512f avx512_vnni', ... plus the oneDNN cap when one is set."""
    isa = " ".join(cpu_isa()) or "no avx2"
    cap = onednn_isa_cap()
    return f"{isa}; oneDNN capped at {cap}" if cap else isa


def device_name(device: Union[torch.device, str], threads: Optional[int] = None) -> str:
    """One line naming the hardware: the GPU, or the CPU with its cores, instruction sets and threads (those
    torch runs with now, or `threads`: those a measurement was pinned to)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cores, usable = os.cpu_count(), usable_cores()
    cores = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    return f"cpu:{cpu_name()}, {cores}, {isa_summary()} ({threads or torch.get_num_threads()} threads)"


def device_record(device: Union[torch.device, str]) -> dict[str, Any]:
    """Everything about the device and runtimes that a timing depends on."""
    device = torch.device(device)
    rec: dict[str, Any] = {"cpu": cpu_record(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return rec


# ---------------------------------------------------------------------------------------------
# The memory layout: one decision for training, scoring, fine-tuning, QAT and the benchmarks


def nhwc_hazards(model: nn.Module) -> list[str]:
    """Convs whose NHWC backward pass oneDNN gets wrong on x86 CPUs (issue #6035): 1x1, stride > 1,
    fewer than NHWC_MIN_IN_CHANNELS input channels per group."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < NHWC_MIN_IN_CHANNELS]


def training_layout(model: nn.Module, device: torch.device, setting: Setting) -> tuple[bool, str]:
    """Whether to run `model` in channels_last on `device` for a pass with gradients, and why."""
    if setting is False:
        return False, "NCHW (train.channels_last: false)"
    if device.type != "cpu":
        return True, "NHWC (tensor-core kernels)"
    hazards = nhwc_hazards(model)
    if hazards:
        m = model.get_submodule(hazards[0])
        why = (f"NCHW: '{hazards[0]}' is a 1x1 stride-{max(m.stride)} conv with {m.in_channels // m.groups} input "
               f"channels, whose NHWC weight gradients oneDNN computes wrongly or hangs on (UPSTREAM.md, oneDNN #6035)")
        return False, why + (" - train.channels_last: true overridden" if setting is True else "")
    return True, "NHWC (no conv of the oneDNN #6035 kind; measured as fast or faster on the CPU)"


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """The layout the model's weights are in (1x1 weights are both at once, so they do not count)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[2] * p.shape[3] > 1:
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format
