"""int8 against fp32 on the CPU, on every runtime installed: latency at batch 1 and 64, and bytes.

Per architecture, every path is timed in this one process, interleaved (one pass of each per round,
rescomp.measure.cpu_latency_stats), with the same threads pinned, after warm-up, until each
interquartile range is within 5 % of its median or 20 s pass:

- fp32 in PyTorch eager, NCHW and NHWC;
- fp32 in ONNX Runtime (the `rescomp export` graph, checked against PyTorch);
- fp32 compiled by Inductor (torch.compile, weight freezing);
- int8 through torch.ao FX (x86 backend, 7-bit activations);
- int8 through torchao PT2E (X86InductorQuantizer), compiled by Inductor (`quantize.backend: pt2e`);
- int8 in ONNX Runtime (static QDQ, S8S8, per-channel weights: `quantize.backend: onnxruntime`).

Every int8 speed-up is over the fastest fp32 path measured, never a slower one. Weights are freshly
initialised and int8 is calibrated on 256 random images: speed and size do not depend on the learned
values (int8 accuracy is measured by `rescomp quantize` on trained models, results/table-separable).
The CPU's instruction sets are recorded, because int8 kernels depend on them most (VNNI, AMX).

Targets (issue 11): the fastest int8 path at least 1.5x the fastest fp32 path at batch 64 on an
AVX2-only CPU, 3x with VNNI; where int8 is slower than fp32 at batch 1, the table says so.

    python scripts/bench_int8.py [--arch resnet56 --arch resnet50v2] [--threads N]
    python scripts/bench_int8.py --render results/bench/int8_latency-avx2.json   (its .md again, timing nothing)
Writes results/bench/int8_latency-<CPU class>.{json,md}, the class named by the int8 instruction sets
(avx2, vnni, amx; `-onednn-<cap>` where ONEDNN_MAX_CPU_ISA holds oneDNN lower), so the figures of one
kind of CPU never overwrite another's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.compress import quantize_ort, quantize_pt2e  # noqa: E402
from rescomp.compress.quantize import ptq  # noqa: E402
from rescomp.config_sections import QuantizeConfig  # noqa: E402
from rescomp.errors import ConfigError  # noqa: E402
from rescomp.export import export_onnx, ort_session  # noqa: E402
from rescomp.hardware import NO_VNNI_CAPS, cpu_flags, has_vnni, onednn_isa_cap  # noqa: E402
from rescomp.measure import (InductorForward, OrtForward, cpu_latency_stats, pinned_threads,  # noqa: E402
                             state_dict_bytes, within_noise)
from rescomp.models import build_model  # noqa: E402

PATHS = {  # name: (label, int8?)
    "fp32_nchw": ("fp32 PyTorch NCHW", False), "fp32_nhwc": ("fp32 PyTorch NHWC", False),
    "fp32_ort": ("fp32 ONNX Runtime", False), "fp32_ind": ("fp32 Inductor", False),
    "int8_fx": ("int8 PyTorch FX x86", True), "int8_pt2e": ("int8 PT2E Inductor", True),
    "int8_ort": ("int8 ONNX Runtime QDQ", True),
}
BATCHES = (1, 64)


def bench(arch: str, threads: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model({"arch": arch, "num_classes": 10}).eval()
    calib = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    fx, _ = ptq(model, QuantizeConfig(), calib, 32)
    ort_int8, _, blob = quantize_ort.ptq(model, QuantizeConfig(backend="onnxruntime"), calib, 32)
    ort_int8.threads(threads)
    try:
        pt2e, _, pt2 = quantize_pt2e.ptq(model, QuantizeConfig(backend="pt2e"), calib, 32)
    except ConfigError as e:  # a network torchao cannot annotate: the path is reported as not available
        pt2e, pt2, unavailable = None, b"", str(e)
    else:
        unavailable = None
    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, 32, Path(d) / "fp32.onnx")
        fp32_onnx_bytes = (Path(d) / "fp32.onnx").stat().st_size
        ort_fp32 = OrtForward(ort_session(Path(d) / "fp32.onnx", threads))
    models = {"fp32_nchw": (model, False), "fp32_nhwc": (model, True), "fp32_ort": (ort_fp32, False),
              "fp32_ind": (InductorForward(model), False), "int8_fx": (fx, False), "int8_pt2e": (pt2e, False),
              "int8_ort": (ort_int8, False)}
    if pt2e is None:
        del models["int8_pt2e"]
    # sizes count each network's tensors as torch.save writes them, on every path (rescomp.measure.tensor_bytes);
    # the files, which also hold a graph, are *_file_bytes
    row = {"arch": arch, "fp32_size_bytes": state_dict_bytes(model), "fp32_onnx_file_bytes": fp32_onnx_bytes,
           "int8_fx_size_bytes": state_dict_bytes(fx), "int8_pt2e_size_bytes": pt2e.tensor_bytes if pt2e else None,
           "int8_pt2e_file_bytes": len(pt2), "int8_ort_size_bytes": ort_int8.tensor_bytes, "int8_ort_file_bytes": len(blob),
           "unavailable": {"int8_pt2e": unavailable} if unavailable else {}}
    for b in BATCHES:
        stats = cpu_latency_stats(models, 32, b, threads=threads, warmup=warmup, repeats=repeats if b == 1 else max(3, repeats // 2))
        for name, st in stats.items():
            row[f"{name}_ms_b{b}"], row[f"{name}_iqr_ms_b{b}"], row[f"{name}_runs_b{b}"] = st["median"], st["q3"] - st["q1"], st["n"]
        fastest_fp32 = min((n for n, (_, q) in PATHS.items() if not q and n in models), key=lambda n: row[f"{n}_ms_b{b}"])
        fastest_int8 = min((n for n, (_, q) in PATHS.items() if q and n in models), key=lambda n: row[f"{n}_ms_b{b}"])
        row[f"fastest_fp32_b{b}"], row[f"fastest_int8_b{b}"] = fastest_fp32, fastest_int8
        for n, (_, q) in PATHS.items():
            if q and n in models:
                row[f"{n}_speedup_b{b}"] = row[f"{fastest_fp32}_ms_b{b}"] / row[f"{n}_ms_b{b}"]
        row[f"best_speedup_b{b}"] = row[f"{fastest_fp32}_ms_b{b}"] / row[f"{fastest_int8}_ms_b{b}"]
    return row


def cpu_class() -> str:
    """avx2 (int8 without VNNI), vnni, or amx (AMX int8 tiles beside VNNI), and the oneDNN cap if one is set."""
    flags = cpu_flags()
    tag = "avx2" if not has_vnni() else ("amx" if "amx_int8" in flags else "vnni")
    cap = onednn_isa_cap()
    return tag + (f"-onednn-{cap.lower()}" if cap else "")


def render(meta: dict, rows: list[dict]) -> str:
    """The Markdown report of one run, from what its JSON keeps (`--render` re-makes it from there)."""
    cpu = meta["hardware"]["cpu"]
    cap = cpu.get("onednn_max_cpu_isa")
    vnni = meta["vnni_onednn"] if "vnni_onednn" in meta else (  # files before it was kept: the CPU's flags and cap
        (meta["isa"]["avx512_vnni"] or meta["isa"]["avx_vnni"]) and (cap or "").upper() not in NO_VNNI_CAPS)
    isa = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in meta["isa"].items())
    lines = [f"# int8 vs fp32 CPU latency, every runtime ({meta['cpu_class']} CPU)", "",
             f"- device: {meta['device']}, {meta['threads']} threads pinned",
             f"- instruction sets: {isa}" + (f"; oneDNN held to {cap} (ONEDNN_MAX_CPU_ISA)" if cap else ""),
             f"- commit: {meta['commit']}, torch {meta['torch']}, date {meta['date']}",
             f"- how made: `{meta['command']}`, {meta['wall_s']:.0f} s", ""]
    for r in rows:
        lines += [f"## {r['arch']}", "", "| path | ms b1 | ms b64 | speed-up b1 | speed-up b64 | bytes |", "|---|---|---|---|---|---|"]
        size = {n: r[f"{n}_size_bytes" if q else "fp32_size_bytes"] for n, (_, q) in PATHS.items()}
        for name, (label, q) in PATHS.items():
            if name in r["unavailable"]:
                lines.append(f"| {label} | not available: {r['unavailable'][name]} |  |  |  |  |")
                continue
            cells = [f"{r[f'{name}_ms_b{b}']:.2f} ±{r[f'{name}_iqr_ms_b{b}'] / 2:.2f}" for b in BATCHES]
            ups = [f"{r[f'{name}_speedup_b{b}']:.2f}x" if q else ("fastest fp32" if r[f"fastest_fp32_b{b}"] == name else "")
                   for b in BATCHES]
            lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ups)} | {size[name]:,} |")
        lines.append("")
    target = 3.0 if vnni else 1.5
    lines += ["Speed-ups are over the fastest fp32 path at that batch size (± is half the interquartile range). "
              "Bytes count each network's tensors as torch.save writes them, on every path; the files, which also "
              "hold a graph, are the JSON's *_file_bytes. Weights are random (latency does not depend on them).",
              f"Issue 11's target on this CPU ({'VNNI' if vnni else 'AVX2-only, no VNNI'}): the fastest int8 path "
              f"at least {target}x the fastest fp32 path at batch 64.", ""]
    for r in rows:
        ok = r["best_speedup_b64"] >= target
        lines.append(f"- {r['arch']} batch 64: {PATHS[r['fastest_int8_b64']][0]} {r['best_speedup_b64']:.2f}x over "
                     f"{PATHS[r['fastest_fp32_b64']][0]}: {'PASS' if ok else 'FAIL'}")
        if r["best_speedup_b1"] < 1:
            i8, f32 = r["fastest_int8_b1"], r["fastest_fp32_b1"]
            tie = within_noise(r[f"{i8}_ms_b1"], r[f"{i8}_iqr_ms_b1"], r[f"{f32}_ms_b1"], r[f"{f32}_iqr_ms_b1"])
            said = ("**int8 is no faster than fp32 here** (within the noise: the two ranges, median ± half the IQR, "
                    "overlap)" if tie else "**int8 is slower than fp32 here**")
            lines.append(f"- {r['arch']} batch 1: {said}; the fastest int8 path ({PATHS[i8][0]}) runs at "
                         f"{r['best_speedup_b1']:.2f}x the fastest fp32 path ({PATHS[f32][0]}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", help="registry model (repeatable; default resnet56 and resnet50v2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--render", metavar="JSON", help="re-write the Markdown beside a committed int8_latency-*.json "
                   "from it, timing nothing")
    args = p.parse_args()
    if args.render:
        src = Path(args.render)
        data = json.loads(src.read_text())
        checkpoint.atomic_write_text(src.with_suffix(".md"), render(data, data["rows"]))
        return
    archs = args.arch or ["resnet56", "resnet50v2"]
    flags = cpu_flags()
    vnni = has_vnni(onednn=True)  # the target: oneDNN's (PT2E's) kernels held below VNNI count as without
    t0 = time.perf_counter()
    with pinned_threads(args.threads) as n:
        rows = [bench(a, n, args.warmup, args.repeats) for a in archs]
        meta = {"wall_s": round(time.perf_counter() - t0, 1), **provenance.stamp("cpu"), "threads": n, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "isa": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
                "cpu_class": cpu_class(), "vnni_onednn": vnni}
    text = render(meta, rows)
    print(text)
    out = Path(args.out)
    stem = f"int8_latency-{cpu_class()}"
    checkpoint.atomic_write_text(out / f"{stem}.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    checkpoint.atomic_write_text(out / f"{stem}.md", text)


if __name__ == "__main__":
    main()
