"""Plots of a table's rows (report) and of compare's points: top-1 against each cost, one curve per series.

Every figure says what made its data in its subtitle (caption): dataset, images, profile, epochs, seeds, and
the CPU a latency was timed on. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from rescomp.report import RUNTIME_HEADERS, experiment, finite, noisy, placed, timed_runs, timing_marks, timing_of


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # the legend beside the axes included
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _span(values: list[Any], what: str) -> str | None:
    vals = sorted({v for v in values if finite(v)})
    if not vals:
        return None
    fmt = lambda v: f"{v:,g}" if isinstance(v, float) else f"{v:,}"  # noqa: E731
    return f"{what} {fmt(vals[0])}" if len(vals) == 1 else f"{what} {fmt(vals[0])}–{fmt(vals[-1])}"


def caption(rows: list[dict[str, Any]], latency: bool = False) -> str:
    """What data and budget made these rows, for a plot's subtitle: dataset, images, profile, epochs,
    seeds, and the device for latencies."""
    one = lambda k: sorted({str(r[k]) for r in rows if r.get(k) is not None})  # noqa: E731
    data = ", ".join(one("dataset")) or "?"
    train, test = _span([r.get("train_images") for r in rows], ""), _span([r.get("test_images") for r in rows], "")
    if train and test:
        data += f" ({train.strip()} training / {test.strip()} test images)"
    if one("profile"):
        data += f", profile {', '.join(one('profile'))}"
    budget = [b for b in (_span([r.get("epochs") for r in rows if r.get("stage", "train") in ("train", "layerdrop")], "epochs"),
                          _span([r.get("finetune_epochs_total") for r in rows], "fine-tune epochs")) if b]
    seeds = sorted({str(r.get("seed")) for r in rows if r.get("seed") is not None})
    parts = [data, ", ".join(budget) or None, (f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(seeds)}") if seeds else None]
    line = "; ".join(p for p in parts if p)
    targets = lambda r: [t for t in r.get("plan") or [] if isinstance(t, dict) and t.get("target") is not None]  # noqa: E731
    if any(len(targets(r)) > 1 for r in rows):
        line += "\neach target share is pruned on its own from the network the run starts from: a curve joins separate prunes"
    timed = sorted({t[0] for t in map(timing_of, rows) if t is not None})
    if latency and timed:
        line += "\nlatency on " + "; ".join(timed)
        sessions = len({m for m in timing_marks(rows) if m})
        if sessions:
            line += f"; timed in {sessions} sessions (marked in table.md): latencies of two do not compare"
        if len(timed_runs(rows)) > 1:
            line += (", and" if sessions else ";") + (" each run timed in its own process, minutes apart: two runs' "
                                                      "latencies differ by the machine's drift too")
    return line


def set_title(fig, title: str, subtitle: str) -> None:
    fig.suptitle(f"{title}\n{subtitle}", fontsize=9, y=1.0, va="bottom")


def curves_of(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each curve: a series of one run (its seeds merged), named by the series, prefixed by the
    architecture where the rows' architectures differ and followed by the run where several runs give the
    series (never one line through several runs' networks); a row outside any series is its own point."""
    arch = lambda r: r["arch"].get("arch") if isinstance(r.get("arch"), dict) else r.get("arch")  # noqa: E731
    several = len({str(arch(r)) for r in rows}) > 1
    keyed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        name = (f"{arch(r)}: {r['series']}" if several else str(r["series"])) if r.get("series") else str(r.get("row"))
        keyed.setdefault((name, experiment(r)), []).append(r)
    shared = [name for name, _ in keyed]
    return {(name if shared.count(name) == 1 else f"{name} ({run})"): curve for (name, run), curve in keyed.items()}


def curve_style(i: int) -> dict[str, Any]:
    """The i-th curve's colour and marker: tab20's 20 colours (its 10 strong ones first, then their light
    pairs, so that neighbours differ), then the next marker."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    palette = tab20[0::2] + tab20[1::2]
    return {"color": palette[i % 20], "marker": "osD^vP*Xph"[(i // 20) % 10]}


def plot_curves(rows: list[dict[str, Any]], panels: list[tuple[str, str, float, bool]], title: str,
                latency: bool = False, curves: Optional[dict[str, list[dict[str, Any]]]] = None,
                log_x: bool = False) -> bytes | None:
    fig = curves_figure(rows, panels, title, latency, curves, log_x)
    return None if fig is None else png(fig)


def curves_figure(rows: list[dict[str, Any]], panels: list[tuple[str, str, float, bool]], title: str,
                  latency: bool = False, curves: Optional[dict[str, list[dict[str, Any]]]] = None,
                  log_x: bool = False):
    """Top-1 against each panel's x column (key, axis label, scale, inverted), one curve (or point) per
    curves_of entry (or per given `curves`), its name in one legend beside the axes: no labels on the points
    to collide, and a legend entry only for a curve with a point. None where no panel has a point."""
    # a panel with any value stays, even where every one is left out (its label then says why it is empty)
    panels = [p for p in panels if any(finite(r.get(p[0])) and finite(r.get("top1")) for r in rows)]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    handles = {}
    for i, (name, curve) in enumerate((curves if curves is not None else curves_of(rows)).items()):
        for ax, (key, _, scale, _) in zip(axes[0], panels):
            # in the rows' own order (steps, targets, depths), not sorted by x: a curve is a path. Latencies
            # are points, not joined: one that does not fall at every step would read as a trend
            pts = [(r[key] * scale, r["top1"]) for r in curve if placed(r, key)]
            if pts:
                joined = len(pts) > 1 and not key.startswith("latency_ms_")
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="-" if joined else "none",
                                  markersize=5, **curve_style(i))
                handles.setdefault(name, line)
    for ax, (key, label, _, invert) in zip(axes[0], panels):
        on, left_out = sum(placed(r, key) for r in rows), sum(noisy(r, key) for r in rows)
        if on < len(rows):  # a panel that leaves rows out says how many, and why
            why = [f"{on} of {len(rows)} rows"] + ([f"{left_out} left out: spread > latency"] if left_out else [])
            label += "\n" + "; ".join(why)
        ax.set_xlabel(label + (" (decreasing →)" if invert else ""))
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        if invert:
            ax.invert_xaxis()
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
               frameon=False)
    set_title(fig, title, caption(rows, latency))
    return fig


def storage_curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Deep Compression's curves: the rows of each `storage_curve` (a network's pruning steps, then its
    shared and Huffman-coded file), in the rows' order, each at the bytes it is stored in."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("storage_curve") and r.get("stored_bytes"):
            curves.setdefault(r["storage_curve"], []).append(r)
    return curves


# MACs, then batch-1 latency on each runtime that timed a row (its own panel: one runtime's milliseconds
# are not another's, and each row is timed on the runtimes it runs on)
COST_PANELS = [("macs", "MACs (M)", 1e-6, False)] + [
    (f"latency_ms_{column}_b1", f"{header.removesuffix(' ms')} CPU latency, batch 1 (ms)", 1, False)
    for column, header in RUNTIME_HEADERS.items()]
SERIES_PLOTS = {  # file: (x column, axis label, scale, smaller x is further along)
    "accuracy_vs_layers.png": ("layers", "layers", 1, True),
    "accuracy_vs_share.png": ("share", "target share of prunable filters (%)", 100, False),
    "accuracy_vs_macs.png": ("macs", "MACs (M)", 1e-6, True),
}


def plot_gates_png(stats: dict[str, Any], title: str, subtitle: str) -> bytes:
    """The learned w of the full network: histogram (paper, Figure 6) and |w| vs output norm (Figure 5)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = list(stats["gates"].values())
    axes[0].hist(w, bins=20)
    axes[0].set_xlabel("learned w")
    axes[0].set_ylabel("units")
    names = list(stats["gates"])
    axes[1].scatter([abs(stats["gates"][n]) for n in names], [stats["output_norm"][n] for n in names])
    axes[1].set_xlabel("|w|")
    axes[1].set_ylabel("mean L2 norm of w·F(x)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    set_title(fig, title, subtitle)
    return png(fig)


def gates_plots(summaries: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """The learned-gates plots of the runs (one per trained network they start from): statistics, title, caption."""
    unique = {json.dumps(s["full_stats"], sort_keys=True): s for s in summaries if s.get("full_stats")}
    return [{"full_stats": s["full_stats"], "title": f"{table}: learned gates w of the full network ({s.get('arch')})",
             "caption": caption([{**s, "stage": "train", "epochs": s.get("full_epochs")}])} for s in unique.values()]


def plot_files(table: str, rows: list[dict[str, Any]], gates: list[dict[str, Any]]) -> dict[str, Optional[bytes]]:
    """Every plot of a table, by file name (None: no point to draw): top-1 against MACs and each runtime's
    latency; against the bytes stored where rows give a storage curve; against layers, target share or MACs
    where rows give a series; one learned-gates plot per trained network the runs start from."""
    files = {"accuracy_vs_cost.png": plot_curves(rows, COST_PANELS, f"{table}: top-1 against MACs and CPU latency",
                                                 latency=True)}
    storage = storage_curves(rows)
    if storage:
        files["accuracy_vs_storage.png"] = plot_curves(
            rows, [("stored_bytes", "bytes stored (kB, log scale)", 1e-3, True)],
            f"{table}: top-1 against the bytes each network is stored in", curves=storage, log_x=True)
    for name, (x, label, scale, invert) in SERIES_PLOTS.items():
        if any("series" in r and r.get(x) is not None for r in rows) and (x != "macs" or any("share" in r for r in rows)):
            files[name] = plot_curves([r for r in rows if "series" in r], [(x, label, scale, invert)],
                                      f"{table}: top-1 against {label.split(' (')[0]}")
    for i, g in enumerate(gates):  # runs that start from one trained network share one plot
        files[f"gates{i or ''}.png"] = plot_gates_png(g["full_stats"], g["title"], g["caption"])
    return files
