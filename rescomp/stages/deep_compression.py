"""The Deep Compression stages (Han et al. 2015, 2016): `magnitude_prune`, then `weight_share`.

magnitude_prune: repeat {zero the smallest |w| until s x share_per_step of the conv and linear weights
are zero; retrain with the mask held}, one resumable step folder each (runs/<name>-mprune-.../stepNN).
It leaves out/model.pt: the last step's network with its masks made permanent (exact zeros, a plain
spec), which any later stage can take; stages that fine-tune without a mask (prune, layer_drop) are
refused after it, since its zeros would grow back.
weight_share: per-layer k-means codes (2**bits, code 0 the zero), then centroid fine-tuning; it leaves
step01/model.pt, whose spec rebuilds the codes, and compressed.rcdc, the network stored as Deep
Compression stores it (sparse relative indices, code indices, codebooks, Huffman-coded), which
`codec.network` turns back into the same network. It ends a chain.
Every row states the bytes of every storage stage (dense, sparse, shared, Huffman), each a real file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from rescomp import checkpoint
from rescomp.compress import codec
from rescomp.compress import deep_compression as dc
from rescomp.config import ExperimentConfig
from rescomp.measure import measure
from rescomp.runner import STAGES, Stage, StageRun, fp32_only, model_spec
from rescomp.rundir import read_summary
from rescomp.train import evaluate


def _row(run: StageRun, model, spec: dict[str, Any], step: int, gap_conv: int, gap_fc: int,
         extra: dict[str, Any], keep: Optional[Path] = None) -> dict[str, Any]:
    """Accuracy, sparsity and every storage stage's bytes of `model`; costs measured on the plain
    network its dense file decodes to (the same outputs: pruning to zeros changes no dense MAC).
    `keep`: where to write its Huffman-coded file, encoded once for the row and the stage."""
    ev = evaluate(model.to(run.ctx.device), run.loaders["test"], run.ctx)
    cpu = copy.deepcopy(model).cpu()
    files = dc.encodings(cpu, gap_conv, gap_fc)
    kept = dc.kept_share(cpu)
    coded = {n: m.weight_index.numel() if hasattr(m, "weight_index") else dc.weight_of(m).numel()
             for n, m in dc.coded_layers(cpu)}
    total = sum(coded.values())
    nonzero = round(sum(kept[n] * coded[n] for n in coded))
    if keep is not None:
        checkpoint.atomic_write_bytes(keep, lambda f: f.write(files["huffman"]))
    plain = codec.network(files["dense"], spec)
    bytes_ = {f"dc_{k}_bytes": len(v) for k, v in files.items()}
    best = min(bytes_.values())
    return {"step": step, "top1": ev["top1"], "loss": ev["loss"], **extra, "coded_weights": total,
            "nonzero_weights": nonzero, "weights_kept": nonzero / total, "weights_compression": total / max(nonzero, 1),
            "kept_per_layer": kept, "layer_weights": coded, "layer_kinds": {n: _kind(m) for n, m in dc.coded_layers(cpu)},
            **bytes_,
            "dc_compression": bytes_["dc_dense_bytes"] / best, "stored_bytes": best,
            **measure(plain, run.cfg.data.image_size, run.cfg.measure)}


# -- magnitude_prune ------------------------------------------------------------------------------------

def _mp_suffix(cfg: ExperimentConfig) -> str:
    m = cfg.magnitude_prune
    return f"mprune-{m.scope}-{round(100 * m.share_per_step * m.steps)}"


def _mp_body(run: StageRun) -> dict[str, Any]:
    cfg, mc, ws = run.cfg, run.cfg.magnitude_prune, run.cfg.weight_share
    model, spec = run.model.to(run.ctx.device), run.spec
    names = [n for n, _ in dc.coded_layers(model)]
    lr = mc.finetune_lr or cfg.train.optimizer.lr / 10
    rows = [_row(run, model, spec, 0, ws.gap_bits_conv, ws.gap_bits_fc, {"share": 0.0})]
    for step in range(1, mc.steps + 1):
        share = round(mc.share_per_step * step, 6)

        def zero(model=model, spec=spec, share=share):
            run.ctx.log(f"step {step}: zeroing the smallest {100 * share:g}% of the weights ({mc.scope})")
            dc.apply_masks(model, dc.magnitude_masks(model, share, mc.scope))
            return model, {**spec, "masked": names}, {}

        model, spec, r = run.step(step, zero, lambda m, s, info, ev, step=step, share=share: _row(
            run, m, s, step, ws.gap_bits_conv, ws.gap_bits_fc, {"share": share}), epochs=mc.finetune_epochs, lr=lr)
        rows.append(r)
        run.ctx.log(f"step {step}: {100 * r['weights_kept']:.1f}% of the weights kept, top-1 {r['top1']:.2f}%")
    baked = dc.bake(checkpoint.copy_network(model).cpu())  # a masked network's weight has a graph: copy_network
    plain_spec = {k: v for k, v in spec.items() if k != "masked"}
    # its zeros are no longer held by masks, so it says it is sparse: a stage that retrains every weight
    # refuses it (rescomp.runner.traits_of), as a chain refuses that stage after this one
    total = (checkpoint.peek(run.out / f"step{mc.steps:02d}" / "model.pt") or {}).get("epochs_total")
    checkpoint.save(run.out / "model.pt", {"arch": plain_spec, "state_dict": baked.state_dict(), "config": cfg.to_dict(),
                                           "traits": ["sparse"], **({} if total is None else {"epochs_total": total}),
                                           "metrics": {"top1": rows[-1]["top1"], "loss": rows[-1]["loss"]}})
    for r in rows:
        r["row"] = f"{cfg.report.row or cfg.model.arch} magnitude-pruned {100 * r['share']:g}% ({mc.scope})"
        r["storage_curve"] = f"{cfg.report.row or cfg.model.arch}, Deep Compression ({mc.scope})"
        r["paper"] = cfg.report.paper_by_share.get(f"{r['share']:g}", {})
    return {"arch": cfg.model.arch, "start_arch": run.spec, "scope": mc.scope, "rows": rows,
            "sections": [{"title": f"{cfg.report.row or cfg.model.arch}: share of each layer's weights kept ({mc.scope})",
                          "markdown": _kept_table(rows)}]}


def _kind(m) -> str:
    if isinstance(m, torch.nn.Linear):
        return f"fc {m.in_features}x{m.out_features}"
    return f"conv {'x'.join(map(str, m.kernel_size))}" + (f" /{m.groups}" if m.groups > 1 else "")


def _kept_table(rows: list[dict[str, Any]]) -> str:
    """Each coded layer's kept share after each step, as Han et al. report it per layer."""
    layers = list(rows[0]["kept_per_layer"])
    head = "| layer | kind | weights | " + " | ".join(f"{100 * r['share']:g} % pruned" for r in rows) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(rows)]
    sizes, kinds = rows[0].get("layer_weights", {}), rows[0].get("layer_kinds", {})
    for n in layers:
        lines.append(f"| {n} | {kinds.get(n, '')} | {sizes.get(n, 0):,} | "
                     + " | ".join(f"{100 * r['kept_per_layer'][n]:.1f} %" for r in rows) + " |")
    return "\n".join(lines)


MAGNITUDE_PRUNE = STAGES.register("magnitude_prune")(Stage(
    "magnitude_prune", "magnitude_prune", suffix=_mp_suffix, check=model_spec, body=_mp_body,
    output=lambda cfg, run_dir, summary: run_dir / "model.pt", refuses=fp32_only("magnitude_prune"),
    gives=lambda t: t | {"sparse"}))

# -- weight_share ---------------------------------------------------------------------------------------

def _ws_suffix(cfg: ExperimentConfig) -> str:
    w = cfg.weight_share
    return f"share-{w.conv_bits}b{w.fc_bits}b"


def _pruned_by(source: Optional[Path]) -> tuple[str, Optional[str]]:
    """What magnitude pruning made the network to share, as its run's summary says: (' (92% pruned, std)',
    'std'), so the shared rows of two pruning runs of one network are told apart; ('', None) for any
    other network."""
    summary = source.parent / "summary.json" if source is not None else None
    if summary is None or not summary.is_file():
        return "", None
    s = read_summary(summary)
    if s.get("stage") != "magnitude_prune" or not s.get("rows"):
        return "", None
    return f" ({100 * s['rows'][-1]['share']:g}% pruned, {s.get('scope', '?')})", s.get("scope", "?")


def _ws_body(run: StageRun) -> dict[str, Any]:
    cfg, ws = run.cfg, run.cfg.weight_share
    model, spec = run.model.to(run.ctx.device), run.spec
    lr = ws.finetune_lr or cfg.train.optimizer.lr / 10
    rows = [_row(run, model, spec, 0, ws.gap_bits_conv, ws.gap_bits_fc, {})]

    def cluster(model=model, spec=spec):
        bits = {}
        for n, m in dc.coded_layers(model):
            bits[n] = dc.bits_for(m, ws.conv_bits, ws.fc_bits)
            dc.share(m, bits[n], ws.iterations)
        run.ctx.log(f"shared: {ws.conv_bits}-bit codes for conv layers, {ws.fc_bits}-bit for linear ones; "
                    f"fine-tuning the centroids {ws.finetune_epochs} epoch(s)")
        return model, {**spec, "shared": bits}, {}

    _, _, r = run.step(1, cluster, lambda m, s, info, ev: _row(run, m, s, 1, ws.gap_bits_conv, ws.gap_bits_fc, {},
                                                            keep=run.out / "compressed.rcdc"),
                       epochs=ws.finetune_epochs, lr=lr)
    rows.append(r)
    origin, scope = _pruned_by(run.source)
    name = cfg.report.row or cfg.model.arch
    for r in rows:
        r["row"] = f"{name} {'weight-shared' if r['step'] else 'before sharing'}{origin}"
        # one curve with the pruning steps it follows: dense, sparse, then shared and Huffman-coded
        r["storage_curve"] = f"{name}, Deep Compression ({scope})" if scope else f"{name}, weight sharing"
        r["paper"] = dict(cfg.report.paper_shared) if r["step"] else {}
    return {"arch": cfg.model.arch, "start_arch": run.spec, "rows": rows, "compressed_file": "compressed.rcdc",
            "conv_bits": ws.conv_bits, "fc_bits": ws.fc_bits}


WEIGHT_SHARE = STAGES.register("weight_share")(Stage(
    "weight_share", "weight_share", suffix=_ws_suffix, check=model_spec, body=_ws_body,
    output=lambda cfg, run_dir, summary: run_dir / "step01" / "model.pt", refuses=fp32_only("weight_share"),
    gives=lambda t: t | {"coded"}))
