"""Scaling of training from 1 to N processes: `rescomp train --nproc n` itself, for n = 1, 2, 4, ... N.

What is measured: ResNet-56 (or --arch) trained through the real path a user runs (torchrun,
DistributedDataParallel, the sharded device-resident loader, train.sync_bn as given) on CIFAR-10-shaped
synthetic data, so the figure is about the engine and not about the disk. Each process count trains
its own run for --epochs epochs at the same global batch; the last epoch's images/s (all processes
together, from metrics.jsonl) is its throughput, the first epochs being warm-up (cuDNN autotuning,
NCCL set-up). Scaling efficiency = images/s with n processes / (n x images/s with one).

On a node with N GPUs (NCCL, one process per GPU; global batch 512 x N by default, so each GPU keeps
the one-GPU batch):
    python scripts/bench_ddp.py                      # -> results/bench/ddp_scaling-cuda.{json,md}
On a CPU (Gloo; each process gets cores / n threads, so this compares ways of using the same cores,
the gradient all-reduce included, not scaling over devices):
    python scripts/bench_ddp.py --device cpu --arch resnet20 --max-procs 2
The runs go to a temporary folder; nothing but the table is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import provenance  # noqa: E402
from rescomp.jobs import usable_cores  # noqa: E402


def counts(most: int) -> list[int]:
    out, n = [], 1
    while n < most:
        out.append(n)
        n *= 2
    return out + [most]


def train_ips(n: int, cfg: dict, work: Path) -> tuple[float, float]:
    """(images/s of the last epoch, wall seconds) of `rescomp train` as n processes."""
    path = work / f"n{n}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": f"ddp-n{n}"}))
    cmd = [sys.executable, "-m", "rescomp", "train", str(path)] + (["--nproc", str(n)] if n > 1 else [])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    t0 = datetime.now()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rescomp train with {n} process(es) failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    history = [json.loads(line) for line in (work / "runs" / f"ddp-n{n}" / "metrics.jsonl").read_text().splitlines()]
    return history[-1]["images_per_s"], (datetime.now() - t0).total_seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--max-procs", type=int, help="default: every GPU, or 2 on a CPU")
    p.add_argument("--batch-per-proc", type=int, help="global batch = this x processes (default 512 on cuda, 64 on cpu)")
    p.add_argument("--images", type=int, help="training images per epoch (default 50,000 on cuda, 4,096 on cpu)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the last one is timed")
    p.add_argument("--sync-bn", action="store_true", help="train.sync_bn: true")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    most = args.max_procs or (torch.cuda.device_count() if cuda else 2)
    per = args.batch_per_proc or (512 if cuda else 64)
    images = args.images or (50_000 if cuda else 4_096)
    if most < 1 or args.epochs < 2:
        p.error("--max-procs must be >= 1 and --epochs >= 2 (the first epochs warm up)")

    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for n in counts(most):
            cfg = {"seed": 0, "device": device.type,
                   "data": {"dataset": "synthetic", "synthetic": {"train_size": images, "test_size": 1_000, "num_classes": 10}},
                   "model": {"arch": args.arch},
                   "train": {"epochs": args.epochs, "batch_size": per * n, "eval_test_every": 0, "sync_bn": args.sync_bn,
                             "optimizer": {"name": "sgd", "lr": 0.1 * per * n / 128}},
                   "measure": {"latency": False, "gpu_throughput": False}}
            ips, wall = train_ips(n, cfg, work)
            rows.append({"processes": n, "global_batch": per * n, "images_per_s": ips, "wall_seconds": wall})
            print(f"{n} process(es), global batch {per * n}: {ips:,.0f} images/s", flush=True)
    one = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / one
        r["efficiency"] = r["speedup"] / r["processes"]
    meta = {**provenance.stamp(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": "nccl" if cuda else "gloo", "arch": args.arch, "sync_bn": args.sync_bn, "epochs": args.epochs,
            "images_per_epoch": images, "cores": usable_cores()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ddp_scaling-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Training scaling: {args.arch}, 1 to {most} processes ({meta['backend']})", "",
             f"- device: {meta['device']}", f"- commit: {meta['commit']}, torch {meta['torch']}, date {meta['date']}",
             f"- how made: `{meta['command']}` (each process count a `rescomp train --nproc n` run of its own; "
             f"{images:,} synthetic images per epoch, {args.epochs} epochs, the last timed; sync_bn {args.sync_bn})", "",
             "| processes | global batch | images/s | speed-up | efficiency | run wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['global_batch']} | {r['images_per_s']:,.0f} | {r['speedup']:.2f}x | "
              f"{100 * r['efficiency']:.0f} % | {r['wall_seconds']:.0f} |" for r in rows]
    if not cuda:
        lines += ["", f"Weak scaling (each process keeps a batch of {per}). On the CPU the n processes share the "
                      f"{meta['cores']} cores it may use, cores / n threads each, against one process with all of "
                      "them: the figure compares two ways of using the same cores, Gloo's gradient all-reduce "
                      "included. It says nothing about scaling over GPUs."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"-> {out / stem}.md")


if __name__ == "__main__":
    main()
