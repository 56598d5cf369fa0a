"""Training and evaluation: optimizers, schedules, mixed precision, checkpoint + exact resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rescomp import checkpoint, distributed
from rescomp.config import ExperimentConfig, OptimizerConfig, ScheduleConfig
from rescomp.context import RunContext, exact_fp32
from rescomp.data import BatchLoader
from rescomp.errors import CheckpointError, TrainingDiverged
from rescomp.hardware import memory_format_of
from rescomp.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULES: Registry[Callable[[ScheduleConfig, int], Callable[[float], float]]] = Registry("schedule")


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """A decayed group and, where anything skips decay, an undecayed one.

    Residual-unit gates (layer-drop's w) never decay unless gate_weight_decay is set: decay would pull
    every w towards 0 and blur the importance the paper reads from |w|. With no_decay_bn_bias,
    BatchNorm weights and biases (every parameter of <= 1 dimension) skip decay too.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gate = name.endswith(".gate")  # a 0-d parameter: gate_weight_decay decides it, not no_decay_bn_bias
        skip = not cfg.gate_weight_decay if gate else cfg.no_decay_bn_bias and p.ndim <= 1
        (no_decay if skip else decay).append(p)
    if not no_decay or cfg.weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": cfg.weight_decay}]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@OPTIMIZERS.register("sgd")
def _sgd(groups, cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@OPTIMIZERS.register("adam")
def _adam(groups, cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


@OPTIMIZERS.register("adamw")
def _adamw(groups, cfg: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(param_groups(model, cfg), cfg, device.type == "cuda")


# Schedules: the factor multiplying the base lr at a (fractional) epoch, before warm-up.
@SCHEDULES.register("constant")
def _constant(s: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    return lambda e: 1.0


@SCHEDULES.register("step")
def _step(s: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    return lambda e: s.gamma ** math.floor(e / s.step_size)


@SCHEDULES.register("multistep")
def _multistep(s: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    return lambda e: s.gamma ** sum(e >= m for m in s.milestones)


@SCHEDULES.register("cosine")
def _cosine(s: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    span = max(epochs - s.warmup_epochs, 1e-9)

    def f(e: float) -> float:
        t = min(max(e - s.warmup_epochs, 0.0) / span, 1.0)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@SCHEDULES.register("onecycle")
def _onecycle(s: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    # Smith & Topin 2019 with torch's OneCycleLR defaults: start at lr/25, end at lr/25e4.
    lo, end, peak = 1 / 25, 1 / 25e4, s.pct_start * epochs

    def f(e: float) -> float:
        if e < peak:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * e / peak))
        t = min((e - peak) / max(epochs - peak, 1e-9), 1.0)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def lr_lambda(s: ScheduleConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    base = SCHEDULES.get(s.name)(s, epochs)
    warm = s.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        factor = base(step / steps_per_epoch)
        return factor * min(1.0, (step + 1) / warm) if warm > 0 else factor

    return f


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, ctx: RunContext, predictions: bool = False) -> dict[str, Any]:
    """Test loss and top-1 of `model` on `loader`, in fp32 whatever the training precision, TF32 off: a
    row's top-1 is the fp32 network's on every device, the figure the CPU-only steps compare with; a
    sharded loader's sums are added over ranks, so every rank returns the numbers of the whole set. predictions: also each image's predicted class (`pred`)
    and label (`target`), in the loader's order, for `paired` (one process's loader only)."""
    sharded = getattr(loader, "sharded", False)
    if predictions and sharded:
        raise ValueError("evaluate(predictions=True) needs the whole test set in one process, not a sharded loader")
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=ctx.device, dtype=torch.float64)  # loss, correct, images
    preds, targets = [], []
    fmt = memory_format_of(model)
    with exact_fp32(), torch.autocast(ctx.device.type, enabled=False):
        for x, y in loader:
            if not len(y):  # a rank's empty slice of a small last batch
                continue
            out = model(x.contiguous(memory_format=fmt))
            pred = out.argmax(1)
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
            sums[1] += (pred == y).sum()
            sums[2] += len(y)
            if predictions:
                preds.append(pred.cpu())
                targets.append(y.cpu())
    model.train(was_training)
    if sharded:
        distributed.all_reduce_sum(sums)
    loss, correct, n = sums.tolist()
    res: dict[str, Any] = {"loss": loss / max(n, 1), "top1": 100.0 * correct / max(n, 1), "n": int(n)}
    if predictions:
        res |= {"pred": torch.cat(preds), "target": torch.cat(targets)}
    return res


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two evaluations of the same test images (evaluate(..., predictions=True)), compared image by image:
    - agreement: the share of images (%) to which both give the same class, right or wrong;
    - only_a_right, only_b_right: the images only one of them classifies correctly;
    - diff_se: the standard error (points) of a's top-1 minus b's. The difference is a mean over images
      of right_a - right_b (each -1, 0 or 1), so only the images on which they differ add to its
      variance (as in McNemar's test): two models that part on a few images have a difference far more
      certain than their separate binomial errors (0.3 points each at 90 % of 10,000 images) suggest."""
    if not torch.equal(a["target"], b["target"]):
        raise ValueError("paired evaluations must be of the same images in the same order")
    n = len(a["target"])
    right_a, right_b = a["pred"] == a["target"], b["pred"] == b["target"]
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    d = (only_a - only_b) / n
    return {"agreement": 100.0 * int((a["pred"] == b["pred"]).sum()) / n, "only_a_right": only_a,
            "only_b_right": only_b, "diff_se": 100.0 * math.sqrt(max((only_a + only_b) / n - d * d, 0.0) / n)}


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs `cfg.train` on `model`, writing checkpoints/ and metrics.jsonl under `run_dir`."""

    def __init__(self, model: nn.Module, loaders: dict[str, BatchLoader], cfg: ExperimentConfig, ctx: RunContext,
                 run_dir: Optional[Path], arch: dict[str, Any], distill: Optional[Callable] = None) -> None:
        self.cfg, self.tc, self.ctx, self.run_dir, self.arch = cfg, cfg.train, ctx, run_dir, arch
        self.loaders = loaders
        self.model = ctx.layout(model.to(ctx.device))
        self.memory_format = memory_format_of(self.model)  # batches follow the model's layout
        if self.tc.sync_bn:  # the global batch's statistics under several processes (a no-op for one)
            distributed.sync_batchnorm(self.model, ctx.device)
        net = distributed.wrap(self.model, ctx.device)  # DDP under torchrun; the model itself for one process
        if ctx.compile:  # each Trainer's network is new (pruned, shortened): compile it afresh, not as the
            torch._dynamo.reset()  # 9th recompile of one forward, after which dynamo falls back to eager
        self.forward = torch.compile(net) if ctx.compile else net
        self.opt = build_optimizer(self.model, self.tc.optimizer, ctx.device)
        steps = len(loaders["train"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.tc.schedule, self.tc.epochs, steps))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
        self.state = FitState()
        self.loss_fn: Callable = distill or (lambda out, x, y: F.cross_entropy(out, y, label_smoothing=self.tc.label_smoothing))

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Optional[Path]:
        return self.run_dir / "checkpoints" if self.run_dir else None

    def save(self) -> None:
        """last.pt: collective under several processes (rank 0 writes it; every rank waits for it)."""
        if not self.ckpt_dir:
            return
        s = self.state
        checkpoint.save(self.ckpt_dir / "last.pt", {
            "arch": self.arch, "state_dict": self.model.state_dict(), "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(), "metrics": s.history[-1] if s.history else {},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state(),
            "fit_state": {k: v for k, v in s.__dict__.items() if k != "history"}, "history": s.history,
        })

    def resume(self) -> bool:
        path = self.ckpt_dir / "last.pt" if self.ckpt_dir else None
        if path is None or not path.is_file():
            return False
        p = checkpoint.load(path)
        if p.get("config_hash") != self.cfg.hash():
            raise CheckpointError(
                f"{path} was written by a different config (hash {p.get('config_hash')} vs {self.cfg.hash()}); "
                f"re-run with --fresh to start over, or give the run another name"
            )
        self.model.load_state_dict(p["state_dict"])
        self.opt.load_state_dict(p["optimizer"])
        self.sched.load_state_dict(p["scheduler"])
        self.scaler.load_state_dict(p["scaler"])
        checkpoint.set_rng_state(p["rng"])
        self.state = FitState(**p["fit_state"], history=list(p["history"]))
        return True

    # -- one epoch --------------------------------------------------------------------------
    def train_epoch(self, on_progress: Optional[Callable[..., None]] = None) -> dict[str, float]:
        """One pass over the train loader; on_progress(step, loss=, acc=, ips=) every 50 steps."""
        loader, ctx = self.loaders["train"], self.ctx
        loader.set_epoch(self.state.epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), device=ctx.device, dtype=torch.long)
        n, t0 = 0, time.perf_counter()

        def totals() -> tuple[float, float, float]:  # loss sum, correct, images: this rank's, or all ranks'
            t = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(n), device=ctx.device, dtype=torch.float64)])
            return tuple((distributed.all_reduce_sum(t) if loader.sharded else t).tolist())

        for step, (x, y) in enumerate(loader):
            x = x.contiguous(memory_format=self.memory_format)
            with ctx.autocast():
                out = self.forward(x)
                loss = self.loss_fn(out.float(), x, y)
            if loader.sharded:  # DDP averages over ranks; the mean over the global batch is what one process takes
                loss_for_grad = distributed.weighted(loss, len(y), loader.batch_total(step))
            else:
                loss_for_grad = loss
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss_for_grad).backward()
            if self.tc.grad_clip:
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            n += len(y)
            if step % 50 == 49 or step == len(loader) - 1:  # sync rarely: a .item() per step stalls a GPU
                total_loss, total_correct, total_n = totals()
                mean = total_loss / total_n
                if not math.isfinite(mean):
                    kept = bool(self.ckpt_dir) and (self.ckpt_dir / "last.pt").is_file()
                    raise TrainingDiverged(
                        f"loss became {mean} in epoch {self.state.epoch + 1}, step {step + 1}; training stopped"
                        + (" and the last good checkpoint was kept" if kept else
                           ", before its first checkpoint" if self.ckpt_dir else " (this fine-tune keeps no checkpoints)")
                        + ". Lower train.optimizer.lr, add train.schedule.warmup_epochs, or set train.grad_clip"
                    )
                if on_progress is not None:
                    on_progress(step + 1, loss=f"{mean:.3f}", acc=f"{100 * total_correct / total_n:.1f}",
                                ips=f"{total_n / (time.perf_counter() - t0):,.0f}")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - t0
        total_loss, total_correct, total_n = totals()
        return {"train_loss": total_loss / total_n, "train_top1": 100 * total_correct / total_n,
                "images_per_s": total_n / seconds, "epoch_seconds": seconds}

    def early_stop_check(self, val_loss: float) -> None:
        es, s = self.tc.early_stopping, self.state
        if val_loss < s.best_val_loss - es.min_delta:
            s.best_val_loss, s.best_epoch, s.bad_epochs = val_loss, s.epoch, 0
            if self.ckpt_dir:  # collective, as every write
                checkpoint.save(self.ckpt_dir / "best.pt", {"arch": self.arch, "state_dict": self.model.state_dict(),
                                                            "config": self.cfg.to_dict(), "metrics": s.history[-1]})
        else:
            s.bad_epochs += 1
            s.stopped_early = bool(es.patience and s.bad_epochs >= es.patience)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitState:
        """Train to train.epochs (or an early stop), resuming from last.pt; the model comes back with
        plain BatchNorms (train.sync_bn swaps them only while it trains)."""
        try:
            return self._fit()
        finally:
            distributed.plain_batchnorm(self.model)

    def _fit(self) -> FitState:
        resumed = self.resume()
        s, tc = self.state, self.tc
        if resumed:
            self.ctx.log(f"resumed from {self.ckpt_dir / 'last.pt'} after epoch {s.epoch}")
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}%  {task.fields[ips]} img/s"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        self.board = self.tensorboard()
        with Progress(*columns, console=self.ctx.console, disable=not self.ctx.is_main, transient=True) as progress:
            while s.epoch < tc.epochs and not s.stopped_early:
                task = progress.add_task(f"epoch {s.epoch + 1}/{tc.epochs}", total=len(self.loaders["train"]),
                                         loss="-", acc="-", ips="-")
                row: dict[str, Any] = {"epoch": s.epoch + 1, "lr": self.opt.param_groups[0]["lr"]}
                row.update(self.train_epoch(lambda step, **kw: progress.update(task, completed=step, **kw)))
                progress.remove_task(task)
                s.train_seconds += row["epoch_seconds"]
                s.epoch += 1
                if "val" in self.loaders:
                    row.update({f"val_{k}": v for k, v in evaluate(self.model, self.loaders["val"], self.ctx).items() if k != "n"})
                if tc.eval_test_every and s.epoch % tc.eval_test_every == 0:
                    row.update({f"test_{k}": v for k, v in evaluate(self.model, self.loaders["test"], self.ctx).items() if k != "n"})
                s.history.append(row)
                if "val_loss" in row:
                    self.early_stop_check(row["val_loss"])
                self.log_epoch(row)
                if s.epoch % tc.checkpoint_every == 0 or s.epoch == tc.epochs or s.stopped_early:
                    self.save()
        if self.board is not None:
            self.board.close()
        if s.stopped_early and tc.early_stopping.restore_best and self.ckpt_dir and (self.ckpt_dir / "best.pt").is_file():
            self.model.load_state_dict(checkpoint.load(self.ckpt_dir / "best.pt")["state_dict"])
            self.ctx.log(f"early stop after epoch {s.epoch}; restored the best weights (epoch {s.best_epoch})")
        return s

    def tensorboard(self):
        """A TensorBoard writer in <run_dir>/tensorboard when log.tensorboard is set, else None. Events
        of epochs after the checkpoint resumed from (an interrupted run wrote them; they are trained
        again) are purged, so each epoch appears once."""
        if not (self.cfg.log.tensorboard and self.run_dir and self.ctx.is_main):
            return None
        from rescomp.config import dump_config
        from rescomp.context import tensorboard_writer_class

        board = tensorboard_writer_class()(str(self.run_dir / "tensorboard"), purge_step=self.state.epoch + 1)
        if self.state.epoch == 0:
            board.add_text("config", "```yaml\n" + dump_config(self.cfg) + "```", 0)
        return board

    def log_epoch(self, row: dict[str, Any]) -> None:
        if self.run_dir:  # rewritten whole from the history, so a resumed run never repeats an epoch's line
            checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl",
                                         "".join(json.dumps(r) + "\n" for r in self.state.history))
        if not self.ctx.is_main:
            return
        if getattr(self, "board", None) is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    group, _, name = k.partition("_") if k.startswith(("train_", "val_", "test_")) else ("train", "", k)
                    self.board.add_scalar(f"{group}/{name}", v, row["epoch"])
            self.board.flush()
        parts = [f"epoch {row['epoch']}/{self.tc.epochs}", f"loss {row['train_loss']:.4f}", f"acc {row['train_top1']:.2f}%"]
        parts += [f"{k} {row[k]:.2f}%" for k in ("val_top1", "test_top1") if k in row]
        parts += [f"{row['images_per_s']:,.0f} img/s", f"lr {row['lr']:.4g}"]
        self.ctx.log("  ".join(parts))
