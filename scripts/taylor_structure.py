"""Martineau's Table 2, structural columns, as a counterfactual: params and MACs at 224x224 before
and after removing 30 % of the prunable filters from untrained networks, in the paper's policy and
the coupled one, under two allocations:

- uniform: every prunable group loses the same 30 % (structure alone decides the counts);
- global: the paper's loop, 6 steps of 5 %, channels ranked across layers after per-layer L2
  normalisation, with the l1 criterion (no data, no training: which filter of a layer goes does not
  change the counts, only how many).

These are not the paper's runs and not ours: `make table-taylor` prunes trained networks with Taylor
scores and counts each result at 224 px with the paper's head (the table's "at paper's input" and
"with paper's head" columns). What the counterfactual shows is why allocation decides the counts:
in an untrained network every filter of a layer has about the same norm, so after L2 normalisation
a channel of a C-wide layer scores about 1/sqrt(C), and global ranking strips the widest layers
(ResNet-50's layer4, 512 to 2048 wide) first; Taylor scores on a trained network share that
1/sqrt(C) scale. That is how the paper's ResNet-50 lost 52.5 % of its parameters for 30 % of its
filters, where a uniform 30 % removes 37 %.

The networks are torchvision's with a 10-class head; the paper's counts mix conventions (VGG,
SqueezeNet and DenseNet121 match 1000-class heads, AlexNet, ResNet18 and ResNet50 10-class ones), so
the 1000-class count is printed too. MACs are fvcore's (a multiply-add is one).

    python scripts/taylor_structure.py [--share 0.3] [--steps 6] [--size 224]
    python scripts/taylor_structure.py --render results/table-taylor/structure.json   (its .md again, counting nothing)
Writes results/table-taylor/structure.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rescomp import checkpoint, provenance  # noqa: E402
from rescomp.compress.prune import prune  # noqa: E402
from rescomp.measure import count_macs, count_params  # noqa: E402
from rescomp.models import build_model  # noqa: E402

# Martineau, Table 2: (FLOPs G, params M) at 0 % and 30 %.
PAPER = {
    "vgg16": ((17.31, 138.3), (10.55, 80.5)),
    "alexnet": ((0.815, 57.0), (0.500, 47.9)),
    "resnet18": ((1.83, 11.18), (1.40, 7.53)),
    "squeezenet1_1": ((0.516, 1.24), (0.511, 1.23)),
    "densenet121": ((2.91, 7.98), (2.14, 6.12)),
    "resnet50": ((4.14, 23.53), (2.86, 11.18)),
}
# Table 2's Diff column as printed (FLOPs %, params %): two differ from its own 0 % and 30 % counts (VGG's
# params, 138.3 -> 80.5, is -41.8 %; DenseNet's FLOPs, 2.91 -> 2.14, is -26.5 %); the table shows the print
PAPER_DIFF = {"vgg16": (-39.1, -42.8), "alexnet": (-38.7, -16.0), "resnet18": (-23.5, -32.6),
              "squeezenet1_1": (-0.97, -0.81), "densenet121": (-26.4, -23.3), "resnet50": (-30.9, -52.5)}


def widest_share(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, float]:
    """Share of each top-level stage's conv filters removed (layer1..layer4 / features / ...)."""
    def per_stage(m):
        out: dict[str, int] = {}
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                out[n.split(".")[0]] = out.get(n.split(".")[0], 0) + mod.out_channels
        return out
    b, a = per_stage(before), per_stage(after)
    return {k: round(1 - a[k] / b[k], 4) for k in b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--share", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default="results/table-taylor")
    p.add_argument("--render", metavar="JSON", help="re-write structure.md beside a committed structure.json from it, "
                   "counting nothing")
    args = p.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        checkpoint.atomic_write_text(Path(args.render).with_name("structure.md"), render(data, data["rows"]))
        return
    t0 = time.perf_counter()
    rows = []
    for arch, ((f0, p0), (f30, p30)) in PAPER.items():
        spec = {"arch": arch, "num_classes": 10}
        torch.manual_seed(0)
        model = build_model(spec).eval()
        row = {"arch": arch, "params_1000_classes": count_params(build_model({**spec, "num_classes": 1000})),
               "params_0": count_params(model), "macs_0": count_macs(model, args.size),
               "paper_gflops_0": f0, "paper_mparams_0": p0, "paper_gflops_30": f30, "paper_mparams_30": p30}
        for policy in ("paper", "coupled"):
            kw = dict(criterion="l1", policy=policy, exclude=[], batches=[], seed=0, image_size=args.size)
            pruned, _, info = prune(model, spec, share=args.share, allocation="uniform", **kw)
            row[f"params_30_{policy}"], row[f"macs_30_{policy}"] = count_params(pruned), count_macs(pruned, args.size)
            row[f"prunable_{policy}"], row[f"removed_{policy}"] = info["prunable"], info["removed"]
            g, g_spec = model, spec
            for _ in range(args.steps):
                g, g_spec, _ = prune(g, g_spec, share=args.share / args.steps, base_prunable=info["prunable"], **kw)
            row[f"params_30_{policy}_global"], row[f"macs_30_{policy}_global"] = count_params(g), count_macs(g, args.size)
            row[f"stage_share_removed_{policy}_global"] = widest_share(model, g)
        rows.append(row)
        print(arch, {k: v for k, v in row.items() if k.startswith(("params", "macs"))}, flush=True)
    meta = {**provenance.stamp("cpu"), "share": args.share, "steps": args.steps, "image_size": args.size,
            "wall_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    checkpoint.atomic_write_text(out / "structure.md", render(meta, rows))
    checkpoint.atomic_write_text(out / "structure.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    """structure.md from what structure.json keeps (`--render` re-makes it from there)."""
    red = lambda a, b: f"{100 * (b / a - 1):+.1f} %"  # noqa: E731
    lines = ["# Taylor pruning, Table 2 structure: a counterfactual at 224x224", "",
             f"Untrained torchvision networks (10-class heads), {100 * meta['share']:.0f} % of each policy's prunable "
             f"filters removed: **uniform** (every prunable layer loses the same share) or **global** ({meta['steps']} "
             f"steps ranked across layers after per-layer L2 normalisation, l1 criterion). Not the paper's runs and "
             f"not ours (those are in table.md, counted at 224 px with the paper's head): it shows how much the "
             f"allocation alone moves the counts. Reduction = change against the unpruned network; M = 10^6.", "",
             "| model | params 0 % (M) | paper | paper's reduction | paper policy, uniform | global | coupled, uniform | "
             "global | MACs 0 % (G) | paper | paper's reduction | paper policy, uniform | global | coupled, uniform | global |",
             "|" + "---|" * 15]
    printed = lambda v: f"{v:+.2f} %" if abs(v) < 1 else f"{v:+.1f} %"  # noqa: E731
    misprinted = []
    for r in rows:
        p0, m0 = r["params_0"], r["macs_0"]
        flops_diff, params_diff = PAPER_DIFF[r["arch"]]
        for what, diff, a, b in (("params", params_diff, r["paper_mparams_0"], r["paper_mparams_30"]),
                                 ("FLOPs", flops_diff, r["paper_gflops_0"], r["paper_gflops_30"])):
            if abs(100 * (b / a - 1) - diff) > 0.05 + (0.005 if abs(diff) < 1 else 0):
                misprinted.append(f"{r['arch']}'s {what} {printed(diff)} ({a} -> {b} is {red(a, b)})")
        cells = [r["arch"], f"{p0 / 1e6:.2f}", str(r["paper_mparams_0"]), printed(params_diff)]
        cells += [red(p0, r[f"params_30_{pol}{g}"]) for pol in ("paper", "coupled") for g in ("", "_global")]
        cells += [f"{m0 / 1e9:.3f}", str(r["paper_gflops_0"]), printed(flops_diff)]
        cells += [red(m0, r[f"macs_30_{pol}{g}"]) for pol in ("paper", "coupled") for g in ("", "_global")]
        lines.append("| " + " | ".join(cells) + " |")
    if misprinted:
        lines += ["", f"The paper's reductions are its Table 2's Diff column as printed; {len(misprinted)} of them "
                  "differ from its own 0 % and 30 % counts: " + "; ".join(misprinted) + "."]
    r50 = next(r for r in rows if r["arch"] == "resnet50")["stage_share_removed_paper_global"]
    lines += ["", "Share of each ResNet-50 stage's filters removed under global ranking (paper policy): "
              + ", ".join(f"{k} {100 * v:.0f} %" for k, v in r50.items() if k.startswith("layer")) + ".", "",
              "As in the paper, whose tool could reduce only SqueezeNet's first conv, the paper policy leaves a",
              "conv whose output several layers read (each fire module's squeeze conv, read by both expand",
              "convs), as well as those meeting an addition or a concatenation; SqueezeNet is version 1.1, whose",
              "1000-class counts are the paper's. The paper's VGG, SqueezeNet and DenseNet parameter counts are",
              "those of 1000-class heads (1000-class counts in structure.json); its FLOPs for SqueezeNet (0.516 G)",
              "and AlexNet (0.815 G) match no count of ours (fvcore's multiply-adds), so compare reductions there.", "",
              f"How made: `{meta['command']}` at commit {meta['commit']}, torch {meta['torch']}, device {meta['device']}, "
              f"{meta['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
