"""`rescomp compare`: every technique and chain against one baseline, with the Pareto front marked.

Each network a run made is a point: a trained network, each step of a prune or layer-drop run (its
step 0 is the network it started from, already a point of the run before it), each layer-drop
baseline, an int8 network. A point is named by its chain: the stages that made its network, followed back
through each run's recorded input (run_stages), else read from its run folder's name, which every stage
extends (rescomp.runner): `exp-prune-paper-taylor-custom-ptq` is "prune → int8". Costs are
params, MACs, bytes (tensors as torch.save writes them) and the batch-1 CPU latency on the fastest
runtime that timed that network (named beside it). A point is on the Pareto front of a cost when no
other point has a lower or equal cost and a higher top-1, i.e. no cheaper network is more accurate. A
network whose MACs are counted as its input network's (int8: each an int8 one; magnitude-pruned, weight-
shared, binarized: dense MACs of zeros, shared or sign weights) is left out of the MACs front: it would tie
with that network on cost, and the front would go to whichever top-1 the noise put higher.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, get_args

from rescomp.checkpoint import write_files
from rescomp.config_sections import MagnitudePruneConfig, QuantizeConfig
from rescomp.errors import ConfigError
from rescomp.measure import RUNTIME_COLUMN, fastest_column
from rescomp.plots import caption, curve_style, png, pyplot, set_title
from rescomp.report import finite, noisy, placed

RUNTIMES = {column: runtime for runtime, column in RUNTIME_COLUMN.items()}  # latency_ms_<column>_b1 -> runtime
COSTS = [("macs", "MACs (M)", 1e-6), ("size_bytes", "size (kB)", 1e-3), ("latency_ms_b1", "CPU latency, batch 1, fastest runtime (ms)", 1)]
STAGE_TOKENS = [(re.compile(r"-prune-[a-z]+-[a-z0-9_]+-[a-z0-9]+"), "prune"),
                (re.compile(r"-layerdrop-[a-z0-9_]+-k\d+-n\d+"), "layer-drop"),
                (re.compile(rf"-mprune-({'|'.join(get_args(MagnitudePruneConfig.model_fields['scope'].annotation))})-\d+"),
                 "magnitude-prune"),
                (re.compile(r"-share-\d+b\d+b"), "weight-share"),
                (re.compile(r"-binarize(-bq)?(-frozen)?"), "binarize"),
                (re.compile(r"-(ptq|qat)(-(pt2e|onnxruntime|fbgemm|qnnpack))?$"), "int8")]


def chain_of(folder: str, spec: Any = None, stages: Optional[list[str]] = None) -> str:
    """The stages after training that made a run's network, in order: 'prune → layer-drop → int8', as its
    recorded inputs say (`stages`, run_stages), else as the run folder's name spells them; a network trained
    with separable convs (its arch `spec` says so) starts 'depthwise separable'."""
    if stages is None:
        stages = [label for _, label in sorted((m.start(), label) for pattern, label in STAGE_TOKENS
                                              for m in pattern.finditer(folder))]
    separable = spec.get("separable") if isinstance(spec, dict) else None
    start = [f"{separable['mode']} separable"] if separable else []
    return " → ".join(start + stages) or "train"


STAGE_LABELS = {"prune": "prune", "layerdrop": "layer-drop", "magnitude_prune": "magnitude-prune",
                "weight_share": "weight-share", "binarize": "binarize", "ptq": "int8", "qat": "int8"}


def run_stages(run_dir: Path, summary: dict[str, Any]) -> Optional[list[str]]:
    """The stages that made run_dir's network after training, oldest first, followed back through each run's
    recorded input (its summary's `inputs`) to a training run; None where a run records no single input to
    follow (made before runs kept one, or a folder copied away from its inputs): the name says it then. A
    stage's own command given a pruned network (prune.checkpoint) names its folder after the config alone,
    so its name said 'int8' where the network was pruned, then quantized."""
    from rescomp.rundir import _at, read_summary, run_of

    stages: list[str] = []
    for _ in range(32):  # a chain is a few stages; a loop of records is no chain
        if summary.get("stage") == "train":
            return stages[::-1]
        inputs = list(summary.get("inputs") or {})
        if summary.get("stage") not in STAGE_LABELS or len(inputs) != 1:
            return None
        stages.append(STAGE_LABELS[summary["stage"]])
        run_dir = run_of(_at(run_dir, inputs[0]))
        if run_dir is None:
            return None
        try:
            summary = read_summary(run_dir / "summary.json")
        except ConfigError:  # a summary that is not one: the name says the chain
            return None
    return None


def _fastest_latency(r: dict[str, Any]) -> tuple[Optional[float], Optional[str], Optional[float]]:
    """A row's batch-1 latency on its fastest runtime, that runtime, and the latency's interquartile range."""
    if not any(f"latency_ms_{c}_b1" in r for c in RUNTIMES):
        return None, None, None
    column = fastest_column(r, 1)
    return r[f"latency_ms_{column}_b1"], RUNTIMES[column], r.get(f"latency_iqr_ms_{column}_b1")


TIMING_KEYS = ("latency_", "speedup_", "fastest_runtime_", "fp32_latency_", "fp32_fastest_", "reference_",
               "forward_ms_", "backward_ms_")


def points(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per network the runs made, with its chain, costs and provenance."""
    out = []
    for s in summaries:
        multi = "rows" in s
        for r in s["rows"] if multi else [s]:
            if multi and r.get("step") == 0 and r.get("method", "layer-drop") == "layer-drop":
                continue  # the network the run started from
            latency, runtime, spread = _fastest_latency(r)
            chain = chain_of(s["name"], s["arch"] if isinstance(s.get("arch"), dict) else s.get("start_arch"),
                             s.get("_stages"))
            if multi and r.get("method", "layer-drop") != "layer-drop":
                chain += f" ({r['method']} baseline)"
            out.append({
                "chain": chain, "run": s["name"], "step": r.get("step") if multi else None,
                "network": r.get("row") or s.get("row") or s["name"], "top1": r["top1"],
                # a network stored in its own format (Deep Compression, binarized) is as big as that file
                "params": r.get("params"), "macs": r.get("macs"), "size_bytes": r.get("stored_bytes", r.get("size_bytes")),
                "latency_ms_b1": latency, "latency_runtime": runtime, "latency_iqr_ms_b1": spread,
                **{k: s.get(k) for k in ("stage", "seed", "config_hash", "commit", "torch", "device", "profile", "dataset",
                                         "command", "wall_seconds")},
                # every timing the run made (other batch sizes, runtimes, the interleaved reference and
                # speed-ups), so that what its notes say of speed can be read from the JSON
                **{k: v for k, v in r.items() if k.startswith(TIMING_KEYS)},
            })
    if not out:
        raise ConfigError("these runs hold no networks to compare")
    return out


INT8 = get_args(QuantizeConfig.model_fields["method"].annotation)  # an int8 network's stage: ptq, qat
# the stages whose points a cost's front leaves out: those whose MACs are their input network's (docstring)
OFF_FRONT = {"macs": (*INT8, "magnitude_prune", "weight_share", "binarize")}


def pareto(pts: list[dict[str, Any]], cost: str) -> set[int]:
    """Indices of the points no other point beats: none with a lower or equal cost has a higher top-1
    (of points with equal cost and top-1, the first). Points without a place on the cost's axis (`placed`),
    as in the report's plots, or of a stage the cost's front leaves out (OFF_FRONT), are on no front."""
    ranked = sorted((i for i, p in enumerate(pts) if placed(p, cost) and p.get("stage") not in OFF_FRONT.get(cost, ())),
                    key=lambda i: (pts[i][cost], -pts[i]["top1"]))
    front, best = set(), float("-inf")
    for i in ranked:
        if pts[i]["top1"] > best:
            front.add(i)
            best = pts[i]["top1"]
    return front


def against(pts: list[dict[str, Any]], baseline: Optional[str]) -> list[dict[str, Any]]:
    """Each point with its top-1 change and cost ratios over the baseline: the run named `baseline`, else
    the one trained network among the points."""
    if baseline:
        baseline = Path(baseline).name or baseline  # runs/r20/ names the run r20, as its folder does
    base = [p for p in pts if p["run"] == baseline] if baseline else [p for p in pts if p["stage"] == "train"]
    if len(base) != 1:
        runs = ", ".join(sorted({p["run"] for p in pts}))
        what = (f"--baseline '{baseline}' is no run of one network among these" if baseline
                else f"these runs hold {len(base)} trained networks, so the baseline is not clear")
        raise ConfigError(f"{what}; pass --baseline RUN, one of: {runs}")
    b = base[0]
    if other := sorted({p["run"] for p in pts if p.get("dataset") != b.get("dataset")}):  # a top-1 of other images
        raise ConfigError(f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''} trained on another dataset than "
                          f"the baseline {b['run']} ({b.get('dataset')}), so their top-1 and fronts say nothing against "
                          f"it; compare the runs of one dataset (pass their folders)")
    for p in pts:
        p["top1_delta"] = p["top1"] - b["top1"]
        for cost, _, _ in COSTS[:2]:
            p[f"{cost}_ratio"] = p[cost] / b[cost] if p.get(cost) and b.get(cost) else None
        p["baseline"] = p is b
    for cost, _, _ in COSTS:
        for i in pareto(pts, cost):
            pts[i][f"pareto_{cost}"] = True
    return pts


def markdown(table: str, pts: list[dict[str, Any]], plot: Optional[str], notes: Optional[str] = None) -> str:
    b = next(p for p in pts if p["baseline"])
    lines = [f"# {table}: every technique and chain against {b['run']}", "",
             f"Baseline: **{b['network']}** (run {b['run']}), top-1 {b['top1']:.2f} %. Δ top-1 is in points; "
             f"MACs and size are also given as a share of the baseline's (/ base); size is the tensors as torch.save writes them, or, for a network stored in its own format (Deep Compression, binarized), that file, whose "
             f"container is leaner (a ResNet-56's dense file is 2.2-2.5 % under torch.save's bytes of the same tensors). An int8 network's params and MACs are its fp32 network's (the same layers, "
             f"their multiply-accumulates in int8); so are a magnitude-pruned, weight-shared or binarized network's, "
             f"dense. None of these is on a MACs front: each would tie with its input network on cost and win or lose "
             f"by noise. ◆ marks the Pareto front of a cost: no "
             f"cheaper network is more accurate. Latency: batch 1, on the fastest runtime that timed the network.", "",
             "| # | chain | network | top-1 % | Δ top-1 | params | MACs (M) | MACs / base | size (kB) | size / base | latency ms (runtime) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    mark = lambda p, k: " ◆" if p.get(f"pareto_{k}") else ""  # noqa: E731
    for n, p in enumerate(pts, 1):
        lat = f"{p['latency_ms_b1']:.2f} ({p['latency_runtime']}){mark(p, 'latency_ms_b1')}" if p["latency_ms_b1"] else "–"
        fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {n} | {p['chain']} | {p['network']} | {p['top1']:.2f} | {p['top1_delta']:+.2f} | "
                     f"{fmt(p['params'], ',')} | {fmt(p['macs'] and p['macs'] / 1e6, ',.2f')}{mark(p, 'macs')} | "
                     f"{fmt(p['macs_ratio'], '.2f')} | {fmt(p['size_bytes'] and p['size_bytes'] / 1e3, ',.1f')}"
                     f"{mark(p, 'size_bytes')} | {fmt(p['size_bytes_ratio'], '.2f')} | {lat} |")
    spread = [str(n) for n, p in enumerate(pts, 1) if noisy(p, "latency_ms_b1")]
    if spread:
        lines += ["", f"The latencies of rows {', '.join(spread)} spread over more than their own value (the interquartile "
                      f"range of their repeats): they say nothing, are on no latency front and are not drawn."]
    if plot:
        lines += ["", f"![top-1 against MACs, bytes and latency, Pareto fronts marked]({plot})"]
    if notes:
        lines += ["", "## What these points can and cannot show", "", notes.strip()]
    lines += ["", "## Provenance", "", "Each point: the run that made it (a step of it, where the run has steps), its "
              "seed, config hash, commit and device; the run's wall time covers all of its steps.", "",
              "| # | run | step | seed | config hash | commit | device | run wall s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p['run']} | {'' if p['step'] is None else p['step']} | {p['seed']} | {p['config_hash']} | "
              f"{p['commit']} | {p['device']} | {p['wall_seconds'] or 0:.0f} |" for n, p in enumerate(pts, 1)]
    commands = list(dict.fromkeys(p["command"] for p in pts if p.get("command")))
    lines += ["", "Commands that made these runs (a chain's command makes every stage of it):", ""]
    lines += [f"- `{c}`" for c in commands]
    return "\n".join(lines) + "\n"


def plot(table: str, pts: list[dict[str, Any]]) -> Optional[bytes]:
    fig = plot_figure(table, pts)
    return None if fig is None else png(fig)


def plot_figure(table: str, pts: list[dict[str, Any]]):
    """Top-1 against MACs, bytes and latency: every point numbered as in the table and coloured by
    chain (an int8 one hollow), the Pareto front of each cost drawn through its points; None where no
    cost has a value."""
    panels = [c for c in COSTS if any(finite(p.get(c[0])) for p in pts)]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    chains = list(dict.fromkeys(p["chain"] for p in pts))
    handles = {}
    for ax, (cost, label, scale) in zip(axes[0], panels):
        for n, p in enumerate(pts, 1):
            if not placed(p, cost):
                continue
            look = curve_style(chains.index(p["chain"]))  # int8 hollow: its fp32 network's point shows beneath it
            (h,) = ax.plot([p[cost] * scale], [p["top1"]], linestyle="none", markersize=6, **look,
                           **({"markerfacecolor": "none"} if p.get("stage") in INT8 else {}))
            handles.setdefault(p["chain"], h)
            ax.annotate(str(n), (p[cost] * scale, p["top1"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = sorted((p[cost] * scale, p["top1"]) for p in pts if p.get(f"pareto_{cost}"))
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black", alpha=0.5, linewidth=1)
        ax.plot([x for x, _ in front], [y for _, y in front], linestyle="none", marker="o", markersize=11,
                markerfacecolor="none", markeredgecolor="black", alpha=0.6)  # ringed: a front of one point shows too
        left_out = sum(noisy(p, cost) for p in pts)
        ax.set_xlabel(label + (f"\n{left_out} left out: spread > latency" if left_out else ""))
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               frameon=False, title="chain (numbers: rows of compare.md;\nhollow: int8)",
               title_fontsize=8)
    set_title(fig, f"{table}: top-1 against cost, Pareto front ringed and joined in black", caption(pts, latency=True))
    return fig


DERIVED = ("top1_delta", "baseline", *(f"{cost}_ratio" for cost, _, _ in COSTS[:2]))  # `against`'s, with pareto_*


def rendered(path: Path) -> tuple[list[dict[str, Any]], str]:
    """A committed comparison's points as `points` made them, and its baseline run, from its compare.json
    (or the folder that holds it): to render it again after a change to the renderer or to its notes,
    without the runs."""
    path = path / "compare.json" if path.is_dir() else path
    try:
        pts = json.loads(path.read_text())
        base = [p["run"] for p in pts if p.get("baseline")]
        if len(base) != 1 or not all(finite(p.get("top1")) for p in pts):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"'{path}' is not a compare.json that `rescomp compare` wrote ({type(e).__name__}); "
                          f"pass run folders, or a results/<table> folder that holds one") from None
    pts = [{k: v for k, v in p.items() if k not in DERIVED and not k.startswith("pareto_")} for p in pts]
    for p in pts:  # a point made before points kept the spread of their fastest latency: from its timings
        if "latency_iqr_ms_b1" not in p:
            p["latency_iqr_ms_b1"] = _fastest_latency(p)[2]
    return pts, base[0]


def of_profile(items: list[dict[str, Any]], profile: Optional[str]) -> list[dict[str, Any]]:
    """The run summaries or points made with config profile `profile` (None: all; paper: no profile), or
    ConfigError where there are none."""
    if profile is None:
        return items
    kept = [s for s in items if (s.get("profile") or "paper") == profile]
    if not kept:
        raise ConfigError(f"none of these runs was made with profile '{profile}'; drop --profile, or run the "
                          f"table's configs with --profile {profile}")
    return kept


def collect(targets: list[str], runs: Path, baseline: Optional[str], profile: Optional[str]) -> list[dict[str, Any]]:
    """The points of `rescomp compare TARGETS`, against their baseline: of the runs the targets name (run
    folders, folders of runs, a table name looked up in `runs`), or of one committed comparison (a
    results/<table> folder or its compare.json), whose baseline it keeps unless another is given."""
    from rescomp.report import find_runs, load_rows, unique_runs

    one = Path(targets[0])
    if len(targets) == 1 and ((one / "compare.json").is_file() or (one.name == "compare.json" and one.is_file())):
        pts, kept = rendered(one)
        return against(of_profile(pts, profile), baseline or kept)
    dirs = unique_runs(d for t in targets for d in find_runs(t, runs))  # as load_rows takes them
    summaries = [{**s, "_stages": run_stages(d, s)} for d, s in zip(dirs, load_rows(dirs))]
    return against(points(of_profile(summaries, profile)), baseline)


def write(table: str, pts: list[dict[str, Any]], out_root: Path, notes: Optional[str] = None) -> Path:
    """results/<table>/compare.{md,csv,json} and pareto.png, rendered in memory first, then each written
    atomically, as rescomp.report.write_table does: a failure leaves the old files."""
    from rescomp.report import csv_text

    image = plot(table, pts)
    files = {"compare.md": markdown(table, pts, "pareto.png" if image is not None else None, notes).encode(),
             "compare.csv": csv_text(pts, list(dict.fromkeys(k for p in pts for k in p))).encode(),
             "compare.json": json.dumps(pts, indent=2).encode(), "pareto.png": image}
    out = out_root / table
    write_files(out, {name: blob for name, blob in files.items() if blob is not None})
    if image is None:
        (out / "pareto.png").unlink(missing_ok=True)  # an earlier comparison's plot, which these points do not make
    return out
