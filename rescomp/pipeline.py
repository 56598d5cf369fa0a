"""Runs an experiment: check everything, then data + model -> train -> evaluate -> measure -> summary.

Every user mistake is caught before the run folder is created, so bad input leaves nothing behind.
An interrupted run resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml
from rich.console import Console

from rescomp import checkpoint, runlock
from rescomp.config import ExperimentConfig, dump_config, validate
from rescomp.context import RunContext, make_context, resolve_device, seed_everything
from rescomp.data import make_loaders, prepare
from rescomp.errors import ConfigError
from rescomp.measure import measure
from rescomp.models import build_model, check_spec, get_entry, probe
from rescomp.provenance import command_line, stamp
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
    probe(spec, cfg.data.image_size)
    return spec


def stage_suffix(cfg: ExperimentConfig, stage: str) -> str:
    """Run-folder suffix of a later stage; layer-drop runs of one trained network differ by k, n, criterion,
    and int8 runs by backend."""
    if stage == "layerdrop":
        ld = cfg.layer_drop
        return f"layerdrop-{ld.criterion}-k{ld.k}-n{ld.retrain_epochs}"
    if stage in ("ptq", "qat") and cfg.quantize.backend != "x86":  # x86 (torch.ao FX) is the default
        return f"{stage}-{cfg.quantize.backend}"
    return stage


def differences(old: ExperimentConfig, new: ExperimentConfig, sections: tuple[str, ...] = ()) -> list[str]:
    """'key (old -> new)' for every setting that decides a run's result (ExperimentConfig.hash) and differs."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict) and d:
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(old.identity(*sections)), flat(new.identity(*sections))
    shown = lambda v: "unset" if v is None else (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa: E731
    return [f"{k} ({shown(a.get(k))} -> {shown(b.get(k))})" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def run_folder(cfg: ExperimentConfig, stage: str = "train") -> Path:
    return cfg.runs_dir / (cfg.run_name if stage == "train" else f"{cfg.run_name}-{stage_suffix(cfg, stage)}")


def other_settings(run_dir: Path, cfg: ExperimentConfig, section: Optional[str] = None) -> list[str]:
    """The settings in which the run saved in run_dir differs from cfg ([] if none, or nothing saved):
    what decides the stage's result (the training sections and the stage's own `section`), and how it
    was measured and labelled. A finished run is returned only if all of it is unchanged, so no
    setting ever comes back with an old result."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    sections = ((section,) if section else ()) + ("measure", "report")
    old = validate(yaml.safe_load(saved.read_text()) or {}, str(saved))
    return differences(old, cfg, sections) if old.identity(*sections) != cfg.identity(*sections) else []


def resumable(run_dir: Path) -> bool:
    """Whether a run folder holds anything a run could resume from or report: any file but its config and lock."""
    return any(p.is_file() and p.name not in ("config.yaml", runlock.LOCK_NAME) for p in run_dir.rglob("*"))


def _claim_run_dir(cfg: ExperimentConfig, fresh: bool, stage: str = "train",
                   section: Optional[str] = None) -> tuple[Path, Optional[dict[str, Any]]]:
    """The run folder of `stage` (whose config section, if any, is `section`), after checking that it is
    ours to write; and its summary if the run is complete.

    Call it only once everything the run needs has been checked: `fresh` deletes here. A folder that
    holds a run of other settings is refused with the keys that differ, unless it holds nothing to
    resume (a run that failed before its first checkpoint), which is taken over.
    """
    run_dir = run_folder(cfg, stage)
    saved = run_dir / "config.yaml"
    if not run_dir.exists():
        return run_dir, None  # claimed by `writing` when the run starts writing
    if fresh:
        if saved.is_file() or not runlock.contents(run_dir):
            _empty(run_dir)
            return run_dir, None
        raise ConfigError(f"--fresh would delete '{run_dir}', which is not a rescomp run folder; choose another name")
    open_run_dir(run_dir)
    changed = other_settings(run_dir, cfg, section)
    if changed:
        if not resumable(run_dir):
            _empty(run_dir)
            return run_dir, None
        keep = "--set name=<new name>"
        if section and getattr(cfg, section).checkpoint is None:  # a new name alone would train anew
            keep += f" --set {section}.checkpoint={run_folder(cfg) / 'model.pt'}"
        raise ConfigError(f"'{run_dir}' holds a run with other settings: {', '.join(changed)}; "
                          f"re-run with --fresh to replace it, or {keep} to keep both")
    summary = run_dir / "summary.json"
    return run_dir, (json.loads(summary.read_text()) if summary.is_file() else None)


def _empty(run_dir: Path) -> None:
    open_run_dir(run_dir)  # never delete what another live process is writing
    for p in runlock.contents(run_dir):  # keep our lock: deleting it would let a second process in
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def open_run_dir(run_dir: Path) -> None:
    """Create run_dir if needed and hold it for this process (rescomp.runlock): exit 2 if another
    live process is writing it."""
    runlock.claim(run_dir, command_line())


@contextmanager
def writing(run_dir: Path, cfg: ExperimentConfig) -> Iterator[Path]:
    """Hold run_dir and save the config in it while a run writes there. A run that fails (or is
    interrupted) before writing anything it could resume from leaves no folder behind, so the
    corrected command starts clean instead of meeting a half-made folder."""
    open_run_dir(run_dir)
    checkpoint.atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    try:
        yield run_dir
    except BaseException:
        if not resumable(run_dir):
            runlock.release(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def run_train(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    t_start = time.perf_counter()
    spec = model_spec(cfg)
    ctx = make_context(cfg, console=console)
    distill = teacher_loss(cfg, ctx)  # a missing or corrupt teacher fails here, before anything is written
    splits = prepare(cfg.data, cfg.seed)
    seed_everything(cfg.seed)
    model = build_model(spec)  # the model's arguments are checked here, before --fresh deletes anything
    run_dir, done = _claim_run_dir(cfg, fresh)
    if done is not None:
        ctx.log(f"{run_dir} is already complete; --fresh retrains it")
        return run_dir, done
    ctx.run_dir = run_dir
    with writing(run_dir, cfg):
        return _train(cfg, ctx, spec, model, splits, distill, run_dir, t_start)


def _train(cfg: ExperimentConfig, ctx: RunContext, spec: dict[str, Any], model: torch.nn.Module, splits, distill,
           run_dir: Path, t_start: float) -> tuple[Path, dict[str, Any]]:
    loaders = train_loaders(cfg, ctx, splits)
    ctx.log(f"{spec['arch']} on {splits.source}: {len(splits.train_y)} train / {len(splits.test_y)} test images, "
            f"device {ctx.device}, precision {ctx.precision}")
    trainer = Trainer(model, loaders, cfg, ctx, run_dir, spec, distill=distill)
    state = trainer.fit()
    model = trainer.model

    metrics = {f"test_{k}": v for k, v in evaluate(model, loaders["test"], ctx).items()}
    if "val" in loaders:
        metrics.update({f"val_{k}": v for k, v in evaluate(model, loaders["val"], ctx).items()})
    checkpoint.save(run_dir / "model.pt", {"arch": spec, "state_dict": model.state_dict(), "config": cfg.to_dict(),
                                           "metrics": metrics})
    _log_measuring(ctx, cfg)
    costs = measure(model.cpu().float().to(memory_format=torch.contiguous_format), cfg.data.image_size, cfg.measure)
    summary = build_summary(cfg, ctx, spec, state, metrics, costs, time.perf_counter() - t_start, splits.stamp())
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return run_dir, summary


def _log_measuring(ctx: RunContext, cfg: ExperimentConfig) -> None:
    m = cfg.measure
    ctx.log("measuring params, MACs, bytes" + (f" and CPU latency ({m.warmup} + {m.repeats} runs at batch "
                                               f"{', '.join(map(str, m.batch_sizes))})" if m.latency else ""))


def train_loaders(cfg: ExperimentConfig, ctx: RunContext, splits) -> dict[str, Any]:
    """The train / test (/ val) loaders of the config's training recipe on the context's device."""
    return make_loaders(splits, cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                        device=ctx.device, seed=cfg.seed, max_steps=cfg.train.max_steps_per_epoch)


def start_model(cfg: ExperimentConfig, ctx: RunContext, path: Optional[str]) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    """What a later stage starts from: the checkpoint at `path`, or this config's own training run
    (trained first, resumed, or found finished)."""
    source = cfg.at(path) if path else run_train(cfg, console=ctx.console)[0] / "model.pt"
    model, payload = checkpoint.load_model(source)
    return model, payload, source


def teacher_loss(cfg: ExperimentConfig, ctx: RunContext):
    """The distillation loss of train.distill, or None: the teacher is loaded from its checkpoint."""
    if cfg.train.distill is None:
        return None
    from rescomp.compress.distill import distillation

    d = cfg.train.distill
    teacher, _ = checkpoint.load_model(cfg.at(d.teacher))
    return distillation(teacher.to(ctx.device), d.temperature, d.alpha)


def build_summary(cfg: ExperimentConfig, ctx: RunContext, spec: dict[str, Any], state, metrics: dict[str, Any],
                  costs: dict[str, Any], wall_seconds: float, data: dict[str, Any]) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    return {
        "stage": "train",
        "name": cfg.run_name,
        "table": cfg.report.table,
        "row": cfg.label,
        "arch": spec,
        "dataset": cfg.data.dataset,
        "profile": cfg.profile,
        **data,
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


BACKEND_LABEL = {"x86": "FX x86", "fbgemm": "FX fbgemm", "qnnpack": "FX qnnpack", "pt2e": "PT2E", "onnxruntime": "ONNX Runtime"}


def quantize_source(cfg: ExperimentConfig) -> Path:
    """The fp32 model `rescomp quantize` starts from: quantize.checkpoint, else this config's training run."""
    return cfg.at(cfg.quantize.checkpoint) if cfg.quantize.checkpoint else run_folder(cfg) / "model.pt"


def run_quantize(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    """Int8 a trained checkpoint on the CPU; evaluate and measure it beside its fp32 model."""
    from rescomp.data import BatchLoader, NORMALIZATION, sample_loader

    t_start = time.perf_counter()
    qc = cfg.quantize
    resolve_device(cfg.device)  # int8 runs on the CPU, but a device that is not there is still a mistake to name
    source = quantize_source(cfg)
    if not source.is_file():
        raise ConfigError(f"no trained model at '{source}'; run `rescomp train` on this config first, or set "
                          f"quantize.checkpoint to a trained model.pt")
    model, payload = checkpoint.load_model(source)
    if not payload.get("metrics"):
        raise ConfigError(f"'{source}' holds no evaluation metrics, so it is not a trained model; quantize the "
                          f"model.pt that `rescomp train` writes at the end of a run")
    spec, size = payload["arch"], cfg.data.image_size
    ctx = RunContext(torch.device("cpu"), cfg.seed, console=console or Console(stderr=True, log_path=False))
    splits = prepare(cfg.data, cfg.seed)
    calib = sample_loader(splits, cfg.data, qc.calibration_images, cfg.seed, ctx.device, batch_size=100)
    mean, std = NORMALIZATION[cfg.data.dataset]
    test = BatchLoader(splits.test_x, splits.test_y, cfg.train.eval_batch_size, mean=mean, std=std,
                       device=ctx.device, image_size=size)
    model = model.eval().to(memory_format=torch.contiguous_format)
    run_dir, done = _claim_run_dir(cfg, fresh, stage=qc.method, section="quantize")
    if done is not None:
        ctx.log(f"{run_dir} is already complete; --fresh redoes it")
        return run_dir, done
    with writing(run_dir, cfg):
        return _quantize(cfg, ctx, model, spec, source, splits, calib, test, run_dir, t_start)


def _quantize(cfg: ExperimentConfig, ctx: RunContext, model, spec, source: Path, splits, calib, test, run_dir: Path,
              t_start: float) -> tuple[Path, dict[str, Any]]:
    from rescomp.compress import quantize as q
    from rescomp.measure import measure_int8

    qc, size = cfg.quantize, cfg.data.image_size
    ctx.log(f"calibrating on {qc.calibration_images} training images" if qc.method == "ptq"
            else f"quantization-aware training: {qc.qat.epochs} epochs of fake-quant fine-tuning")
    blob = None
    if qc.method == "qat":  # the config refuses it for a backend without QAT (onnxruntime)
        qmodel, info, blob = _qat(model, cfg, splits, ctx)
    elif qc.backend == "onnxruntime":
        from rescomp.compress import quantize_ort

        qmodel, info, blob = quantize_ort.ptq(model, qc, (x for x, _ in calib), size)
    elif qc.backend == "pt2e":
        from rescomp.compress import quantize_pt2e

        qmodel, info, blob = quantize_pt2e.ptq(model, qc, (x for x, _ in calib), size)
    else:
        qmodel, info = q.ptq(model, qc, (x for x, _ in calib), size)
    ctx.log(f"int8 ({info['method']}, {qc.backend}, {info['activation_bits']}-bit activations) of {source}"
            + (f"; calibrated on {info['calibration_images']} training images" if "calibration_images" in info else ""))
    if q.may_saturate(qc):
        ctx.log(f"warning: quantize.reduce_range=false on {qc.backend} without VNNI: int8 convs sum products in "
                f"saturating int16 pairs, so results can be wrong; use reduce_range: auto, or a CPU with VNNI")
    fp32_eval, int8_eval = evaluate(model, test, ctx), evaluate(qmodel, test, ctx)

    _log_measuring(ctx, cfg)
    costs = measure(model, size, cfg.measure.model_copy(update={"latency": False}))  # fp32; timed below
    int8 = measure_int8(qmodel, size, cfg.measure, fp32=model)  # fp32 and int8 timed interleaved
    metrics = {"test_top1": int8_eval["top1"], "test_loss": int8_eval["loss"]}
    q.save_int8(run_dir / "int8.pt", qmodel, spec, qc, size, metrics, onnx=blob)
    summary = {
        "stage": qc.method, "name": run_dir.name, "table": cfg.report.table,
        "row": f"{cfg.label} int8 {BACKEND_LABEL[qc.backend]}{' QAT' if qc.method == 'qat' else ''} "
               f"({info['activation_bits']}-bit act.)", "arch": spec,
        "dataset": cfg.data.dataset,
        "profile": cfg.profile, **splits.stamp(), "seed": cfg.seed, "config_hash": cfg.hash("quantize"), "source": str(source),
        "quantization": info, "top1": int8_eval["top1"], "loss": int8_eval["loss"],
        "params": costs["params"], "params_with_bn_stats": costs["params_with_bn_stats"], "macs": costs["macs"],
        "image_size": size, **int8,
        "fp32_top1": fp32_eval["top1"], "fp32_loss": fp32_eval["loss"], "top1_drop": fp32_eval["top1"] - int8_eval["top1"],
        **{f"fp32_{k}": v for k, v in costs.items() if k.startswith(("size_bytes", "act_peak"))},
        "size_ratio": int8["size_bytes"] / costs["size_bytes"],
        "wall_seconds": time.perf_counter() - t_start, "paper": dict(cfg.report.paper_int8), **stamp(ctx.device),
    }
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return run_dir, summary


def _qat(model, cfg: ExperimentConfig, splits, ctx: RunContext) -> tuple[Any, dict[str, Any], Optional[bytes]]:
    """Quantization-aware training: fake-quant fine-tuning with the config's data, then convert (FX, or
    PT2E, whose program's bytes come back too)."""
    from rescomp.compress import quantize as q

    qc, size = cfg.quantize, cfg.data.image_size
    if qc.backend == "pt2e":
        from rescomp.compress import quantize_pt2e as pt2e

        prepared, finish = pt2e.prepare_qat(model, qc, size), lambda p: pt2e.convert_qat(p, size)
        describe = pt2e.describe
    else:
        prepared, finish, describe = q.prepare(model, qc, size), lambda p: (q.convert(p, size), None), q.describe
    tune = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "epochs": qc.qat.epochs, "optimizer": cfg.train.optimizer.model_copy(update={"lr": qc.qat.lr}),
        "schedule": cfg.train.schedule.model_copy(update={"name": "cosine", "warmup_epochs": 0}),
        "early_stopping": cfg.train.early_stopping.model_copy(update={"patience": None}),
        "eval_test_every": 0, "compile": False})})
    loaders = train_loaders(tune, ctx, splits)
    # Fine-tuning is a stage the pipeline runs (DESIGN.md, habit 1); a few epochs, so no checkpoints.
    Trainer(prepared, loaders, tune, ctx, None, {}).fit()
    qmodel, blob = finish(prepared)
    return qmodel, {**describe(qc), "qat_epochs": qc.qat.epochs, "qat_lr": qc.qat.lr}, blob


# Stages that fine-tune step by step (prune, layer-drop) keep one resumable folder per step.


def retrain_config(cfg: ExperimentConfig, epochs: int, lr: Optional[float] = None) -> ExperimentConfig:
    """The training config for a fine-tuning stage: `epochs`, the schedule's shape, lr if given."""
    train = {"epochs": epochs, "eval_test_every": 0}
    if lr is not None:
        train["optimizer"] = cfg.train.optimizer.model_copy(update={"lr": lr})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def finished_step(step_dir: Path) -> Optional[tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]]:
    if (step_dir / "row.json").is_file() and (step_dir / "model.pt").is_file():
        model, payload = checkpoint.load_model(step_dir / "model.pt")
        return model, payload["arch"], json.loads((step_dir / "row.json").read_text())
    return None


def train_and_eval(model, spec, cfg: ExperimentConfig, ctx: RunContext, loaders, run_dir: Path,
                    distill=None) -> dict[str, float]:
    """Train (resumably) in run_dir, then test; model.pt + the evaluation are kept there."""
    done = run_dir / "model.pt"
    if done.is_file():
        return checkpoint.load(done)["metrics"]
    trainer = Trainer(model, loaders, cfg, ctx, run_dir, spec, distill=distill)
    trainer.fit()
    ev = evaluate(trainer.model, loaders["test"], ctx)
    checkpoint.save(done, {"arch": spec, "state_dict": trainer.model.state_dict(), "metrics": ev, "config": cfg.to_dict()})
    return ev
