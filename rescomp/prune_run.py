"""`rescomp prune`: repeat {score filters; remove the lowest-ranked share; fine-tune; measure}.

The share of each step is counted over the filters the policy allows at the start (paper: 5 % per
step, 6 steps, about 30 %). Each step is a resumable folder runs/<name>-prune-.../stepNN/ holding
its fine-tuning checkpoints, the pruned model.pt (spec with `shapes`, so it reloads as a plain
network) and its row. The row records the scoring cost (seconds and batches), the filters removed,
the fine-tuning epochs so far and the surgery done (BNs reset, linear layers scaled).
A schedule that reaches each target share in its own run from the trained network (Martineau's
Table 1: `fast` in 2 iterations, `slow` in 10) keeps each run in runs/<name>-prune-.../toNN/stepNN/
and reports the row of its last step.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

from rescomp import checkpoint
from rescomp.compress.prune import CRITERIA, channel_groups, prunable_filters, prune, with_head
from rescomp.config import ExperimentConfig
from rescomp.context import make_context, seed_everything
from rescomp.data import prepare, sample_loader
from rescomp.errors import ConfigError
from rescomp.measure import count_macs, count_params, measure
from rescomp.models import build_model
from rescomp.pipeline import (_claim_run_dir, finished_step, model_spec, retrain_config, start_model, train_and_eval,
                              train_loaders, writing)
from rescomp.provenance import stamp
from rescomp.train import evaluate


def check(cfg: ExperimentConfig) -> tuple[dict[str, Any], int]:
    """Bad input before any work: unknown criterion or layer names, a policy that prunes nothing."""
    pc, spec = cfg.prune, model_spec(cfg)
    CRITERIA.get(pc.criterion)
    model = build_model(spec)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for pattern in pc.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in convs):
            raise ConfigError(f"prune.exclude: no conv layer is named like '{pattern}'; conv layers: "
                              f"{', '.join(convs[:12])}{', ...' if len(convs) > 12 else ''}")
    groups = channel_groups(model, torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size), pc.exclude, pc.policy)
    prunable = prunable_filters(groups)
    if sum(g.size for g in groups) <= len(groups):
        raise ConfigError(f"policy '{pc.policy}' leaves nothing prunable in {spec['arch']}"
                          f"{' (excluded: ' + ', '.join(pc.exclude) + ')' if pc.exclude else ''}; "
                          f"try prune.policy=coupled or exclude fewer layers")
    return spec, prunable


def suffix(cfg: ExperimentConfig) -> str:
    pc = cfg.prune
    return f"prune-{pc.policy}-{pc.criterion}-{pc.schedule if pc.schedule != 'custom' else 'custom'}"


def series_label(pc) -> str:
    """What ran, as the table names it: criterion, policy, schedule, and any surgery not the paper's."""
    parts = [pc.criterion, pc.policy] + ([pc.schedule] if pc.schedule != "custom" else [])
    parts += (["BN statistics sliced"] if pc.bn_stats == "slice" else []) + (["FC unscaled"] if not pc.fc_scaling else [])
    return ", ".join(parts)


def paper_costs(model: torch.nn.Module, cfg: ExperimentConfig) -> dict[str, Any]:
    """The costs measured the way the paper counted them (report.paper_input / paper_head): a pruned
    layer's size does not depend on the input size, so the network pruned at 32 px is counted at 224."""
    rc = cfg.report
    if not (rc.paper_input or rc.paper_head):
        return {}
    size, head = rc.paper_input or cfg.data.image_size, rc.paper_head or cfg.data.num_classes
    m = with_head(model, head, cfg.data.image_size)
    return {"paper_input": size, "paper_head": head, "macs_paper_input": count_macs(m, size),
            "params_paper_head": count_params(m)}


def run_prune(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    t_start = time.perf_counter()
    pc = cfg.prune
    ctx = make_context(cfg, console=console)  # a device that is not there is named first
    _, base_prunable = check(cfg)
    splits = prepare(cfg.data, cfg.seed)
    out, finished = _claim_run_dir(cfg, fresh, stage=suffix(cfg), section="prune")
    if finished is not None:
        ctx.log(f"{out} is already complete; --fresh redoes it")
        return out, finished
    model, payload, source = start_model(cfg, ctx, pc.checkpoint)
    if pc.checkpoint:  # another network than the config's (a chain's, a shortened one): shares count its filters
        example = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
        base_prunable = prunable_filters(channel_groups(model, example, pc.exclude, pc.policy))
    with writing(out, cfg):
        return _prune(cfg, ctx, splits, out, model, payload, source, base_prunable, t_start)


def _prune(cfg: ExperimentConfig, ctx, splits, out: Path, model, payload, source: Path, base_prunable: int,
           t_start: float) -> tuple[Path, dict[str, Any]]:
    pc = cfg.prune
    loaders = train_loaders(cfg, ctx, splits)
    scoring = sample_loader(splits, cfg.data, pc.score_batches * cfg.train.batch_size, cfg.seed, ctx.device,
                            batch_size=cfg.train.batch_size)
    lr = pc.finetune_lr or cfg.train.optimizer.lr / 10
    size = cfg.data.image_size

    cpu_copy = lambda m: copy.deepcopy(m).cpu().to(memory_format=torch.contiguous_format)  # noqa: E731
    unpruned = cpu_copy(model)

    def row(m, share, step, extra) -> dict[str, Any]:
        ev = evaluate(m.to(ctx.device), loaders["test"], ctx)
        cpu = cpu_copy(m)  # `m` stays on the run's device
        # a pruned network is timed interleaved with the unpruned one: its speed-up, and whether it is noise
        return {"step": step, "share": share, "top1": ev["top1"], "loss": ev["loss"], **extra,
                **measure(cpu, size, cfg.measure, reference=unpruned if step else None), **paper_costs(cpu, cfg)}

    start, start_spec = model.to(ctx.device), payload["arch"]
    rows = [row(start, 0.0, 0, {})]
    plan = pc.plan()
    for target, shares in plan:
        # a gradual schedule is one run whose every step is a row; a run per target (fast/slow,
        # `iterations`) starts again from the trained network and reports the row that reaches it
        base = out if target is None else out / f"to{round(100 * target):02d}"
        model, spec, previous, epochs = start, start_spec, 0.0, 0
        for step, share in enumerate(shares, start=1):
            step_dir = base / f"step{step:02d}"
            step_epochs = pc.epochs_at(step, len(shares))
            epochs += step_epochs
            done = finished_step(step_dir)
            if done:
                model, spec, r = done
            else:
                seed_everything(cfg.seed + step)
                ctx.log(f"step {step}: scoring filters ({pc.criterion}, {pc.score_batches} batches), removing "
                        f"{100 * (share - previous):.1f}% of the prunable filters")
                t0 = time.perf_counter()
                model, spec, info = prune(ctx.layout(model.to(ctx.device)), spec, share=share - previous,
                                          criterion=pc.criterion, policy=pc.policy, exclude=pc.exclude,
                                          batches=scoring, seed=cfg.seed + step, image_size=size,
                                          base_prunable=base_prunable, allocation=pc.allocation,
                                          bn_stats=pc.bn_stats, fc_scaling=pc.fc_scaling)
                scoring_s = time.perf_counter() - t0
                train_and_eval(model, spec, retrain_config(cfg, step_epochs, lr), ctx, loaders, step_dir)
                model, _ = checkpoint.load_model(step_dir / "model.pt")
                r = row(model, share, step, {
                    "target": target, "removed": info["removed"], "removed_coupled_channels": info["removed_coupled_channels"],
                    "finetune_epochs_total": epochs, "scoring_seconds": scoring_s, "scoring_batches": pc.score_batches,
                    "bn_reset": len(info["bn_reset"]), "fc_scaled": info["fc_scaled"], "per_layer": info["per_layer"]})
                checkpoint.atomic_write_text(step_dir / "row.json", json.dumps(r, indent=2))
            model = model.to(ctx.device)
            previous = share
            ctx.log(f"{'' if target is None else f'to {100 * target:.0f}%: '}step {step}: {100 * share:.1f}% of "
                    f"prunable filters removed -> params {r['params']:,}, MACs {r['macs'] / 1e6:.1f} M, top-1 {r['top1']:.2f}%")
            if target is None or step == len(shares):
                rows.append(r)
            stop = pc.stop_at
            if (stop.params and r["params"] <= stop.params * rows[0]["params"]) or (stop.macs and r["macs"] <= stop.macs * rows[0]["macs"]):
                break

    series = series_label(pc)
    for r in rows:
        r.update(series=series, row=f"{cfg.report.row or cfg.model.arch} {series} {100 * r['share']:.0f}%")
        r["paper"] = cfg.report.paper_by_schedule.get(pc.schedule, cfg.report.paper_by_share).get(f"{r['share']:g}", {})
    summary = {
        "stage": "prune", "name": f"{cfg.run_name}-{suffix(cfg)}", "table": cfg.report.table, "dataset": cfg.data.dataset,
        "profile": cfg.profile, "arch": cfg.model.arch, "seed": cfg.seed, "config_hash": cfg.hash("prune"),
        "source": str(source), "criterion": pc.criterion, "policy": pc.policy, "schedule": pc.schedule,
        "bn_stats": pc.bn_stats, "fc_scaling": pc.fc_scaling, "plan": [{"target": t, "shares": s} for t, s in plan],
        "prunable_filters": base_prunable, "rows": rows,
        **splits.stamp(), "wall_seconds": time.perf_counter() - t_start, **stamp(ctx.device),
    }
    checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return out, summary
