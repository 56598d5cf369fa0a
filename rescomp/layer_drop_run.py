"""`rescomp layer-drop`: the residual-block-deletion loop and its baselines.

Algorithm 1 of the paper: train the gated network; then repeat {rank units by |w| (or another
criterion); delete the k lowest; retrain n epochs starting again from the initial learning rate;
evaluate} until the configured number of units is gone or top-1 falls below the full network's
(minus a tolerance). Every step writes runs/<name>-layerdrop/stepNN/ (checkpoints while it retrains,
then model.pt and row.json), so an interrupted loop resumes where it stopped, across invocations.
The baselines train each reached structure from scratch and by distillation from the full network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from rescomp import checkpoint
from rescomp.compress.distill import distillation
from rescomp.compress.layer_drop import CRITERIA, depth, drop, gates, output_norm, residual_units
from rescomp.config import ExperimentConfig, dump_config
from rescomp.context import RunContext, make_context, seed_everything
from rescomp.data import prepare, sample_loader
from rescomp.errors import ConfigError
from rescomp.measure import MeasureConfig, measure, step_times_ms
from rescomp.models import build_model
from rescomp.pipeline import (_claim_run_dir, finished_step, model_spec, open_run_dir, retrain_config, stage_suffix,
                              start_model, train_and_eval, train_loaders)
from rescomp.provenance import stamp
from rescomp.train import evaluate

# The paper's Table 2, CIFAR-10: the smallest lossless network's costs as % of the full one's.
PAPER_RELATIVE = {"macs": 60.93, "forward": 60.23, "backward": 59.71, "params": 69.82}


def check(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything about the layer-drop section that can be wrong, before any work; returns the spec."""
    ld, spec = cfg.layer_drop, model_spec(cfg)
    CRITERIA.get(ld.criterion)
    if not spec.get("gates"):
        raise ConfigError("layer-drop needs gated residual units: add `gates: {init: [-1, 1]}` under model:")
    deletable = sum(u.deletable for u in residual_units(build_model(spec)))
    if ld.max_units and ld.max_units > deletable:
        raise ConfigError(f"layer_drop.max_units={ld.max_units}, but {spec['arch']} has only {deletable} deletable units")
    if ld.k > deletable:
        raise ConfigError(f"layer_drop.k={ld.k}, but {spec['arch']} has only {deletable} deletable units")
    return spec


def _costs(model, spec, cfg: ExperimentConfig, ctx: RunContext, timing: bool) -> dict[str, Any]:
    m = cfg.measure if timing else MeasureConfig(latency=False, gpu_throughput=False)
    row = {"layers": depth(model), "units_deleted": len(spec.get("deleted", [])), **measure(model.cpu(), cfg.data.image_size, m)}
    if timing:
        t = cfg.layer_drop.timing
        row.update(step_times_ms(model, cfg.data.image_size, t.batch_size, ctx.device, runs=t.runs, warmup=t.warmup))
    return row


def run_layer_drop(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    t_start = time.perf_counter()
    ld = cfg.layer_drop
    check(cfg)
    ctx = make_context(cfg, console=console)
    out, finished = _claim_run_dir(cfg, fresh, stage="layerdrop")
    if finished is not None:
        ctx.log(f"{out} is already complete; --fresh redoes it")
        return out, finished
    full, payload, source = start_model(cfg, ctx, ld.checkpoint)  # the full gated network
    if not payload["arch"].get("gates"):
        raise ConfigError(f"'{source}' has no residual gates; train a config whose model has `gates:` first")
    open_run_dir(out)
    checkpoint.atomic_write_text(out / "config.yaml", dump_config(cfg))

    splits = prepare(cfg.data, cfg.seed)
    loaders = train_loaders(cfg, ctx, splits)
    scoring = sample_loader(splits, cfg.data, ld.score_images, cfg.seed, ctx.device)
    batches = lambda: (x for x, _ in scoring)  # noqa: E731

    full = full.to(ctx.device)
    start = evaluate(full, loaders["test"], ctx)
    stats = {"gates": gates(full), "output_norm": output_norm(full, batches(), cfg.seed)}
    rows = [{"method": "layer-drop", "step": 0, "top1": start["top1"], "loss": start["loss"],
             **_costs(full, payload["arch"], cfg, ctx, timing=True)}]
    ctx.log(f"full network: {rows[0]['layers']} layers, top-1 {start['top1']:.2f}%")

    model, spec, deleted, step = full, payload["arch"], 0, 0
    limit = ld.max_units or len(stats["gates"])
    while deleted < limit:
        step += 1
        step_dir = out / f"step{step:02d}"
        resumed = finished_step(step_dir)
        if resumed:
            model, spec, row = resumed
            model = model.to(ctx.device)
        else:
            seed_everything(cfg.seed + step)
            model, spec, info = drop(model, spec, min(ld.k, limit - deleted), ld.criterion, batches(), cfg.seed + step)
            ev = train_and_eval(model, spec, retrain_config(cfg, ld.retrain_epochs), ctx, loaders, step_dir)
            model, _ = checkpoint.load_model(step_dir / "model.pt")
            model = model.to(ctx.device)
            row = {"method": "layer-drop", "step": step, "top1": ev["top1"], "loss": ev["loss"],
                   "deleted_now": info["deleted"], **_costs(model, spec, cfg, ctx, timing=True)}
            checkpoint.atomic_write_text(step_dir / "row.json", json.dumps(row, indent=2))
        model = model.to(ctx.device)
        rows.append(row)
        deleted = row["units_deleted"]
        ctx.log(f"step {step}: deleted {', '.join(row.get('deleted_now', []))} -> {row['layers']} layers, "
                f"top-1 {row['top1']:.2f}%")
        if row["top1"] < start["top1"] - ld.tolerance and not ld.keep_going:
            break

    rows += _baselines(cfg, ctx, loaders, full, rows[1:], out)
    summary = _summary(cfg, ctx, rows, stats, start, splits.source, time.perf_counter() - t_start, str(source))
    checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return out, summary


def _baselines(cfg: ExperimentConfig, ctx: RunContext, loaders, full, steps: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    b = cfg.layer_drop.baselines
    epochs_cfg = retrain_config(cfg, b.epochs or cfg.train.epochs)
    rows = []
    for r in steps:
        step_model, payload = checkpoint.load_model(out / f"step{r['step']:02d}" / "model.pt")
        plain = {k: v for k, v in payload["arch"].items() if k != "gates"}  # the same structure, plain x + F(x)
        for method, enabled in (("scratch", b.scratch), ("distill", b.distill)):
            if not enabled:
                continue
            seed_everything(cfg.seed)
            kd = distillation(full.to(ctx.device), b.temperature, b.alpha) if method == "distill" else None
            ev = train_and_eval(build_model(plain), plain, epochs_cfg, ctx, loaders, out / f"{method}-{r['layers']}", kd)
            rows.append({"method": method, "step": r["step"], "top1": ev["top1"], "loss": ev["loss"],
                         **_costs(build_model(plain), plain, cfg, ctx, timing=False)})
            ctx.log(f"{method} at {r['layers']} layers: top-1 {ev['top1']:.2f}%")
    return rows


def smallest_lossless(method_rows: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """The paper's stop rule: the last network before the first deletion step whose top-1 fell below
    `floor`. Steps traced past that drop (`keep_going`) can climb back above it, but they do not count:
    the method would have stopped there."""
    smallest = method_rows[0]
    for r in method_rows[1:]:
        if r["top1"] < floor:
            break
        smallest = r
    return smallest


def _summary(cfg: ExperimentConfig, ctx: RunContext, rows: list[dict[str, Any]], stats: dict[str, Any],
             start: dict[str, float], data_source: str, wall: float, source: str) -> dict[str, Any]:
    ld = cfg.layer_drop
    series = f"{ld.criterion}, k={ld.k}, n={ld.retrain_epochs}"
    label = {"layer-drop": series, "scratch": "from scratch", "distill": "distillation"}
    for r in rows:
        r["series"] = label[r["method"]]
        r["row"] = f"{label[r['method']]}: {r['layers']} layers"
    method_rows = [r for r in rows if r["method"] == "layer-drop"]
    full = method_rows[0]
    smallest = smallest_lossless(method_rows, start["top1"] - ld.tolerance)
    tb = ld.timing.batch_size
    relative = {
        "macs": 100 * smallest["macs"] / full["macs"],
        "forward": 100 * smallest[f"forward_ms_b{tb}"] / full[f"forward_ms_b{tb}"],
        "backward": 100 * smallest[f"backward_ms_b{tb}"] / full[f"backward_ms_b{tb}"],
        "params": 100 * smallest["params"] / full["params"],
    }
    md = [f"Smallest network with top-1 >= the full network's ({start['top1']:.2f}%"
          + (f" - {ld.tolerance}" if ld.tolerance else "") + f"): **{smallest['layers']} layers** "
          f"({100 * (1 - smallest['layers'] / full['layers']):.2f}% of the {full['layers']} layers removed), "
          f"top-1 {smallest['top1']:.2f}%. Its costs relative to the full network (forward/backward: mean of "
          f"{ld.timing.runs} training steps at batch {tb} on {ctx.device.type}):", "",
          "| cost | ours % | paper % (CIFAR-10) | Δ |", "|---|---|---|---|"]
    md += [f"| {k} | {v:.2f} | {PAPER_RELATIVE[k]:.2f} | {v - PAPER_RELATIVE[k]:+.2f} |" for k, v in relative.items()]
    return {
        "stage": "layerdrop", "name": f"{cfg.run_name}-{stage_suffix(cfg, 'layerdrop')}", "table": cfg.report.table, "dataset": cfg.data.dataset,
        "profile": cfg.profile, "arch": cfg.model.arch, "seed": cfg.seed, "config_hash": cfg.hash("layer_drop"),
        "source": source, "criterion": ld.criterion, "k": ld.k, "retrain_epochs": ld.retrain_epochs,
        "start_top1": start["top1"], "smallest_lossless": {"layers": smallest["layers"], "top1": smallest["top1"]},
        "rows": rows, "full_stats": stats, "relative_smallest_lossless": relative,
        "sections": [{"title": f"Cost of the smallest lossless network (paper Table 2): {series}", "markdown": "\n".join(md)}],
        "data_source": data_source, "wall_seconds": wall, **stamp(ctx.device),
    }
