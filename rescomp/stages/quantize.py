"""The quantize stage: int8 of a trained fp32 network on the CPU, by one backend (torch.ao FX x86 /
fbgemm / qnnpack, torchao PT2E, ONNX Runtime), PTQ or QAT; evaluated and timed beside its fp32 model.

Its folder is runs/<name>-ptq (FX x86), -ptq-<backend> or -qat[-<backend>]; it holds int8.pt, which
reloads without recalibrating (rescomp.compress.quantize.load_int8). It takes no further stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from rich.console import Console

from rescomp import checkpoint
from rescomp.config import ExperimentConfig
from rescomp.context import RunContext, join
from rescomp.errors import ConfigError
from rescomp.measure import measure
from rescomp.rundir import run_folder, trained_otherwise
from rescomp.runner import STAGES, Stage, StageRun, execute, fp32_only, train_loaders
from rescomp.stages.train import log_measuring
from rescomp.train import Trainer, evaluate, paired

def suffix(cfg: ExperimentConfig) -> str:
    """ptq or qat, and the backend unless it is x86 (torch.ao FX), the default."""
    qc = cfg.quantize
    return qc.method if qc.backend == "x86" else f"{qc.method}-{qc.backend}"


def input_path(cfg: ExperimentConfig) -> Path:
    """The fp32 model `rescomp quantize` starts from: quantize.checkpoint, else this config's training run."""
    return cfg.at(cfg.quantize.checkpoint) if cfg.quantize.checkpoint else run_folder(cfg) / "model.pt"


def check_input(cfg: ExperimentConfig) -> Optional[dict[str, Any]]:
    """A trained model to quantize: int8 trains nothing first. Returns quantize.checkpoint's payload where
    one is given (Stage.check_source judges it without reading it again)."""
    path = input_path(cfg)
    if path.is_dir():  # a run folder given for its model.pt
        raise ConfigError(f"quantize.checkpoint '{cfg.quantize.checkpoint}' is a folder; pass "
                          f"{cfg.quantize.checkpoint.rstrip('/')}/model.pt, the network a run there made")
    if not path.is_file():
        raise ConfigError(f"no trained model at '{path}'; run `rescomp train` on this config first, or set "
                          f"quantize.checkpoint to a trained model.pt")
    if not cfg.quantize.checkpoint and (changed := trained_otherwise(path.parent, cfg)):
        raise ConfigError(f"'{path.parent}' holds a network trained with other settings than this config's: "
                          f"{', '.join(changed)}; train this config first (`rescomp train` with the same settings, "
                          f"--set name=<new name> to keep both), or set quantize.checkpoint={path} to quantize "
                          f"that network as it is")
    payload = checkpoint.load(path, mmap=True)  # its metrics, and its spec for check_source
    if not payload.get("metrics"):
        raise ConfigError(f"'{path}' holds no evaluation metrics, so it is not a trained model; quantize the "
                          f"model.pt that `rescomp train` writes at the end of a run")
    return payload if cfg.quantize.checkpoint else None


def context(cfg: ExperimentConfig, console: Optional[Console]) -> RunContext:
    """The CPU (int8 runs there). Under torchrun the process joins the group on the config's device, as
    the stages before it in a chain do; QAT then fine-tunes under DDP over Gloo."""
    from rescomp import distributed

    join(cfg)  # on the config's device: a device that is not there is a mistake to name
    return RunContext(torch.device("cpu"), cfg.seed, console=console or Console(stderr=True, log_path=False),
                      rank=distributed.rank(), world_size=distributed.world_size())


def start(cfg: ExperimentConfig, ctx: RunContext):
    path = input_path(cfg)
    model, payload = checkpoint.load_model(path)
    return model, payload, path


def body(run: StageRun) -> dict[str, Any]:
    from rescomp.compress import quantize as q
    from rescomp.data import BatchLoader, NORMALIZATION, sample_loader
    from rescomp.measure import measure_int8

    cfg, ctx, splits, source, spec = run.cfg, run.ctx, run.splits, run.source, run.spec
    qc, size = cfg.quantize, cfg.data.image_size
    calib = sample_loader(splits, cfg.data, qc.calibration_images, cfg.seed, ctx.device, batch_size=100)
    mean, std = NORMALIZATION[cfg.data.dataset]
    test = BatchLoader(splits.test_x, splits.test_y, cfg.train.eval_batch_size, mean=mean, std=std,
                       device=ctx.device, image_size=size)
    model = run.model.eval().to(memory_format=torch.contiguous_format)
    ctx.log(f"calibrating on {qc.calibration_images} training images" if qc.method == "ptq"
            else f"quantization-aware training: {qc.qat.epochs} epochs of fake-quant fine-tuning")
    b = q.backend(qc.backend)
    if qc.method == "qat":  # the config refuses it for a backend without QAT (onnxruntime)
        qmodel, info, blob = _qat(model, cfg, splits, ctx, b)
    else:
        qmodel, info, blob = b.ptq(model, qc, (x for x, _ in calib), size)
    layers = q.counted_layers(b, qmodel)  # refuses an "int8" network with no int8 layer
    ctx.log(f"int8 ({info['method']}, {qc.backend}, {info['activation_bits']}-bit activations) of {source}"
            + (f"; calibrated on {info['calibration_images']} training images" if "calibration_images" in info else "")
            + f"; {layers['int8_layers']} of its {layers['weight_layers']} conv and linear layers in int8")
    if q.may_saturate(qc):
        ctx.log(f"warning: quantize.reduce_range=false on {qc.backend} without VNNI: int8 convs sum products in "
                f"saturating int16 pairs, so results can be wrong; use reduce_range: auto, or a CPU with VNNI")
    fp32_eval, int8_eval = evaluate(model, test, ctx, predictions=True), evaluate(qmodel, test, ctx, predictions=True)
    pair = paired(fp32_eval, int8_eval)  # which images int8 changes, and how sure its top-1 drop is

    log_measuring(ctx, cfg)
    costs = measure(model, size, cfg.measure.model_copy(update={"latency": False}))  # fp32; timed below
    int8 = measure_int8(qmodel, size, cfg.measure, fp32=model)  # fp32 and int8 timed interleaved
    metrics = {"test_top1": int8_eval["top1"], "test_loss": int8_eval["loss"]}
    q.save_int8(run.out / "int8.pt", qmodel, spec, qc, size, metrics, blob=blob)
    return {
        "stage": qc.method,
        "row": f"{cfg.label} int8 {b.label}{' QAT' if qc.method == 'qat' else ''} "
               f"({info['activation_bits']}-bit act.)", "arch": spec,
        "quantization": info, **layers, "top1": int8_eval["top1"], "loss": int8_eval["loss"],
        "params": costs["params"], "params_with_bn_stats": costs["params_with_bn_stats"], "macs": costs["macs"],
        "image_size": size, **int8,
        "fp32_top1": fp32_eval["top1"], "fp32_loss": fp32_eval["loss"], "top1_drop": fp32_eval["top1"] - int8_eval["top1"],
        "top1_drop_se": pair["diff_se"], "agreement": pair["agreement"],
        "only_fp32_right": pair["only_a_right"], "only_int8_right": pair["only_b_right"],
        **{f"fp32_{k}": v for k, v in costs.items() if k.startswith(("size_bytes", "act_peak"))},
        "size_ratio": int8["size_bytes"] / costs["size_bytes"],
        "paper": dict(cfg.report.paper_int8),
    }


def _qat(model, cfg: ExperimentConfig, splits, ctx: RunContext, b) -> tuple[Any, dict[str, Any], Optional[bytes]]:
    """Quantization-aware training on backend `b`: fake-quant fine-tuning with the config's data, then
    convert (PT2E's program bytes come back too)."""
    qc, size = cfg.quantize, cfg.data.image_size
    prepared = b.prepare_qat(model, qc, size)
    tune = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "epochs": qc.qat.epochs, "optimizer": cfg.train.optimizer.model_copy(update={"lr": qc.qat.lr}),
        "schedule": cfg.train.schedule.model_copy(update={"name": "cosine", "warmup_epochs": 0}),
        "early_stopping": cfg.train.early_stopping.model_copy(update={"patience": None}),
        "eval_test_every": 0, "compile": False})})
    loaders = train_loaders(tune, ctx, splits)
    # Fine-tuning is a stage the pipeline runs (DESIGN.md, habit 1); a few epochs, so no checkpoints.
    Trainer(prepared, loaders, tune, ctx, None, {}).fit()
    qmodel, blob = b.convert_qat(prepared, size)
    return qmodel, {**b.describe(qc), "qat_epochs": qc.qat.epochs, "qat_lr": qc.qat.lr}, blob


QUANTIZE = STAGES.register("quantize")(Stage(
    "quantize", "quantize", suffix=suffix, check=lambda cfg: None, body=body, start=start, context=context,
    check_input=check_input, output=lambda cfg, run_dir, summary: run_dir / "int8.pt",
    refuses=lambda t: ("the network is int8 already: quantize the fp32 model.pt it was made from (a chain quantizes "
                       "once)") if "int8" in t else fp32_only("quantize")(t),
    gives=lambda t: t | {"int8"}))


def run_quantize(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None) -> tuple[Path, dict[str, Any]]:
    """`rescomp quantize`: the one-stage chain."""
    return execute(QUANTIZE, cfg, fresh=fresh, console=console)
