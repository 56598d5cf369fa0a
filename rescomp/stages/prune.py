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
import time
from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

from rescomp.compress.prune import CRITERIA, channel_groups, prunable_filters, prune, with_head
from rescomp.config import ExperimentConfig
from rescomp.data import sample_loader
from rescomp.errors import ConfigError
from rescomp.measure import count_macs, count_params, measure
from rescomp.models import build_model
from rescomp.runner import STAGES, Stage, StageRun, execute, fp32_only, start_spec
from rescomp.train import evaluate


def check(cfg: ExperimentConfig) -> tuple[dict[str, Any], int]:
    """Bad input before any work: unknown criterion or layer names, a policy that prunes nothing."""
    pc, (spec, _) = cfg.prune, start_spec(cfg, "prune")
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


def body(run: StageRun) -> dict[str, Any]:
    cfg, ctx, pc, size = run.cfg, run.ctx, run.cfg.prune, run.cfg.data.image_size
    _, base_prunable = run.checked  # counted on the network it starts from (check reads a given checkpoint's)
    model = run.model
    loaders = run.loaders
    scoring = sample_loader(run.splits, cfg.data, pc.score_batches * cfg.train.batch_size, cfg.seed, ctx.device,
                            batch_size=cfg.train.batch_size)
    lr = pc.finetune_lr or cfg.train.optimizer.lr / 10

    cpu_copy = lambda m: copy.deepcopy(m).cpu().to(memory_format=torch.contiguous_format)  # noqa: E731
    unpruned = cpu_copy(model)

    def row(m, share, step, extra) -> dict[str, Any]:
        ev = evaluate(m.to(ctx.device), loaders["test"], ctx)
        cpu = cpu_copy(m)  # `m` stays on the run's device
        # a pruned network is timed interleaved with the unpruned one: its speed-up, and whether it is noise
        return {"step": step, "share": share, "top1": ev["top1"], "loss": ev["loss"], **extra,
                **measure(cpu, size, cfg.measure, reference=unpruned if step else None), **paper_costs(cpu, cfg)}

    start, start_spec = model.to(ctx.device), run.spec
    rows = [row(start, 0.0, 0, {})]
    plan = pc.plan()
    for target, shares in plan:
        # a gradual schedule is one run whose every step is a row; a run per target (fast/slow,
        # `iterations`) starts again from the trained network and reports the row that reaches it
        base = run.out if target is None else run.out / f"to{round(100 * target):02d}"
        model, spec, previous, epochs = start, start_spec, 0.0, 0
        for step, share in enumerate(shares, start=1):
            step_epochs = pc.epochs_at(step, len(shares))
            epochs += step_epochs

            def remove(model=model, spec=spec, step=step, cut=share - previous):
                ctx.log(f"step {step}: scoring filters ({pc.criterion}, {len(scoring)} batches of training images), removing "
                        f"{100 * cut:.1f}% of the prunable filters")
                t0 = time.perf_counter()
                model, spec, info = prune(ctx.layout(model.to(ctx.device)), spec, share=cut,
                                          criterion=pc.criterion, policy=pc.policy, exclude=pc.exclude,
                                          batches=scoring, seed=cfg.seed + step, image_size=size,
                                          base_prunable=base_prunable, allocation=pc.allocation,
                                          bn_stats=pc.bn_stats, fc_scaling=pc.fc_scaling)
                return model, spec, {**info, "scoring_seconds": time.perf_counter() - t0}

            def pruned_row(m, spec, info, ev, share=share, step=step, target=target, epochs=epochs):
                return row(m, share, step, {
                    "target": target, "removed": info["removed"], "removed_coupled_channels": info["removed_coupled_channels"],
                    "finetune_epochs_total": epochs, "scoring_seconds": info["scoring_seconds"],
                    "scoring_batches": len(scoring), "scoring_images": len(scoring.y), "bn_reset": len(info["bn_reset"]), "fc_scaled": info["fc_scaled"],
                    "per_layer": info["per_layer"]})

            model, spec, r = run.step(step, remove, pruned_row, epochs=step_epochs, lr=lr, base=base)
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
    return {"arch": cfg.model.arch, "start_arch": run.spec, "criterion": pc.criterion, "policy": pc.policy, "schedule": pc.schedule,
            "bn_stats": pc.bn_stats, "fc_scaling": pc.fc_scaling, "plan": [{"target": t, "shares": s} for t, s in plan],
            "prunable_filters": base_prunable, "rows": rows}


def _output(cfg: ExperimentConfig, run_dir: Path, summary: dict[str, Any]) -> Path:
    return run_dir / f"step{summary['rows'][-1]['step']:02d}" / "model.pt"  # where it stopped (stop_at) or ended


def _leaves_one(cfg: ExperimentConfig) -> None:
    if len(cfg.prune.plan()) > 1:
        raise ConfigError(f"prune.schedule {cfg.prune.schedule} prunes each target from the trained network in a run "
                          f"of its own, so it leaves no one network for the next stage; use a gradual schedule "
                          f"(prune.schedule: custom with share_per_step and steps)")


PRUNE = STAGES.register("prune")(Stage("prune", "prune", suffix=suffix, check=check, body=body, output=_output,
                                       refuses=fp32_only("prune", retrains=True), chain_check=_leaves_one))


def run_prune(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    """`rescomp prune`: the one-stage chain."""
    return execute(PRUNE, cfg, fresh=fresh, console=console)
