"""Table 2 of Martineau (Taylor pruning on complex networks), structural columns: params and MACs at
224x224 before and after removing 30 % of the prunable filters, in the paper's policy and the
coupled one.

Structure alone decides these numbers once the share per layer is fixed, so every prunable group
loses the same 30 % (allocation: uniform; which filters within a layer go does not change the
counts). The networks are torchvision's with a 10-class head; the paper's counts mix conventions
(VGG, SqueezeNet and DenseNet121 match 1000-class heads, AlexNet, ResNet18 and ResNet50 10-class
ones), so the 1000-class count is printed too. MACs are fvcore's (a multiply-add is one); the paper's
"FLOPs" are close to MACs for most rows.

    python scripts/taylor_structure.py [--share 0.3] [--size 224]
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
    "squeezenet1_0": ((0.516, 1.24), (0.511, 1.23)),
    "densenet121": ((2.91, 7.98), (2.14, 6.12)),
    "resnet50": ((4.14, 23.53), (2.86, 11.18)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--share", type=float, default=0.3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default="results/table-taylor")
    args = p.parse_args()
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
            pruned, _, info = prune(model, spec, share=args.share, criterion="l1", policy=policy, exclude=[],
                                    batches=[], seed=0, image_size=args.size, allocation="uniform")
            row[f"params_30_{policy}"], row[f"macs_30_{policy}"] = count_params(pruned), count_macs(pruned, args.size)
            row[f"prunable_{policy}"], row[f"removed_{policy}"] = info["prunable"], info["removed"]
        rows.append(row)
        print(arch, {k: v for k, v in row.items() if k.startswith(("params", "macs"))}, flush=True)
    meta = {**provenance.stamp("cpu"), "share": args.share, "image_size": args.size, "wall_seconds": time.perf_counter() - t0}
    lines = ["# Taylor pruning, Table 2 structure: params and MACs at 224x224", "",
             f"{100 * args.share:.0f} % of each policy's prunable filters removed from every prunable layer "
             f"(uniform allocation). 10-class heads; M = 10^6, G = 10^9 multiply-adds (fvcore).", "",
             "The paper's claim is the reduction; our absolute counts beside its are in structure.json.", "",
             "| model | params 0 % (M) | paper | 30 %, paper policy | reduction | paper's reduction | 30 %, coupled | "
             "reduction | MACs 0 % (G) | paper | 30 %, paper policy | reduction | paper's reduction | 30 %, coupled | reduction |",
             "|" + "---|" * 15]
    red = lambda a, b: f"{100 * (b / a - 1):+.1f} %"  # noqa: E731
    for r in rows:
        p0, m0 = r["params_0"], r["macs_0"]
        lines.append(
            f"| {r['arch']} | {p0 / 1e6:.2f} | {r['paper_mparams_0']} | {r['params_30_paper'] / 1e6:.2f} | "
            f"{red(p0, r['params_30_paper'])} | {red(r['paper_mparams_0'], r['paper_mparams_30'])} | "
            f"{r['params_30_coupled'] / 1e6:.2f} | {red(p0, r['params_30_coupled'])} | {m0 / 1e9:.3f} | "
            f"{r['paper_gflops_0']} | {r['macs_30_paper'] / 1e9:.3f} | {red(m0, r['macs_30_paper'])} | "
            f"{red(r['paper_gflops_0'], r['paper_gflops_30'])} | {r['macs_30_coupled'] / 1e9:.3f} | "
            f"{red(m0, r['macs_30_coupled'])} |")
    lines += ["", "Where we differ from the paper's tool: it could reduce only SqueezeNet's first conv, where our",
              "dependency graph also prunes each fire module's squeeze conv (its output meets no addition or",
              "concatenation); the paper's VGG, SqueezeNet and DenseNet parameter counts are those of 1000-class",
              "heads; and its per-layer shares came from Taylor ranking, not a uniform 30 %, so its ResNet50",
              "(which loses 52 % of its parameters there) must have pruned its widest layers much harder.", "",
              f"How made: `{meta['command']}` at commit {meta['commit']}, torch {meta['torch']}, device {meta['device']}, "
              f"{meta['wall_seconds']:.0f} s."]
    out = Path(args.out)
    checkpoint.atomic_write_text(out / "structure.md", "\n".join(lines) + "\n")
    checkpoint.atomic_write_text(out / "structure.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
