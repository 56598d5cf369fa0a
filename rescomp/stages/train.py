"""The train stage: data + model -> train (resumable from its checkpoints) -> evaluate -> measure.

It starts every chain: its network is the config's model, seeded; its folder is runs/<name>.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

from rescomp import checkpoint
from rescomp.config import ExperimentConfig
from rescomp.context import RunContext, seed_everything
from rescomp.errors import CheckpointError, ConfigError
from rescomp.measure import measure
from rescomp.models import build_model
from rescomp.runner import STAGES, Stage, StageRun, execute, model_spec, other_classes
from rescomp.train import Trainer, evaluate


def check(cfg: ExperimentConfig) -> Optional[torch.nn.Module]:
    """The model's spec (built and run on one image) and a teacher that loads, before any folder is
    touched; returns the teacher (train.distill), which the body distills from."""
    if cfg.train.epochs < 1:  # the schema takes 0: a later stage's checkpoint records a fine-tune of none so
        raise ConfigError("train.epochs: 0 trains nothing, and the run would hand on a random network as trained; "
                          "give 1 or more (`rescomp measure CONFIG` counts and times a network without training it)")
    model_spec(cfg)
    if cfg.train.distill is None:
        return None
    try:  # a missing, corrupt or int8 teacher fails here
        teacher, payload = checkpoint.load_model(cfg.at(cfg.train.distill.teacher))
    except CheckpointError as e:
        raise CheckpointError(f"train.distill.teacher: {e}") from None
    why = other_classes(payload, cfg)
    if why:
        raise CheckpointError(f"train.distill.teacher '{cfg.train.distill.teacher}': {why}")
    return teacher


def start(cfg: ExperimentConfig, ctx: RunContext):
    """The config's model, initialised from the seed (`check` has validated its spec)."""
    spec = cfg.model.spec(cfg.data.num_classes)
    seed_everything(cfg.seed)
    return build_model(spec), {"arch": spec}, None


def body(run: StageRun) -> dict[str, Any]:
    cfg, ctx, spec, model = run.cfg, run.ctx, run.spec, run.model
    loaders = run.loaders
    ctx.log(f"{spec['arch']} on {run.splits.source}: {len(run.splits.train_y)} train / {len(run.splits.test_y)} test "
            f"images, device {ctx.device}, precision {ctx.precision}")
    trainer = Trainer(model, loaders, cfg, ctx, run.out, spec, distill=teacher_loss(cfg, ctx, run.checked))
    state = trainer.fit()
    model = trainer.model

    metrics = {f"test_{k}": v for k, v in evaluate(model, loaders["test"], ctx).items()}
    if "val" in loaders:
        metrics.update({f"val_{k}": v for k, v in evaluate(model, loaders["val"], ctx).items()})
    checkpoint.save(run.out / "model.pt", {"arch": spec, "state_dict": model.state_dict(), "config": cfg.to_dict(),
                                           "metrics": metrics, "epochs_total": state.epoch})
    log_measuring(ctx, cfg)
    costs = measure(model.cpu().float().to(memory_format=torch.contiguous_format), cfg.data.image_size, cfg.measure)
    last = state.history[-1] if state.history else {}
    return {
        "row": cfg.label, "arch": spec, "epochs": state.epoch, "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch or None, "top1": metrics["test_top1"], "loss": metrics["test_loss"],
        **{k: v for k, v in metrics.items() if k.startswith("val_") and k != "val_n"},
        "train_seconds": state.train_seconds, "train_images_per_s": last.get("images_per_s"),
        **costs, "paper": dict(cfg.report.paper),
    }


def log_measuring(ctx: RunContext, cfg: ExperimentConfig) -> None:
    m = cfg.measure
    ctx.log("measuring params, MACs, bytes" + (f" and CPU latency ({m.warmup} + {m.repeats} runs at batch "
                                               f"{', '.join(map(str, m.batch_sizes))})" if m.latency else ""))


def teacher_loss(cfg: ExperimentConfig, ctx: RunContext, teacher: Optional[torch.nn.Module]):
    """The distillation loss of train.distill from its loaded `teacher`, or None."""
    if cfg.train.distill is None:
        return None
    from rescomp.compress.distill import distillation

    d = cfg.train.distill
    return distillation(teacher.to(ctx.device), d.temperature, d.alpha)


TRAIN = STAGES.register("train")(Stage(
    "train", "train", suffix=lambda cfg: "", check=check, body=body, start=start,
    output=lambda cfg, run_dir, summary: run_dir / "model.pt",
    refuses=lambda t: "train starts a chain from the config's model; it takes no network from an earlier stage "
                      "(put it first)",
    first_only=True, inputs=lambda cfg: [cfg.at(cfg.train.distill.teacher)] if cfg.train.distill else []))


def run_train(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    """`rescomp train`: the one-stage chain."""
    return execute(TRAIN, cfg, fresh=fresh, console=console)
