"""Training throughput: the common CIFAR reference recipe against rescomp's own loop, same process and device.

What is compared, and why: ResNet-56 on CIFAR-10-shaped data, trained for a fixed number of steps
two ways.
  reference  what the usual CIFAR ResNet repositories do: a DataLoader whose worker processes run
             torchvision transforms on PIL images (RandomCrop(32, padding=4), RandomHorizontalFlip,
             ToTensor, Normalize), fp32, batch 128, SGD(0.1, momentum 0.9, wd 1e-4), cudnn.benchmark.
  rescomp    rescomp.train.Trainer with the config a user would run on that device: uint8 images
             held on the device and augmented a batch at a time (rescomp.data.BatchLoader),
             precision and channels_last "auto" (bf16 on CUDA, fp32 on the CPU; NHWC on both), batch
             512 on CUDA (lr scaled linearly, 2 warm-up epochs) and 128 on the CPU.
The ratio of images/s is what a user gains by moving from the usual recipe to rescomp; the
--accuracy-epochs mode checks that the faster recipe does not cost accuracy. Evaluation time of the
10,000 test images (rescomp.train.evaluate, after a one-batch warm-up) is reported as well.

Data: the offline CIFAR-10 copy if rescomp.data.load_splits finds it (never downloads), else
synthetic uint8 data of CIFAR-10's shape (50,000 train / 10,000 test images, 10 classes).

CPU defaults: 20 timed steps after 3 warm-up steps, and min(2, cores) reference DataLoader workers
(2 is what the usual repositories use; on a 2-core machine 1 and 2 workers were equally fast and 0
workers 4x slower, because the per-image transforms then run in the training process with its
thread pool). Pass --workers to try others. About 1 minute on 2 cores. Run it on a quiet machine:
a second busy process on a 2-core VM slows both recipes unevenly (thread oversubscription).

On a GPU machine (defaults: 100 timed steps after 10 warm-up, min(8, cores) workers):
    python scripts/bench_train.py                           # throughput -> results/bench/train_throughput-gpu.{json,md}
    python scripts/bench_train.py --compile                 # the same with torch.compile in the rescomp path
                                                            #   -> train_throughput-gpu-compile.{json,md}
    python scripts/bench_train.py --accuracy-epochs 30      # instead of throughput: both recipes 30 epochs,
                                                            # test top-1 -> results/bench/accuracy_match-gpu.{json,md}
Files end in -gpu or -cpu after the device that made them, so a GPU run never replaces the CPU's figures.
Set RESCOMP_DATA to the folder holding cifar10-jpeg.tar.gz if it is not under ./data or ../shared/data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.config import DataConfig, ScheduleConfig, validate  # noqa: E402
from rescomp.context import RunContext, make_context, resolve_device, seed_everything  # noqa: E402
from rescomp.data import NORMALIZATION, BatchLoader, Splits, load_splits, make_loaders, synthetic  # noqa: E402
from rescomp.errors import DataError  # noqa: E402
from rescomp.models import build_model  # noqa: E402
from rescomp.train import Trainer, evaluate, lr_lambda  # noqa: E402

SYNTHETIC = {"train_size": 50_000, "test_size": 10_000, "num_classes": 10}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_data(kind: str) -> tuple[Splits, str]:
    """(splits, dataset name): the CIFAR-10 copy if found (never downloaded), else CIFAR-10-shaped synthetic."""
    if kind in ("auto", "real"):
        try:
            return load_splits(DataConfig(download=False)), "cifar10"
        except DataError:
            if kind == "real":
                raise
    return synthetic(DataConfig(dataset="synthetic", synthetic=SYNTHETIC)), "synthetic"


# -- the reference recipe ------------------------------------------------------------------------
class PILImages(Dataset):
    """uint8 HWC numpy images -> PIL -> torchvision transforms, one image at a time, as the usual repos do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).contiguous().numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def reference_loader(splits: Splits, dataset: str, workers: int, device: torch.device) -> DataLoader:
    from torchvision import transforms as T
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*NORMALIZATION[dataset])])
    return DataLoader(PILImages(splits.train_x, splits.train_y, tf), batch_size=128, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)


def reference_model(spec: dict, device: torch.device, lr: float = 0.1):
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the usual repositories set it
    seed_everything(0)
    model = build_model(spec).to(device)  # fp32, contiguous
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def reference_steps(model, opt, batches, device: torch.device, sched=None) -> int:
    model.train()
    n = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        n += len(y)
    return n


def forever(loader: DataLoader):
    while True:
        yield from loader


# -- rescomp ---------------------------------------------------------------------------------------
def rescomp_setup(args, splits: Splits, dataset: str, device: torch.device, epochs: int, max_steps):
    """The user's config on this device -> (trainer, loaders, ctx)."""
    lr = 0.1 * args.rescomp_batch / 128  # linear scaling from the reference's 0.1 at batch 128
    data = {"dataset": dataset, **({"synthetic": SYNTHETIC} if dataset == "synthetic" else {})}
    cfg = validate({"device": device.type, "seed": 0, "data": data, "model": {"arch": args.arch}, "train": {
        "epochs": epochs, "batch_size": args.rescomp_batch, "precision": "auto", "channels_last": "auto",
        "compile": args.compile, "max_steps_per_epoch": max_steps, "eval_test_every": 0,
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 2 if args.rescomp_batch > 128 else 0}}}, "bench")
    ctx = make_context(cfg)
    spec = cfg.model.spec(cfg.data.num_classes)
    loaders = make_loaders(splits, cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                           device=ctx.device, seed=cfg.seed, max_steps=max_steps)
    seed_everything(0)
    return Trainer(build_model(spec), loaders, cfg, ctx, run_dir=None, arch=spec), loaders, ctx


def nhwc(trainer: Trainer) -> bool:
    """The layout rescomp's one decision chose for this network (rescomp.hardware.training_layout)."""
    return trainer.memory_format == torch.channels_last


def rescomp_steps(trainer: Trainer, loader: BatchLoader, steps: int) -> tuple[int, float]:
    """Run exactly `steps` steps through Trainer.train_epoch, over as many epochs as needed:
    (images, seconds that train_epoch itself reported)."""
    n, seconds = 0, 0.0
    while steps > 0:
        loader.max_steps = steps
        done = len(loader)  # an epoch may hold fewer steps than asked (batch 512: 97)
        n += done * loader.batch_size
        seconds += trainer.train_epoch()["epoch_seconds"]
        trainer.state.epoch += 1
        steps -= done
    return n, seconds


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# -- the two modes ---------------------------------------------------------------------------------
def throughput(args, splits: Splits, dataset: str, device: torch.device) -> dict:
    spec = {"arch": args.arch, "num_classes": splits.num_classes}
    model, opt = reference_model(spec, device)
    loader = reference_loader(splits, dataset, args.workers, device)
    stream = forever(loader)
    reference_steps(model, opt, itertools.islice(stream, args.warmup), device)
    ref_s, ref_n = timed(lambda: reference_steps(model, opt, itertools.islice(stream, args.steps), device), device)
    stream.close()
    del model, opt, stream, loader  # shuts the workers down before rescomp is timed

    trainer, loaders, ctx = rescomp_setup(args, splits, dataset, device, 200, args.warmup + args.steps)
    if args.warmup:
        rescomp_steps(trainer, loaders["train"], args.warmup)
    res_s, (res_n, own_s) = timed(lambda: rescomp_steps(trainer, loaders["train"], args.steps), device)
    test = loaders["test"]
    test.max_steps = 1
    evaluate(trainer.model, test, ctx)  # warm-up: one batch
    test.max_steps = None
    eval_s, ev = timed(lambda: evaluate(trainer.model, test, ctx), device)

    ref = {"images_per_s": ref_n / ref_s, "seconds": ref_s, "images": ref_n, "batch_size": 128, "precision": "fp32",
           "channels_last": False, "workers": args.workers, "compile": False}
    res = {"images_per_s": res_n / res_s, "trainer_images_per_s": res_n / own_s, "seconds": res_s, "images": res_n,
           "batch_size": args.rescomp_batch, "precision": ctx.precision, "channels_last": nhwc(trainer), "workers": 0, "compile": ctx.compile}
    return {"reference": ref, "rescomp": res, "ratio": res["images_per_s"] / ref["images_per_s"],
            "eval": {"seconds": eval_s, "images": ev["n"], "images_per_s": ev["n"] / eval_s,
                     "batch_size": test.batch_size}}


def accuracy_match(args, splits: Splits, dataset: str, device: torch.device) -> dict:
    epochs = args.accuracy_epochs
    spec = {"arch": args.arch, "num_classes": splits.num_classes}
    model, opt = reference_model(spec, device)
    loader = reference_loader(splits, dataset, args.workers, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ScheduleConfig(name="cosine"), epochs, len(loader)))
    ref_s, _ = timed(lambda: [reference_steps(model, opt, loader, device, sched) for _ in range(epochs)], device)
    mean, std = NORMALIZATION[dataset]
    fp32 = RunContext(device)
    ref_top1 = evaluate(model, BatchLoader(splits.test_x, splits.test_y, 1000, mean=mean, std=std, device=device), fp32)["top1"]
    del model, opt, loader

    trainer, loaders, ctx = rescomp_setup(args, splits, dataset, device, epochs, None)
    res_s, _ = timed(trainer.fit, device)
    res_top1 = evaluate(trainer.model, loaders["test"], ctx)["top1"]
    return {"epochs": epochs,
            "reference": {"top1": ref_top1, "train_seconds": ref_s, "batch_size": 128, "lr": 0.1, "warmup_epochs": 0,
                          "precision": "fp32"},
            "rescomp": {"top1": res_top1, "train_seconds": res_s, "batch_size": args.rescomp_batch,
                        "lr": trainer.tc.optimizer.lr, "warmup_epochs": trainer.tc.schedule.warmup_epochs,
                        "precision": ctx.precision, "channels_last": nhwc(trainer), "compile": ctx.compile},
            "top1_difference": res_top1 - ref_top1}


# -- output ----------------------------------------------------------------------------------------
def targets(r: dict, device: torch.device) -> list[tuple[str, str, str]]:
    """(target, measured, PASS | FAIL | n/a): the issue's H100 targets apply on CUDA, the CPU one on the CPU."""
    gpu = device.type == "cuda"
    rows = [("rescomp >= 25,000 images/s (H100)", f"{r['rescomp']['images_per_s']:,.0f}", r["rescomp"]["images_per_s"] >= 25_000, gpu),
            ("rescomp >= 4x reference (H100)", f"{r['ratio']:.2f}x", r["ratio"] >= 4, gpu),
            ("eval of 10,000 test images < 0.5 s (H100)", f"{r['eval']['seconds']:.3f} s", r["eval"]["seconds"] < 0.5, gpu),
            ("rescomp not slower than reference (CPU)", f"{r['ratio']:.2f}x", r["ratio"] >= 1, not gpu)]
    return [(t, v, ("PASS" if ok else "FAIL") if applies else "n/a") for t, v, ok, applies in rows]


def markdown(title: str, meta: dict, table: list[list[str]], extra: list[str]) -> str:
    lines = [f"# {title}", "", f"- device: {meta['device']}", f"- commit: {meta['commit']}, torch {meta['torch']}, "
             f"python {meta['python']}", f"- date: {meta['date']}", f"- data: {meta['data']}", "",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]] + [""] + extra
    lines += ["", f"How made: `{meta['command']}` (scripts/bench_train.py; reference and rescomp in one process, one device)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, help="timed steps (default 100 on cuda, 20 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10 on cuda, 3 on cpu)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (default min(8, cores) on cuda, min(2, cores) on cpu)")
    p.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"],
                   help="auto: the CIFAR-10 copy if found, else synthetic (never downloads)")
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--rescomp-batch", type=int, help="rescomp batch size (default 512 on cuda, 128 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile in the rescomp path")
    p.add_argument("--accuracy-epochs", type=int, help="instead: train both recipes this many epochs, compare test top-1")
    args = p.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (100 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    args.workers = args.workers if args.workers is not None else min(8 if gpu else 2, os.cpu_count() or 1)
    args.rescomp_batch = args.rescomp_batch or (512 if gpu else 128)
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        p.error("--steps must be >= 1, --warmup and --workers >= 0")

    splits, dataset = load_data(args.data)
    meta = {**provenance.stamp(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": f"{dataset} ({splits.source}): {len(splits.train_y):,} train / {len(splits.test_y):,} test images"}
    out = Path(args.out)
    print(f"{meta['device']}; {meta['data']}", flush=True)

    if args.accuracy_epochs:
        r = accuracy_match(args, splits, dataset, device)
        table = [["recipe", "batch", "lr", "warm-up epochs", "precision", "train s", "test top-1 %"]]
        for name in ("reference", "rescomp"):
            x = r[name]
            table.append([name, str(x["batch_size"]), f"{x['lr']:g}", f"{x['warmup_epochs']:g}", x["precision"],
                          f"{x['train_seconds']:.0f}", f"{x['top1']:.2f}"])
        extra = [f"{r['epochs']} epochs each, SGD momentum 0.9, wd 1e-4, cosine schedule per step. "
                 f"rescomp - reference: **{r['top1_difference']:+.2f}** top-1 points."]
        stem, title = "accuracy_match", f"Accuracy match: {args.arch}, {r['epochs']} epochs"
    else:
        r = throughput(args, splits, dataset, device)
        table = [["recipe", "images/s", "batch", "precision", "channels_last", "workers", "steps", "seconds"]]
        for name in ("reference", "rescomp"):
            x = r[name]
            table.append([name, f"{x['images_per_s']:,.0f}", str(x["batch_size"]), x["precision"] + (" +compile" if x["compile"] else ""),
                          str(x["channels_last"]), str(x["workers"]), str(args.steps), f"{x['seconds']:.2f}"])
        r["targets"] = [{"target": t, "measured": v, "status": s} for t, v, s in targets(r, device)]
        extra = [f"rescomp / reference: **{r['ratio']:.2f}x**. Evaluation of {r['eval']['images']:,} test images: "
                 f"{r['eval']['seconds']:.3f} s (fp32, TF32 off, as every evaluation; batch {r['eval']['batch_size']}, after a one-batch warm-up). "
                 f"{args.warmup} untimed warm-up steps per recipe.", "", "| issue's target | measured | status |", "|---|---|---|"]
        extra += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in r["targets"]]
        stem, title = "train_throughput", f"Training throughput: {args.arch}"

    print("\n".join("  ".join(f"{c:>14}" for c in row) for row in table))
    print("\n".join(line for line in extra if line and not line.startswith("|---")))
    record = {**meta, "arch": args.arch, "dataset": dataset, "steps": args.steps, "warmup": args.warmup,
              "workers": args.workers, "rescomp_batch": args.rescomp_batch, "compile": args.compile, **r}
    stem += ("-gpu" if gpu else "-cpu") + ("-compile" if args.compile else "")
    checkpoint.atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    checkpoint.atomic_write_text(out / f"{stem}.md", markdown(title, meta, table, extra))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
