"""Inductor's latency at batch 64 when the network was first compiled at batch 1: torch.compile's
default (a second batch size recompiled as one dynamic-shape graph) against a static graph per batch
size (`dynamic=False`, what rescomp.measure.InductorForward compiles since f046cf0).

Each measurement is its own process (a compiled network cannot be uncompiled), the two kinds
alternating, `--rounds` of each per architecture, threads pinned, weight freezing on as in rescomp:
batch 1 is timed first (so the default has compiled batch 1 statically), then batch 64. Per process:
the median forward time and its interquartile range (rescomp.measure.cpu_latency_stats). fp32, random
weights (latency does not depend on them).

    python scripts/bench_inductor_shapes.py [--arch resnet56 --arch resnet50v2] [--rounds 3] [--threads N]
Writes results/bench/inductor_shapes-<CPU class>.{json,md} (the class as in bench_int8.py).
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
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.measure import cpu_latency_stats, pinned_threads  # noqa: E402
from rescomp.models import build_model  # noqa: E402

BATCHES = (1, 64)
MODES = ("dynamic", "static")  # torch.compile's default (dynamic=None), then dynamic=False


class Compiled(nn.Module):
    def __init__(self, net: nn.Module, mode: str) -> None:
        super().__init__()
        self.net = net
        self.compiled = torch.compile(net, dynamic=None if mode == "dynamic" else False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        with inductor.patch(freezing=True), torch.no_grad():
            return self.compiled(x.contiguous())

    def __deepcopy__(self, memo: dict) -> "Compiled":
        return self


def child(arch: str, mode: str, threads: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    f = Compiled(build_model({"arch": arch, "num_classes": 10}).eval(), mode)
    out = {}
    with pinned_threads(threads):
        for b in BATCHES:
            st = cpu_latency_stats({"m": (f, False)}, 32, b, threads=threads, warmup=warmup, repeats=repeats)["m"]
            out[f"ms_b{b}"], out[f"iqr_ms_b{b}"], out[f"runs_b{b}"] = st["median"], st["q3"] - st["q1"], st["n"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", help="registry model (repeatable; default resnet56 and resnet50v2)")
    p.add_argument("--rounds", type=int, default=3, help="processes of each kind per architecture, alternating")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--child", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    with pinned_threads(args.threads) as n:
        pass
    if args.child:
        print(json.dumps(child(*args.child, n, args.warmup, args.repeats)))
        return
    from bench_int8 import cpu_class

    archs, t0, runs = args.arch or ["resnet56", "resnet50v2"], time.perf_counter(), []
    for arch in archs:
        for r in range(args.rounds):
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", arch, mode, "--threads", str(n), "--warmup", str(args.warmup),
                       "--repeats", str(args.repeats)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append({"arch": arch, "mode": mode, "round": r + 1, **json.loads(res.stdout.strip().splitlines()[-1])})
                print(runs[-1], flush=True)
    meta = {"wall_s": round(time.perf_counter() - t0, 1), **provenance.stamp("cpu"), "threads": n,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    lines = [f"# Inductor at batch 64 after batch 1: default (dynamic) against static shapes ({cpu_class()} CPU)", "",
             f"- device: {meta['device']}, {n} threads pinned", f"- commit: {meta['commit']}, torch {meta['torch']}, date {meta['date']}",
             f"- how made: `{meta['command']}`, {meta['wall_s']:.0f} s", "",
             "| arch | graph | ms b1, per process | ms b64, per process | median ms b64 |", "|---|---|---|---|---|"]
    for arch in archs:
        for mode in MODES:
            mine = [r for r in runs if r["arch"] == arch and r["mode"] == mode]
            cell = lambda b: ", ".join(f"{r[f'ms_b{b}']:.2f} ±{r[f'iqr_ms_b{b}'] / 2:.2f}" for r in mine)  # noqa: E731
            label = "default (batch 64 dynamic)" if mode == "dynamic" else "static per batch size"
            lines.append(f"| {arch} | {label} | {cell(1)} | {cell(64)} | {statistics.median(r['ms_b64'] for r in mine):.2f} |")
    lines += ["", "Each cell is one process (± half its interquartile range), processes in the order they ran, the "
              "two kinds alternating. Timings of separate processes differ by the machine's drift too.", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    stem = f"inductor_shapes-{cpu_class()}"
    checkpoint.atomic_write_text(out / f"{stem}.json", json.dumps({**meta, "runs": runs}, indent=2))
    checkpoint.atomic_write_text(out / f"{stem}.md", text)


if __name__ == "__main__":
    main()
