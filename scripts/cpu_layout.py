"""The measurements behind rescomp's CPU memory-layout rule (rescomp.hardware.training_layout).

1. Safety: for lone convs of the shapes oneDNN issue #6035 concerns (and their neighbours), the
   output, weight gradient and input gradient in channels_last (NHWC) against NCHW. Each case runs
   in its own process with a time limit, since the broken kernel can spin forever or crash.
2. Speed: training (forward + backward + SGD step) and inference images/s of CIFAR ResNets in both
   layouts, interleaved, in one process, with the same threads.

Run it again under ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with AVX-512 to see the AVX2 kernels there.

    python scripts/cpu_layout.py [--out results/bench]
Writes results/bench/cpu_layout{,-ISA}.{json,md}, the suffix naming the oneDNN cap when one is set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.hardware import onednn_isa_cap  # noqa: E402
from rescomp.models import build_model  # noqa: E402

# (input channels, kernel, stride): the reported case (1x1, stride 2, IC < 8), its edges, and other kernels.
CASES = [(ic, 1, 2) for ic in (2, 4, 6, 7, 8, 12, 16, 24)] + [(4, 1, 1), (6, 1, 1), (4, 1, 3), (4, 3, 2), (6, 3, 2)]
SHAPES = [(8, 16), (32, 32)]  # (batch, height = width)

CASE = r"""
import sys, torch
ic, k, s, n, hw = map(int, sys.argv[1:6])
torch.manual_seed(0)
ref = torch.nn.Conv2d(ic, 8, k, stride=s, padding=k // 2, bias=False)
x = torch.randn(n, ic, hw, hw)
g = torch.randn_like(ref(x))
def run(cl):
    c = torch.nn.Conv2d(ic, 8, k, stride=s, padding=k // 2, bias=False)
    c.load_state_dict(ref.state_dict())
    xi = x.clone()
    if cl:
        c, xi = c.to(memory_format=torch.channels_last), xi.contiguous(memory_format=torch.channels_last)
    xi.requires_grad_(True)
    out = c(xi)
    out.backward(g.contiguous(memory_format=torch.channels_last) if cl else g)
    return out.detach(), c.weight.grad, xi.grad
rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
print(*(rel(a, b) for a, b in zip(run(True), run(False))))
"""


def safety(timeout: float) -> list[dict]:
    rows = []
    for ic, k, s in CASES:
        for n, hw in SHAPES:
            row = {"in_channels": ic, "kernel": k, "stride": s, "batch": n, "size": hw}
            try:
                r = subprocess.run([sys.executable, "-c", CASE, *map(str, (ic, k, s, n, hw))], capture_output=True,
                                   text=True, timeout=timeout)
                if r.returncode == 0:
                    out, w, x = map(float, r.stdout.split())
                    row.update(result="ok" if max(out, w, x) < 1e-4 else "WRONG", out_rel=out, wgrad_rel=w, xgrad_rel=x)
                else:
                    row.update(result=f"crash (exit {r.returncode})")
            except subprocess.TimeoutExpired:
                row.update(result=f"hang (> {timeout:.0f} s)")
            rows.append(row)
            print(row, flush=True)
    return rows


def _ips(model, x, y, train: bool, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(x)

    model.train(train)
    step()  # warm-up: oneDNN builds its kernels on the first call
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return len(x) * steps / (time.perf_counter() - t0)


def speed(archs: list[str], rounds: int) -> list[dict]:
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        base = build_model({"arch": arch, "num_classes": 10})
        res: dict[tuple[str, bool], list[float]] = {}
        for _ in range(rounds):  # interleaved, so a busy moment of the machine hits both layouts
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                m = build_model({"arch": arch, "num_classes": 10})
                m.load_state_dict(base.state_dict())
                m = m.to(memory_format=fmt)
                for mode, bs, steps in (("train", 128, 4), ("eval", 500, 4)):
                    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=fmt)
                    y = torch.randint(0, 10, (bs,))
                    res.setdefault((mode, cl), []).append(_ips(m, x, y, mode == "train", steps))
        row = {"arch": arch}
        for (mode, cl), v in res.items():
            row[f"{mode}_{'nhwc' if cl else 'nchw'}_images_per_s"] = statistics.median(v)
        for mode in ("train", "eval"):
            row[f"{mode}_nhwc_over_nchw"] = row[f"{mode}_nhwc_images_per_s"] / row[f"{mode}_nchw_images_per_s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", help="networks to time (default: resnet20, resnet56)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as hung")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    t0 = time.perf_counter()
    cases = safety(args.timeout)
    timing = speed(args.arch or ["resnet20", "resnet56"], args.rounds)
    meta = {**provenance.stamp("cpu"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - t0}
    lines = ["# CPU memory layout: is NHWC safe, and is it faster?", "",
             f"- device: {meta['device']}; oneDNN {meta['hardware']['cpu']['onednn']}",
             f"- commit: {meta['commit']}, torch {meta['torch']}, date {meta['date']}, wall {meta['wall_seconds']:.0f} s",
             f"- how made: `{meta['command']}`", "",
             "## Safety: one conv, NHWC against NCHW (max relative difference)", "",
             "| in ch | kernel | stride | batch | size | result | output | weight grad | input grad |", "|" + "---|" * 9]
    for c in cases:
        nums = [f"{c[k]:.1e}" if k in c else "-" for k in ("out_rel", "wgrad_rel", "xgrad_rel")]
        lines.append(f"| {c['in_channels']} | {c['kernel']}x{c['kernel']} | {c['stride']} | {c['batch']} | {c['size']} | "
                     f"{c['result']} | " + " | ".join(nums) + " |")
    lines += ["", "## Speed: images/s, median of interleaved rounds (train: batch 128, SGD step; eval: batch 500)", "",
              "| arch | train NCHW | train NHWC | NHWC/NCHW | eval NCHW | eval NHWC | NHWC/NCHW |", "|" + "---|" * 7]
    for r in timing:
        lines.append(f"| {r['arch']} | {r['train_nchw_images_per_s']:.0f} | {r['train_nhwc_images_per_s']:.0f} | "
                     f"{r['train_nhwc_over_nchw']:.2f}x | {r['eval_nchw_images_per_s']:.0f} | "
                     f"{r['eval_nhwc_images_per_s']:.0f} | {r['eval_nhwc_over_nchw']:.2f}x |")
    lines += ["", "rescomp's rule (rescomp.hardware.training_layout): NHWC on the CPU unless the network has a 1x1 conv "
              "of stride > 1 with fewer than 16 input channels per group; then NCHW for every pass with gradients."]
    text = "\n".join(lines) + "\n"
    print(text)
    cap = onednn_isa_cap()
    stem = Path(args.out) / (f"cpu_layout-{cap.lower()}" if cap else "cpu_layout")
    checkpoint.atomic_write_text(stem.with_suffix(".json"), json.dumps({**meta, "cases": cases, "speed": timing}, indent=2) + "\n")
    checkpoint.atomic_write_text(stem.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
