"""`--dry-run`: what a command would run, where, and for how many epochs and steps, without running it.

The same checks as the real command run first (config, model built and run on one image, device,
technique settings), so a dry run that passes means the command will start; nothing is created,
deleted or trained, and no data is decoded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from rescomp import checkpoint
from rescomp.config import ExperimentConfig
from rescomp.config_files import check_writable
from rescomp.context import resolve_device
from rescomp.errors import CheckpointError, ConfigError
from rescomp.rundir import FRESH, read_summary, refusal, resumable, run_folder, train_fresh
from rescomp.runner import epochs_trained


def folder_state(cfg: ExperimentConfig, refused: list[str], suffix: str = "", section: Optional[str] = None,
                 fresh: bool = False, redo: str = FRESH) -> tuple[Path, str]:
    """The run folder a command would use and what it would do there, read-only (rundir.claim). Where
    the command would refuse it, why goes into `refused` too, which makes the dry run exit 2."""
    run_dir = run_folder(cfg, suffix)
    check_writable(cfg.runs_dir, "out_dir")
    if why := refusal(cfg, fresh, suffix, section, redo):
        refused.append(why)
        return run_dir, "refused (below)"
    if not run_dir.exists() or not resumable(run_dir):
        return run_dir, "new run"
    if fresh:
        return run_dir, "--fresh deletes it and starts a new run"
    if (run_dir / "summary.json").is_file():
        try:
            read_summary(run_dir / "summary.json")
        except ConfigError as e:  # the run would refuse it
            refused.append(str(e))
            return run_dir, "refused (below)"
        return run_dir, f"complete: nothing to run ({redo} redoes it)"
    steps = sorted(p.parent.name for p in run_dir.rglob("row.json"))
    said = [f"{len(steps)} step(s) done"] if steps else []
    # where training goes on: the epoch its last checkpoint saved (metrics.jsonl may hold epochs after it, with
    # train.checkpoint_every > 1), in the training run or in the step not yet finished
    for last in sorted(run_dir.rglob("last.pt")):
        folder = last.parent.parent
        if not (folder / "row.json").is_file() and (payload := checkpoint.peek(last)) and "fit_state" in payload:
            epoch = payload["fit_state"].get("epoch", 0)
            said.append(f"after epoch {epoch}" if folder == run_dir else f"{folder.name} after fine-tune epoch {epoch}")
    if not said and (run_dir / "metrics.jsonl").is_file():  # epochs logged, none saved: trained from the start
        return run_dir, "starts over: its epochs so far saved no checkpoint (train.checkpoint_every)"
    if len(said) == 1 and not steps:
        return run_dir, f"resumes {said[0]}"
    return run_dir, "resumes" + (": " + ", ".join(said) if said else "")


def _data(cfg: ExperimentConfig) -> str:
    d = cfg.data
    if d.dataset == "synthetic":
        where = f"synthetic, {d.synthetic.train_size} train / {d.synthetic.test_size} test images"
    else:
        from rescomp.data import is_torchvision_root, resolve_source

        kind, path, _ = resolve_source(d)
        fetched = kind == "torchvision" and not is_torchvision_root(path, d.dataset)
        where = f"{d.dataset} from {path}" + (f" (torchvision{'; downloaded first' if fetched else ''})"
                                              if kind == "torchvision" else "")
    limits = ", ".join(f"{k} {v:,}" for k, v in (("train_limit", d.train_limit), ("test_limit", d.test_limit)) if v)
    return where + (f" ({limits})" if limits else "") + f", {d.image_size}x{d.image_size} px"


def _train_lines(cfg: ExperimentConfig, refused: list[str], fresh: bool = False, redo: str = FRESH) -> list[str]:
    """The training run's plan, after train's own checks (the model, a distillation teacher that loads):
    a later stage without a checkpoint trains first."""
    from rescomp.stages.train import check

    check(cfg)
    run_dir, state = folder_state(cfg, refused, fresh=fresh, redo=redo)
    if redo != FRESH and state.startswith("complete"):  # a later stage loads the network it made: one that fails to
        try:                                            # load fails it (read here as far as its header)
            checkpoint.load(run_dir / "model.pt", mmap=True)
        except CheckpointError as e:
            refused.append(str(e))
            state = "refused (below)"
    t = cfg.train
    return [f"train   {run_dir}: {state}",
            f"        {cfg.model.arch} on {_data(cfg)}; device {resolve_device(cfg.device)}, seed {cfg.seed}",
            f"        {t.epochs} epochs at batch {t.batch_size}, {t.optimizer.name} lr {t.optimizer.lr}, "
            f"{t.schedule.name} schedule"]


def _start_and_folder(cfg: ExperimentConfig, st, refused: list[str], fresh: bool) -> tuple[list[str], Path, str]:
    """A later stage's plan of the training run it starts from (if it does: Stage.trains_first) and of its own
    folder, judged in the order the run judges them (runner.execute), so that the first refusal is the
    run's: under --fresh the training run first (the guard before anything is deleted), else the stage's
    folder, which is claimed before the training run is found and its network loaded (a complete one is
    returned there, and the training run is not judged at all)."""
    def train() -> list[str]:
        return _train_lines(cfg, refused, redo=train_fresh(cfg)) if st.trains_first(cfg) else []

    lines = train() if fresh else []
    run_dir, state = folder_state(cfg, refused, st.suffix(cfg), st.section, fresh)
    if not fresh and not state.startswith("complete"):  # a complete stage is returned as it is, untrained-from
        lines = train()
    return lines, run_dir, state


def describe(cfg: ExperimentConfig, command: str, refused: list[str], fresh: bool = False) -> str:
    """The plan of `command` (train | prune | layer-drop | quantize | ...) for cfg, after its checks: the
    device, the stage's input (a given checkpoint, quantize's trained model), the stage's own settings."""
    from rescomp.runner import stage

    if command == "run":
        from rescomp.chain import describe as chain

        _data(cfg)  # every command reads the data: a copy that is not there is refused here, as the run would
        return "\n".join(chain(cfg, refused, fresh))
    resolve_device(cfg.device)
    st = stage(command.replace("-", "_"))
    st.check_source(cfg)
    _data(cfg)  # after the network it is given, as the run reads them
    if command == "train":
        return "\n".join(_train_lines(cfg, refused, fresh))
    if command == "quantize":
        from rescomp.stages.quantize import input_path, suffix

        qc = cfg.quantize
        source = input_path(cfg)
        run_dir, state = folder_state(cfg, refused, suffix(cfg), "quantize", fresh)
        lines = [f"{qc.method:7} {run_dir}: {state}",
                 f"        int8 of {source}",
                 f"        backend {qc.backend}, reduce_range {qc.reduce_range}, "
                 + (f"calibrated on {qc.calibration_images} training images" if qc.method == "ptq"
                    else f"{qc.qat.epochs} epochs of QAT at lr {qc.qat.lr}")
                 + "; int8 runs on the CPU"]
        return "\n".join(lines)
    if command == "prune":
        from rescomp.stages.prune import check

        pc = cfg.prune
        _, prunable = check(cfg)
        lines, run_dir, state = _start_and_folder(cfg, st, refused, fresh)
        lines += [f"prune   {run_dir}: {state}",
                  f"        from {pc.checkpoint or 'the training run above'}; {pc.criterion} criterion, {pc.policy} "
                  f"policy, {pc.allocation} allocation, {prunable:,} prunable filters"]
        for target, shares in pc.plan():
            epochs = [pc.epochs_at(i, len(shares)) for i in range(1, len(shares) + 1)]
            head = "one run" if target is None else f"to {100 * target:g}% (its own run)"
            lines.append(f"        {head}: {len(shares)} step(s) to "
                         f"{', '.join(f'{100 * s:g}%' for s in shares)} of the filters; fine-tuning "
                         f"{'+'.join(map(str, epochs))} = {sum(epochs)} epochs")
        return "\n".join(lines)
    if command == "layer-drop":
        from rescomp.compress.layer_drop import residual_units
        from rescomp.stages.layer_drop import baseline_family, check, method_epochs
        from rescomp.models import build_model

        ld = cfg.layer_drop
        spec = check(cfg)
        deletable = sum(u.deletable for u in residual_units(build_model(spec)))
        limit = ld.max_units or deletable
        steps = math.ceil(limit / ld.k)
        lines, run_dir, state = _start_and_folder(cfg, st, refused, fresh)
        lines += [f"layer-drop {run_dir}: {state}",
                  f"        from {ld.checkpoint or 'the training run above'}; {ld.criterion} criterion, up to {steps} "
                  f"step(s) of k = {ld.k} of {deletable} deletable units, each retrained n = {ld.retrain_epochs} "
                  f"epochs" + ("" if ld.keep_going else "; stops at the first step below the full network's "
                                                              + ("top-1" if ld.stop_on == "test" else "validation top-1")
                                                              + (f" - {ld.tolerance}" if ld.tolerance else "")),
                  f"        each step timed over {ld.timing.warmup} + {ld.timing.runs} training steps at batch "
                  f"{ld.timing.batch_size}"]
        family, b = baseline_family(cfg, spec), ld.baselines
        if family:  # the epochs the network it starts from was trained (the run reads them from its checkpoint)
            given = checkpoint.peek(cfg.at(ld.checkpoint)) if ld.checkpoint else None
            full = epochs_trained(given, cfg.at(ld.checkpoint)) if given else cfg.train.epochs
            units = len(residual_units(build_model(spec)))
            for depth, s in family.items():
                if b.depths and depth not in b.depths:
                    continue
                removed = units - len(residual_units(build_model(s)))
                epochs = method_epochs(full, removed, ld.k, ld.retrain_epochs) if b.epochs == "matched" else b.epochs or full
                kinds = " and ".join(k for k, on in (("from scratch", b.scratch), ("distilled", b.distill)) if on)
                lines.append(f"        baseline: regular {depth} layers, {kinds}, {epochs} epochs each")
        elif b.scratch or b.distill:
            lines.append("        baselines: the structures the loop reaches, each trained anew")
        return "\n".join(lines)
    if command in ("magnitude-prune", "weight-share", "binarize"):
        st.check(cfg)
        section = getattr(cfg, st.section)
        lines, run_dir, state = _start_and_folder(cfg, st, refused, fresh)
        shown = lambda k, v: f"{cfg.train.optimizer.lr / 10:g} (train lr / 10)" if k == "finetune_lr" and v is None else v  # noqa: E731
        settings = ", ".join(f"{k} {shown(k, v)}" for k, v in section.model_dump().items() if k != "checkpoint")
        lines += [f"{command} {run_dir}: {state}",
                  f"        from {section.checkpoint or 'the training run above'}; {settings}"]
        return "\n".join(lines)
    raise ValueError(command)


def describe_all(cfgs: list[ExperimentConfig], command: str, fresh: bool = False) -> tuple[str, list[str]]:
    """The plan of `command` for every config, and why the command would refuse to start (each in the
    words the command would use; none: it starts). `fresh` (the command's --fresh) applies to its own
    folder, not to the training run a later stage starts from."""
    refused: list[str] = []
    return "\n".join(describe(c, command, refused, fresh) for c in cfgs), refused
