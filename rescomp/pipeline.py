"""Runs an experiment: check everything, then data + model -> train -> evaluate -> measure -> summary.

Every user mistake is caught before the run folder is created, so bad input leaves nothing behind.
An interrupted run resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from rich.console import Console

from rescomp import checkpoint
from rescomp.config import ExperimentConfig, dump_config, validate
from rescomp.context import RunContext, make_context, seed_everything
from rescomp.data import make_loaders, prepare
from rescomp.errors import ConfigError
from rescomp.measure import measure
from rescomp.models import build_model, check_spec, get_entry
from rescomp.provenance import stamp
from rescomp.train import Trainer, evaluate


def model_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    """The validated arch spec of the config's model, or ConfigError."""
    spec = cfg.model.spec(cfg.data.num_classes)
    check_spec(spec)
    entry = get_entry(spec["arch"])
    if cfg.data.image_size < entry.min_input:
        raise ConfigError(
            f"model '{spec['arch']}' needs inputs of at least {entry.min_input} pixels but data.image_size is "
            f"{cfg.data.image_size}; raise data.image_size"
        )
    return spec


def _claim_run_dir(cfg: ExperimentConfig, fresh: bool) -> tuple[Path, Optional[dict[str, Any]]]:
    """The run folder, after checking that it is ours to write; and its summary if the run is complete."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    saved = run_dir / "config.yaml"
    if not run_dir.exists():
        return run_dir, None
    if fresh:
        if saved.is_file() or not any(run_dir.iterdir()):
            shutil.rmtree(run_dir)
            return run_dir, None
        raise ConfigError(f"--fresh would delete '{run_dir}', which is not a rescomp run folder; choose another name")
    if saved.is_file():
        old = validate(yaml.safe_load(saved.read_text()) or {}, str(saved))
        if old.hash() != cfg.hash():
            raise ConfigError(
                f"'{run_dir}' holds a run of a different config; re-run with --fresh to replace it, or "
                f"--set name=<new name> to keep both"
            )
    summary = run_dir / "summary.json"
    return run_dir, (json.loads(summary.read_text()) if summary.is_file() else None)


def run_train(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    t_start = time.perf_counter()
    spec = model_spec(cfg)
    ctx = make_context(cfg, console=console)
    splits = prepare(cfg.data, cfg.seed)
    run_dir, done = _claim_run_dir(cfg, fresh)
    if done is not None:
        ctx.log(f"{run_dir} is already complete; --fresh retrains it")
        return run_dir, done
    ctx.run_dir = run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    seed_everything(cfg.seed)
    model = build_model(spec)
    loaders = make_loaders(splits, cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                           device=ctx.device, seed=cfg.seed, channels_last=ctx.channels_last,
                           max_steps=cfg.train.max_steps_per_epoch)
    ctx.log(f"{spec['arch']} on {splits.source}: {len(splits.train_y)} train / {len(splits.test_y)} test images, "
            f"device {ctx.device}, precision {ctx.precision}")
    trainer = Trainer(model, loaders, cfg, ctx, run_dir, spec)
    state = trainer.fit()
    model = trainer.model

    metrics = {f"test_{k}": v for k, v in evaluate(model, loaders["test"], ctx).items()}
    if "val" in loaders:
        metrics.update({f"val_{k}": v for k, v in evaluate(model, loaders["val"], ctx).items()})
    checkpoint.save(run_dir / "model.pt", {"arch": spec, "state_dict": model.state_dict(), "config": cfg.to_dict(),
                                           "metrics": metrics})
    costs = measure(model.cpu().float().to(memory_format=torch.contiguous_format), cfg.data.image_size, cfg.measure)
    summary = build_summary(cfg, ctx, spec, state, metrics, costs, time.perf_counter() - t_start, splits.source)
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return run_dir, summary


def build_summary(cfg: ExperimentConfig, ctx: RunContext, spec: dict[str, Any], state, metrics: dict[str, Any],
                  costs: dict[str, Any], wall_seconds: float, data_source: str) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    return {
        "name": cfg.run_name,
        "table": cfg.report.table,
        "row": cfg.report.row or cfg.run_name,
        "arch": spec,
        "dataset": cfg.data.dataset,
        "data_source": data_source,
        "seed": cfg.seed,
        "config_hash": cfg.hash(),
        "epochs": state.epoch,
        "stopped_early": state.stopped_early,
        "best_epoch": state.best_epoch or None,
        "top1": metrics["test_top1"],
        "loss": metrics["test_loss"],
        **{k: v for k, v in metrics.items() if k.startswith("val_") and k != "val_n"},
        "train_seconds": state.train_seconds,
        "train_images_per_s": last.get("images_per_s"),
        **costs,
        "wall_seconds": wall_seconds,
        "paper": dict(cfg.report.paper),
        **stamp(ctx.device),
    }
