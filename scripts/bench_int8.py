"""int8 against fp32 on the CPU: latency at batch 1 and 64, and bytes of the saved state_dict.

Both models of each architecture are timed in this one process, with the same threads pinned
(default: all cores), after warm-up, as the median of repeats. The fp32 model is timed in both
memory layouts and the faster one is the reference (NHWC through oneDNN is usually faster on x86),
so the speed-up is not flattered by a slow baseline. Weights are freshly initialised and the int8
model is calibrated on 256 random images: speed and size do not depend on the values learned (the
accuracy of int8 is measured by `rescomp quantize` on trained models, see results/table-separable).

Targets from issue 5 (this 2-core CPU): int8 at least 3x faster than fp32 at batch 64 and 2x at
batch 1; int8 state_dict at most 0.3x the fp32 bytes.

    python scripts/bench_int8.py [--arch resnet56 --arch resnet50v2] [--threads N] [--repeats N]
Writes results/bench/int8_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.compress.quantize import ptq  # noqa: E402
from rescomp.config import QuantizeConfig  # noqa: E402
from rescomp.measure import cpu_latency_ms, pinned_threads, state_dict_bytes  # noqa: E402
from rescomp.models import build_model  # noqa: E402

TARGETS = {"speedup_b64": 3.0, "speedup_b1": 2.0, "size_ratio": 0.3}


def bench(arch: str, threads: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model({"arch": arch, "num_classes": 10}).eval()
    calib = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    qmodel, _ = ptq(model, QuantizeConfig(), calib, 32)
    row = {"arch": arch, "fp32_size_bytes": state_dict_bytes(model), "int8_size_bytes": state_dict_bytes(qmodel)}
    row["size_ratio"] = row["int8_size_bytes"] / row["fp32_size_bytes"]
    for b in (1, 64):
        reps = repeats if b == 1 else max(3, repeats // 2)
        nchw = cpu_latency_ms(model, 32, b, threads=threads, warmup=warmup, repeats=reps)
        nhwc = cpu_latency_ms(model, 32, b, threads=threads, warmup=warmup, repeats=reps, channels_last=True)
        int8 = cpu_latency_ms(qmodel, 32, b, threads=threads, warmup=warmup, repeats=reps)
        row.update({f"fp32_nchw_ms_b{b}": nchw, f"fp32_nhwc_ms_b{b}": nhwc, f"int8_ms_b{b}": int8,
                    f"speedup_b{b}": min(nchw, nhwc) / int8})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", help="registry model (repeatable; default resnet56 and resnet50v2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    archs = args.arch or ["resnet56", "resnet50v2"]
    with pinned_threads(args.threads) as n:
        rows = [bench(a, n, args.warmup, args.repeats) for a in archs]
        meta = {**provenance.stamp("cpu"), "threads": n, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    lines = ["# int8 vs fp32 CPU latency", "", f"- device: {meta['device']}, {n} threads pinned",
             f"- commit: {meta['commit']}, torch {meta['torch']}, date {meta['date']}",
             f"- how made: `{meta['command']}`", "",
             "| arch | fp32 NCHW ms b1 | fp32 NHWC ms b1 | int8 ms b1 | speed-up b1 | fp32 NCHW ms b64 | "
             "fp32 NHWC ms b64 | int8 ms b64 | speed-up b64 | size int8/fp32 |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['fp32_nchw_ms_b1']:.2f} | {r['fp32_nhwc_ms_b1']:.2f} | {r['int8_ms_b1']:.2f} | "
                     f"{r['speedup_b1']:.2f}x | {r['fp32_nchw_ms_b64']:.1f} | {r['fp32_nhwc_ms_b64']:.1f} | "
                     f"{r['int8_ms_b64']:.1f} | {r['speedup_b64']:.2f}x | {r['size_ratio']:.3f} |")
    lines += ["", "Speed-up is over the faster fp32 layout. Issue 5's targets on this CPU:", ""]
    for r in rows:
        for key, target in TARGETS.items():
            ok = r[key] <= target if key == "size_ratio" else r[key] >= target
            lines.append(f"- {r['arch']} {key} {r[key]:.2f} (target {'<=' if key == 'size_ratio' else '>='} {target}): "
                         f"{'PASS' if ok else 'FAIL'}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    checkpoint.atomic_write_text(out / "int8_latency.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    checkpoint.atomic_write_text(out / "int8_latency.md", text)


if __name__ == "__main__":
    main()
