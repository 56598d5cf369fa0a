"""`rescomp layer-drop`: the residual-block-deletion loop and its baselines.

Algorithm 1 of the paper: train the gated network; then repeat {rank units by |w| (or another
criterion); delete the k lowest; retrain n epochs starting again from the initial learning rate;
evaluate} until the configured number of units is gone or top-1 falls below the full network's
(minus a tolerance): the test top-1, as the paper, or (`stop_on: val`) a held-out validation split's.
Every step writes runs/<name>-layerdrop/stepNN/ (checkpoints while it retrains, then model.pt and
row.json), so an interrupted loop resumes where it stopped, across invocations.
The baselines are the paper's Figure 3 comparison (section 4.2.2): regular ResNets of the same family
with 6, 5, ..., 1 units per stage (56 ... 11 layers), trained from scratch and by distillation from the
full network; or (`structure: reached`) the irregular structures the loop reached, trained anew. Every
row carries `epochs`, what its network was trained in all, so rows of unequal budgets can be told apart.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from rescomp import checkpoint
from rescomp.compress.distill import distillation
from rescomp.compress.layer_drop import CRITERIA, depth, drop, gates, output_norm, residual_units
from rescomp.config import ExperimentConfig
from rescomp.context import RunContext, seed_everything
from rescomp.data import sample_loader
from rescomp.errors import CheckpointError, ConfigError
from rescomp.measure import MeasureConfig, measure, step_times_ms
from rescomp.models import build_model
from rescomp.models.cifar_resnet import regular_spec
from rescomp.rundir import lineage
from rescomp.runner import (STAGES, Stage, StageRun, epochs_trained, execute, fp32_only, retrain_config, start_spec,
                            train_and_eval)
from rescomp.train import evaluate

def check(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything about the layer-drop section that can be wrong, before any work; returns the spec."""
    ld, (spec, given) = cfg.layer_drop, start_spec(cfg, "layer_drop")
    CRITERIA.get(ld.criterion)
    if not spec.get("gates"):
        raise ConfigError(f"layer_drop.checkpoint '{given}' has no residual gates; give a network trained "
                          f"with `gates: true` under model:" if given else
                          "layer-drop needs gated residual units: add `gates: {init: [-1, 1]}` under model:")
    deletable = sum(u.deletable for u in residual_units(build_model(spec)))
    if ld.max_units and ld.max_units > deletable:
        raise ConfigError(f"layer_drop.max_units={ld.max_units}, but {spec['arch']} has only {deletable} deletable units")
    if ld.k > deletable:
        raise ConfigError(f"layer_drop.k={ld.k}, but {spec['arch']} has only {deletable} deletable units")
    if given and (payload := checkpoint.peek(cfg.at(given))) is not None and epochs_trained(payload, cfg.at(given)) is None:
        raise ConfigError(f"layer_drop.checkpoint '{given}' does not say how many epochs it was trained in all (a "
                          f"later stage's network saved before rescomp recorded it), which the epochs column and "
                          f"matched baselines need; re-make it with its stage's --fresh, or start from its training run")
    if ld.stop_on == "val" and cfg.data.val_fraction <= 0:
        raise ConfigError("layer_drop.stop_on=val needs a validation split to judge deletions on: set "
                          "data.val_fraction (e.g. 0.1, the share of the training images held out), or stop_on: test")
    baseline_family(cfg, spec)
    return spec


def check_input(cfg: ExperimentConfig) -> Optional[dict[str, Any]]:
    """With stop_on: val, a given network (layer_drop.checkpoint) and every network it was made from must
    have been trained with this run's validation split held out, or the split would judge it on images it
    learned: the split is drawn from the seed and data.val_fraction, so each one's recorded config must have
    the same dataset, seed and fraction (and synthetic data the same images). Its lineage is followed through
    the run folders that made it (rundir.lineage); one that cannot be followed is refused too. Returns the
    given network's payload (Stage.check_source judges it without reading it again)."""
    ld = cfg.layer_drop
    if ld.stop_on != "val" or not ld.checkpoint:
        return None
    given = cfg.at(ld.checkpoint)
    payload = checkpoint.load(given, mmap=True)
    ours = split_of(cfg.to_dict())
    chain = lineage(given)
    if chain is None:
        raise ConfigError(f"layer_drop.stop_on=val: cannot trace how '{ld.checkpoint}' was made (no record of its "
                          f"inputs beside it), so not whether it learned the validation images; give a network made "
                          f"under this config's data and seed in this project, or use stop_on: test")
    for p in chain:
        try:
            theirs = split_of((payload if p == given else checkpoint.load(p, mmap=True)).get("config") or {})
        except CheckpointError as e:  # an ancestor gone or broken since
            raise ConfigError(f"layer_drop.stop_on=val: cannot read '{p}', which '{ld.checkpoint}' was made from, "
                              f"to see whether it learned the validation images ({e}); use stop_on: test") from None
        if theirs != ours:
            made = "it was" if p == given else f"'{p}', which it was made from, was"
            raise ConfigError(
                f"layer_drop.stop_on=val: {made} not trained with this run's validation split held out (dataset, "
                f"seed, data.val_fraction: {', '.join(map(str, theirs[:3]))}; this run: "
                f"{', '.join(map(str, ours[:3]))}), so it may have learned the images that would judge it; give a "
                f"network made under this config's data and seed, or use stop_on: test")
    return payload


def split_of(config: dict[str, Any]) -> tuple:
    """What decides a run's validation split, from its config as a checkpoint records it: the dataset, the
    seed, the fraction held out and, for synthetic data, its images."""
    data = config.get("data") or {}
    return (data.get("dataset"), config.get("seed"), data.get("val_fraction"),
            data.get("synthetic") if data.get("dataset") == "synthetic" else None)


def baseline_family(cfg: ExperimentConfig, spec: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The regular networks of `spec`'s family the baselines compare against (layers -> spec), all
    of them, not only the configured depths; {} unless regular baselines are on. ConfigError if none."""
    b = cfg.layer_drop.baselines
    if not (b.scratch or b.distill):
        return {}
    if b.structure == "reached":
        if b.depths:
            raise ConfigError("layer_drop.baselines.depths applies to regular baselines only; with structure: reached "
                              "the baselines follow the depths the loop reaches")
        return {}
    try:
        family = regular_baselines(spec)
    except ConfigError as e:
        raise ConfigError(f"layer_drop.baselines.structure=regular: {e}; set layer_drop.baselines.structure: "
                          f"reached, or scratch and distill to false") from None
    bad = [d for d in b.depths or [] if d not in family]
    if bad:
        raise ConfigError(f"layer_drop.baselines.depths: {', '.join(map(str, bad))} is no depth of the regular "
                          f"{spec['arch']} family; valid: {', '.join(map(str, family))}")
    return family


def regular_baselines(spec: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Layers -> spec of each regular network of the run's family no deeper than it, deepest first
    (paper 4.2.2: "the residual network varying the number of network layers from 56 to 11")."""
    plain = {k: v for k, v in spec.items() if k not in ("gates", "deleted")}
    model = build_model(plain)
    most = max(Counter(u.stage for u in residual_units(model)).values())
    family = {}
    for units in range(most, 0, -1):
        s = regular_spec(plain, units)
        if (d := depth(build_model(s))) <= depth(model):
            family[d] = s
    return family


def judged(stop_on: str) -> str:
    """The row key the stop rule reads: test top-1 (the paper's), or the validation split's."""
    return {"test": "top1", "val": "val_top1"}[stop_on]


def method_epochs(full_epochs: int, units_deleted: int, k: int, n: int) -> int:
    """Epochs a layer-drop network with `units_deleted` units gone was trained in all: the full network's,
    then n after each of the ceil(units_deleted / k) deletion steps that took it there."""
    return full_epochs + n * math.ceil(units_deleted / k)


def _costs(model, spec, cfg: ExperimentConfig, ctx: RunContext, timing: bool, full=None) -> dict[str, Any]:
    """Cost columns, measured on a CPU copy: `model` stays on its device, where the next step scores it.
    With the `full` network, a shortened one is timed interleaved with it (its speed-up, and the
    reference_* times its relative costs divide by)."""
    m = cfg.measure if timing else MeasureConfig(latency=False, gpu_throughput=False)
    row = {"layers": depth(model), "units_deleted": len(spec.get("deleted", [])),
           "units_per_stage": list(Counter(u.stage for u in residual_units(model)).values()),
           **measure(copy.deepcopy(model).cpu(), cfg.data.image_size, m,
                     reference=None if full is None else copy.deepcopy(full).cpu())}
    if timing:
        t = cfg.layer_drop.timing
        ctx.log(f"timing {t.warmup} + {t.runs} training steps at batch {t.batch_size} on {ctx.device.type} "
                f"({row['layers']} layers" + (", interleaved with the full network)" if full is not None else ")"))
        row.update(step_times_ms(model, cfg.data.image_size, t.batch_size, ctx.device, runs=t.runs, warmup=t.warmup,
                                 reference=full, threads=m.threads))
    return row


def body(run: StageRun) -> dict[str, Any]:
    cfg, ctx, ld, full = run.cfg, run.ctx, run.cfg.layer_drop, run.model  # the full gated network
    if not run.spec.get("gates"):
        raise ConfigError(f"'{run.source}' has no residual gates; train a config whose model has `gates:` first")
    family = baseline_family(cfg, run.spec)  # of the network actually loaded
    full_epochs = run.trained  # check() refused a network that does not say

    loaders = run.loaders
    scoring = sample_loader(run.splits, cfg.data, ld.score_images, cfg.seed, ctx.device)
    batches = lambda: (x for x, _ in scoring)  # noqa: E731

    def val(m) -> dict[str, float]:  # a row's validation metrics, where the stop rule is judged on them
        if ld.stop_on != "val":
            return {}
        return {f"val_{k}": v for k, v in evaluate(m, loaders["val"], ctx).items() if k in ("top1", "loss")}

    key = judged(ld.stop_on)
    full = full.to(ctx.device)
    start = evaluate(full, loaders["test"], ctx)
    stats = {"gates": gates(full), "output_norm": output_norm(full, batches(), cfg.seed)}
    rows = [{"method": "layer-drop", "step": 0, "epochs": full_epochs, "top1": start["top1"], "loss": start["loss"],
             **val(full), **_costs(full, run.spec, cfg, ctx, timing=True)}]
    ctx.log(f"full network: {rows[0]['layers']} layers, top-1 {start['top1']:.2f}%"
            + (f", validation top-1 {rows[0]['val_top1']:.2f}%" if key != "top1" else ""))

    model, spec, deleted, step = full, run.spec, 0, 0
    limit = ld.max_units or len(stats["gates"])
    while deleted < limit:
        step += 1

        def delete(model=model, spec=spec, step=step, k=min(ld.k, limit - deleted)):
            return drop(model, spec, k, ld.criterion, batches(), cfg.seed + step)

        def deleted_row(m, spec, info, ev, step=step):
            return {"method": "layer-drop", "step": step, "epochs": full_epochs + step * ld.retrain_epochs,
                    "top1": ev["top1"], "loss": ev["loss"], **val(m), "deleted_now": info["deleted"],
                    **_costs(m, spec, cfg, ctx, timing=True, full=full)}

        model, spec, row = run.step(step, delete, deleted_row, epochs=ld.retrain_epochs)
        rows.append(row)
        deleted = row["units_deleted"]
        ctx.log(f"step {step}: deleted {', '.join(row.get('deleted_now', []))} -> {row['layers']} layers, "
                f"top-1 {row['top1']:.2f}%" + (f", validation top-1 {row['val_top1']:.2f}%" if key != "top1" else ""))
        if row[key] < rows[0][key] - ld.tolerance and not ld.keep_going:
            break

    rows += _baselines(cfg, ctx, loaders, full, family, full_epochs, rows[1:], run.out)
    return {**_summary(cfg, ctx, rows, stats, start, run.splits.stamp(), full_epochs, family), "start_arch": run.spec}


def _baselines(cfg: ExperimentConfig, ctx: RunContext, loaders, full, family: dict[int, dict[str, Any]],
               full_epochs: int, steps: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The comparison networks, each trained from scratch and distilled from the full network with the
    same seed (so the same initial weights), for the configured budget."""
    ld, b = cfg.layer_drop, cfg.layer_drop.baselines
    methods = [m for m, on in (("scratch", b.scratch), ("distill", b.distill)) if on]
    if not methods:
        return []
    if b.structure == "regular":
        nets = [(f"regular-{d}", s, None) for d, s in family.items() if not b.depths or d in b.depths]
    else:  # the same structure as each step's network, plain x + F(x)
        arch = lambda r: checkpoint.load(out / f"step{r['step']:02d}" / "model.pt", mmap=True)["arch"]  # noqa: E731
        nets = [(str(r["layers"]), ungated(arch(r)), r["step"]) for r in steps]
    teacher = distillation(copy.deepcopy(full).to(ctx.device), b.temperature, b.alpha) if b.distill else None
    units = len(residual_units(full))
    rows = []
    for tag, spec, step in nets:
        removed = units - len(residual_units(build_model(spec)))
        epochs = (method_epochs(full_epochs, removed, ld.k, ld.retrain_epochs) if b.epochs == "matched"
                  else b.epochs or cfg.train.epochs)
        for method in methods:
            seed_everything(cfg.seed)
            ev = train_and_eval(build_model(spec), spec, retrain_config(cfg, epochs), ctx, loaders,
                                out / f"{method}-{tag}", teacher if method == "distill" else None)
            rows.append({"method": method, "structure": b.structure, "step": step, "epochs": epochs,
                         "top1": ev["top1"], "loss": ev["loss"], **_costs(build_model(spec), spec, cfg, ctx, timing=False),
                         "units_deleted": removed})
            ctx.log(f"{b.structure} {method} at {rows[-1]['layers']} layers, {epochs} epochs: top-1 {ev['top1']:.2f}%")
    return rows


def ungated(spec: dict[str, Any]) -> dict[str, Any]:
    """The plain x + F(x) network of spec's structure: without its gates, and a pruned layer a gate wrapped
    (recorded as <unit>.bn2.inner) recorded as that layer (a pruned network's reached baselines failed
    after the whole deletion loop: 'BatchNorm2d has no attribute inner')."""
    out = {k: v for k, v in spec.items() if k != "gates"}
    if "shapes" in out:
        out["shapes"] = {k.removesuffix(".inner"): v for k, v in out["shapes"].items()}
    return out


def smallest_lossless(method_rows: list[dict[str, Any]], tolerance: float, key: str = "top1") -> dict[str, Any]:
    """The paper's stop rule: the last network before the first deletion step whose `key` (test top-1, or
    the validation split's) fell below the full network's (method_rows[0]) minus `tolerance`. Steps traced
    past that drop (`keep_going`) can climb back above it, but they do not count: the method would have
    stopped there."""
    smallest, floor = method_rows[0], method_rows[0][key] - tolerance
    for r in method_rows[1:]:
        if r[key] < floor:
            break
        smallest = r
    return smallest


def _summary(cfg: ExperimentConfig, ctx: RunContext, rows: list[dict[str, Any]], stats: dict[str, Any],
             start: dict[str, float], data: dict[str, Any], full_epochs: int,
             family: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ld = cfg.layer_drop
    series = f"{ld.criterion}, k={ld.k}, n={ld.retrain_epochs}"
    kind = {"regular": "regular ResNet", "reached": "same structure"}
    for r in rows:
        r["series"] = series if r["method"] == "layer-drop" else \
            f"{kind[r['structure']]}, {'from scratch' if r['method'] == 'scratch' else 'distilled'}"
        r["row"] = f"{r['series']}: {r['layers']} layers"
    method_rows = [r for r in rows if r["method"] == "layer-drop"]
    full, key = method_rows[0], judged(ld.stop_on)
    smallest = smallest_lossless(method_rows, ld.tolerance, key)
    tb = ld.timing.batch_size
    relative = {
        "macs": 100 * smallest["macs"] / full["macs"],
        # over the full network's times taken beside the smallest one's (interleaved), where there are any
        **{k: 100 * smallest[f"{k}_ms_b{tb}"] / smallest.get(f"reference_{k}_ms_b{tb}", full[f"{k}_ms_b{tb}"])
           for k in ("forward", "backward")},
        "params": 100 * smallest["params"] / full["params"],
    }
    on = "top-1" if key == "top1" else f"validation top-1 (on {data['val_images']:,} held-out training images)"
    md = [f"Smallest network with {on} >= the full network's ({full[key]:.2f}%"
          + (f" - {ld.tolerance}" if ld.tolerance else "") + f"): **{smallest['layers']} layers** "
          f"({100 * (1 - smallest['layers'] / full['layers']):.2f}% of the {full['layers']} layers removed), "
          + (f"validation top-1 {smallest['val_top1']:.2f}%, test " if key != "top1" else "")
          + f"top-1 {smallest['top1']:.2f}%. Its costs relative to the full network (forward/backward: mean of "
          f"{ld.timing.runs} training steps at batch {tb} on {ctx.device.type}):", ""]
    paper = cfg.report.paper_relative  # only where the config says which paper numbers apply
    if paper:
        md += ["| cost | ours % | paper % | Δ |", "|---|---|---|---|"]
        md += [f"| {k} | {v:.2f} | " + (f"{paper[k]:.2f} | {v - paper[k]:+.2f} |" if k in paper else "– | – |")
               for k, v in relative.items()]
    else:
        md += ["| cost | % of the full network |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in relative.items()]
    if ld.timing.runs < 100:
        md += ["", f"Only {ld.timing.runs} training steps were timed (the paper: 100), so the forward and backward "
                   f"percentages carry the machine's noise: read them to within tens of percent."]
    md += ["", f"Training budget (the epochs column): the full network {full_epochs} epochs, then n = {ld.retrain_epochs} "
               f"after each step of k = {ld.k} units, from the initial learning rate: the network after step s was "
               f"trained {full_epochs} + s x {ld.retrain_epochs} epochs in all."]
    sections = [{"title": f"Cost of the smallest lossless network (paper Table 2): {series}", "markdown": "\n".join(md)}]
    if len(method_rows) < len(rows):
        sections.append({"title": f"Layer-drop against the baselines, and training budgets (paper Figure 3): {series}",
                         "markdown": _notes(cfg, rows, start, data, full_epochs, list(family))})
    return {
        "stage": "layerdrop", "arch": cfg.model.arch, "criterion": ld.criterion, "k": ld.k, "retrain_epochs": ld.retrain_epochs,
        "full_epochs": full_epochs, "baselines": ld.baselines.model_dump(),
        "start_top1": start["top1"], "stop_on": ld.stop_on,
        "smallest_lossless": {"layers": smallest["layers"], "top1": smallest["top1"],
                              **({key: smallest[key]} if key != "top1" else {})},
        "rows": rows, "full_stats": stats, "relative_smallest_lossless": relative,
        "paper_relative": dict(cfg.report.paper_relative), "sections": sections,
    }


def _notes(cfg: ExperimentConfig, rows: list[dict[str, Any]], start: dict[str, float], data: dict[str, Any],
           full_epochs: int, family: list[int]) -> str:
    """Figure 3 as a table (top-1 and budget of every series at every depth), how each series was
    trained, and what the rows can and cannot show."""
    ld, b = cfg.layer_drop, cfg.layer_drop.baselines
    names = list(dict.fromkeys(r["series"] for r in rows))
    cell = {(r["series"], r["layers"]): f"{r['top1']:.2f} ({r['epochs']})" for r in rows}
    depths = sorted({r["layers"] for r in rows}, reverse=True)
    md = ["Top-1 % at each depth, with the epochs that network was trained in all in brackets:", "",
          "| layers | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {d} | " + " | ".join(cell.get((n, d), "–") for n in names) + " |" for d in depths]
    base = [r for r in rows if r["method"] != "layer-drop"]
    trace = [r["epochs"] for r in rows if r["method"] == "layer-drop"]
    if b.structure == "regular":
        trained = sorted({r["layers"] for r in base}, reverse=True)
        left = [d for d in family if d not in trained]
        what = (f"regular ResNets of the {cfg.model.arch} family, the same number of units in every stage, at "
                f"{', '.join(map(str, trained))} layers"
                + (f" ({', '.join(map(str, left))} left out by layer_drop.baselines.depths)" if left else ""))
    else:
        what = ("the irregular structures the loop reached, each trained anew (the paper compares regular ResNets: "
                "layer_drop.baselines.structure: regular)")
    if b.epochs == "matched":
        budget = (f"each trained as many epochs as the layer-drop network of its depth, {full_epochs} + {ld.retrain_epochs} "
                  f"x ceil(units removed / {ld.k}) (what the loop spends to get there)")
    else:
        budget = (f"each trained {b.epochs or cfg.train.epochs} epochs"
                  + (" (train.epochs, the full network's recipe: the paper gives one training setting, section 4.1.3)"
                     if b.epochs is None else ""))
    distilled = (f"distilled from the full network (Hinton et al. 2015, T = {b.temperature}, alpha = {b.alpha}; the "
                 f"teacher's own {full_epochs} epochs are not counted)")
    trained_how = {(True, True): f"from scratch, and {distilled}, both from the same initial weights",
                   (True, False): "from scratch", (False, True): distilled}[(b.scratch, b.distill)]
    md += ["", f"**Series and budgets.** Layer-drop: the full gated network trained {full_epochs} epochs; each step "
               f"deletes the k = {ld.k} units of lowest {ld.criterion} score and retrains n = {ld.retrain_epochs} epochs from the "
               f"initial learning rate (Algorithm 1, line 9), so the network after step s had {full_epochs} + s x "
               f"{ld.retrain_epochs} epochs in all. Baselines: {what}; {budget}; {trained_how}; their units_deleted "
               f"is the number of units they have fewer than the full network."]
    n = max(data["test_images"], 1)
    se = 50 / math.sqrt(n)  # the binomial standard error at its largest, at 50 % (sqrt(p (1 - p) / n))
    equal = all(r["epochs"] == method_epochs(full_epochs, r["units_deleted"], ld.k, ld.retrain_epochs) for r in base)
    fair = ("Budgets are equal at each depth, so a gap between series at one depth is not extra epochs. "
            if equal else
            f"Budgets are not equal (layer-drop {min(trace)} to {max(trace)} epochs, baselines "
            f"{', '.join(map(str, sorted({r['epochs'] for r in base})))}): part of any gap between series can be "
            f"the extra training rather than the method. ")
    if max(trace) > min(trace):
        fair += (f"Down the layer-drop series the budget grows with every step ({min(trace)} to {max(trace)} epochs), "
                 f"so a rise of its accuracy as units are deleted can be that extra training, not the deletion: "
                 f"compare series at one depth, not along one. ")
    md += ["", f"**What these rows can and cannot show.** They can show, for one seed, whether deleting the units of "
               f"lowest {ld.criterion} score from the trained network and retraining keeps more accuracy than "
               f"{'a regular ResNet of the same depth' if b.structure == 'regular' else 'the same structure'} trained "
               f"{' or '.join(w for w, on in (('from scratch', b.scratch), ('distilled', b.distill)) if on)}, and what each depth costs (params, MACs; step times for the layer-drop "
               f"rows). " + fair + "They cannot show the paper's accuracies "
               f"unless trained as the paper was (200 epochs on all 50,000 CIFAR images); this run trained on "
               f"{data['train_images']:,} images. With one seed and {n:,} test images one top-1 has a standard "
               f"error of up to {se:.1f} points, the difference of two up to {se * math.sqrt(2):.1f}: differences "
               f"under about {2 * se * math.sqrt(2):.1f} points can be noise. "
               + ("The smallest lossless network is chosen on the test set, as in the paper, which flatters it "
                  "(layer_drop.stop_on: val chooses on held-out training images instead)."
                  if ld.stop_on == "test" else
                  f"The smallest lossless network is chosen on {data['val_images']:,} training images held out from "
                  f"every training (layer_drop.stop_on: val; the paper chose on the test set), so its test top-1 is "
                  f"not flattered by the choice, but the validation top-1s carry their own noise of up to "
                  f"{50 / math.sqrt(max(data['val_images'], 1)):.1f} points each.")]
    return "\n".join(md)


def suffix(cfg: ExperimentConfig) -> str:
    """Layer-drop runs of one trained network differ by criterion, k and n."""
    ld = cfg.layer_drop
    return f"layerdrop-{ld.criterion}-k{ld.k}-n{ld.retrain_epochs}"


def _output(cfg: ExperimentConfig, run_dir: Path, summary: dict[str, Any]) -> Path:
    """The method's result: the smallest network whose top-1 stayed within the tolerance (Algorithm 1's
    stop rule), or the network it started from if no deletion kept it."""
    rows = [r for r in summary["rows"] if r["method"] == "layer-drop"]
    best = smallest_lossless(rows, cfg.layer_drop.tolerance, judged(summary.get("stop_on", "test")))
    return run_dir / f"step{best['step']:02d}" / "model.pt" if best["step"] else cfg.at(summary["source"])


def _gates_needed(t) -> Optional[str]:
    why = fp32_only("layer_drop", retrains=True)(t)
    if why:
        return why
    return None if "gated" in t else ("layer_drop needs gated residual units: add `gates: {init: [-1, 1]}` under "
                                      "model: (the network it starts from has none)")


LAYER_DROP = STAGES.register("layer_drop")(Stage("layer_drop", "layer_drop", suffix=suffix, check=check, body=body,
                                                 output=_output, refuses=_gates_needed, check_input=check_input))


def run_layer_drop(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    """`rescomp layer-drop`: the one-stage chain."""
    return execute(LAYER_DROP, cfg, fresh=fresh, console=console)
