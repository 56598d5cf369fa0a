"""The binarize stage (SEP-Net pattern binarization, sep-net-slides.txt; rescomp.compress.binarize).

One resumable step: binarize every k x k conv (and, with quantize_others, quantize the 1 x 1 convs and
linear layers to 8 bits), fine-tune, measure. Its folder is runs/<name>-binarize[-bq][-frozen]; it
leaves step01/model.pt, whose spec rebuilds the binarized layers, and binarized.rcbn, the network stored
as SEP-Net counts it (1 bit per binarized weight and a float32 scale per filter, a byte per 8-bit
weight), which `codec.network` turns back into a network with exactly the same outputs. Rows give
the bytes of the dense file and of the binarized one. It ends a chain.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from rescomp import checkpoint
from rescomp.compress import binarize as bz
from rescomp.compress import codec
from rescomp.config import ExperimentConfig
from rescomp.measure import measure
from rescomp.runner import STAGES, Stage, StageRun, fp32_only, model_spec
from rescomp.train import evaluate


def _suffix(cfg: ExperimentConfig) -> str:
    b = cfg.binarize
    return "binarize" + ("-bq" if b.quantize_others else "") + ("-frozen" if b.freeze_patterns else "")


def _row(run: StageRun, model, spec: dict[str, Any], step: int, keep: Optional[Path] = None) -> dict[str, Any]:
    """Accuracy, the bytes of the binarized file and of a dense file of the same network, and costs
    measured on the plain network the file decodes to. `keep`: where to write the binarized file."""
    ev = evaluate(model.to(run.ctx.device), run.loaders["test"], run.ctx)
    cpu = copy.deepcopy(model).cpu().eval()
    layers = dict(spec.get("binarized", {}).get("layers", {}))
    sizes, plain = {}, cpu
    if step:
        blob = codec.encode_binary(*bz.stored(cpu))
        if keep is not None:
            checkpoint.atomic_write_bytes(keep, lambda f: f.write(blob))
        plain = codec.network(blob, spec)
        dense = codec.encode_model({}, {k: v.numpy() for k, v in plain.state_dict().items()})
        sizes = {"bin_dense_bytes": len(dense), "bin_bytes": len(blob), "bin_compression": len(dense) / len(blob),
                 "stored_bytes": len(blob)}
    binarized = sum(m.weight.numel() for n, m in cpu.named_modules() if layers.get(n) == "sign")
    return {"step": step, "top1": ev["top1"], "loss": ev["loss"], "binarized_layers": sum(k == "sign" for k in layers.values()),
            "int8_layers": sum(k == "int8" for k in layers.values()), "binarized_weights": binarized, **sizes,
            **measure(plain, run.cfg.data.image_size, run.cfg.measure)}


def _body(run: StageRun) -> dict[str, Any]:
    cfg, b = run.cfg, run.cfg.binarize
    model, spec = run.model.to(run.ctx.device), run.spec
    rows = [_row(run, model, spec, 0)]

    def binarize(model=model, spec=spec):
        layers = bz.binarize(model, b.quantize_others, b.freeze_patterns)
        run.ctx.log(f"binarized {sum(k == 'sign' for k in layers.values())} k x k conv layers"
                    + (f", {sum(k == 'int8' for k in layers.values())} others to 8 bits" if b.quantize_others else "")
                    + f"; fine-tuning {b.finetune_epochs} epoch(s)"
                    + (" with the patterns fixed" if b.freeze_patterns else " (straight-through gradients)"))
        return model, {**spec, "binarized": {"layers": layers, "freeze_patterns": b.freeze_patterns}}, {}

    _, _, r = run.step(1, binarize, lambda m, s, info, ev: _row(run, m, s, 1, keep=run.out / "binarized.rcbn"),
                       epochs=b.finetune_epochs, lr=b.finetune_lr or cfg.train.optimizer.lr / 10)
    rows.append(r)
    label = "SEP-Net-BQ" if b.quantize_others else "SEP-Net-B"
    for row in rows:
        row["row"] = f"{cfg.report.row or cfg.model.arch} {label if row['step'] else 'before binarization'}"
    return {"arch": cfg.model.arch, "start_arch": run.spec, "rows": rows, "quantize_others": b.quantize_others,
            "freeze_patterns": b.freeze_patterns, "binarized_file": "binarized.rcbn"}


BINARIZE = STAGES.register("binarize")(Stage(
    "binarize", "binarize", suffix=_suffix, check=model_spec, body=_body,
    output=lambda cfg, run_dir, summary: run_dir / "step01" / "model.pt",
    refuses=fp32_only("binarize", retrains=True), gives=lambda t: t | {"coded"}))
