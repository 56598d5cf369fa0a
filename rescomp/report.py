"""Rows -> results/<table>/ as Markdown, CSV, JSON and a PNG plot, each row with its provenance.

A row is a run's summary.json. Where the run's config gives the paper's numbers (report.paper), the
table prints the paper's value beside ours and the difference (ours - paper).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from rescomp.checkpoint import atomic_write_bytes
from rescomp.errors import ConfigError

COLUMNS = ["row", "arch", "dataset", "profile", "epochs", "share", "removed", "removed_coupled_channels", "finetune_epochs_total",
           "layers", "units_deleted", "seeds", "top1", "top1_std", "loss", "params", "params_with_bn_stats", "macs", "paper_input", "paper_head",
           "macs_paper_input", "params_paper_head", "size_bytes", "compression", "latency_ms_cpu_b1",
           "latency_ms_cpu_b64", "act_peak_bytes_b1", "gpu_images_per_s_b256", "train_seconds", "wall_seconds",
           "seed", "config_hash", "commit", "torch", "device"]
# Markdown headers with units; CSV and JSON keep the raw names and units.
MD_HEADERS = {"top1_std": "top-1 sd", "share": "pruned %", "removed": "filters removed", "removed_coupled_channels": "coupled channels removed",
              "finetune_epochs_total": "fine-tune epochs", "paper_input": "counted at px", "paper_head": "counted with classes",
              "macs_paper_input": "MACs (M) at paper's input", "params_paper_head": "params with paper's head", "top1": "top-1 %", "params": "params", "params_with_bn_stats": "params + BN stats", "macs": "MACs (M)", "size_bytes": "size (kB)",
              "act_peak_bytes_b1": "act. peak kB", "gpu_images_per_s_b256": "GPU img/s", "train_seconds": "train s"}
MD_SCALE = {"share": 100, "macs": 1e-6, "macs_paper_input": 1e-6, "size_bytes": 1e-3, "act_peak_bytes_b1": 1e-3}
# The spread behind each latency (CSV and JSON columns; in Markdown folded into the latency cell).
SPREAD = ("latency_iqr_ms", "latency_runs", "speedup_within_noise")
PROVENANCE = ["seed", "config_hash", "commit", "torch", "device", "wall_seconds", "command", "data_source"]


def find_runs(target: str, runs_root: Path) -> list[Path]:
    """Run folders named by `target`: a run folder, a folder of them, or a table name used in configs."""
    p = Path(target)
    if p.is_dir():
        return sorted(s.parent for s in p.rglob("summary.json"))
    if runs_root.is_dir():
        tagged = [s.parent for s in sorted(runs_root.rglob("summary.json"))
                  if json.loads(s.read_text()).get("table") == target]
        if tagged:
            return tagged
    raise ConfigError(f"'{target}' is neither a run folder nor a table that any run under '{runs_root}' reports to; "
                      f"pass a run folder (e.g. runs/demo-resnet20) or train a config with report.table: {target}")


def load_rows(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for d in run_dirs:
        try:
            rows.append(json.loads((d / "summary.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{d}/summary.json is unreadable ({e}); re-run that experiment") from None
    if not rows:
        raise ConfigError("no finished runs (summary.json) found to report")
    return rows


def expand(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, or per entry of a run's `rows` (a layer-drop run), carrying the run's provenance."""
    rows = []
    for s in summaries:
        common = {k: v for k, v in s.items() if k not in ("rows", "full_stats", "sections")}
        rows += [{**common, **r} for r in s["rows"]] if "rows" in s else [s]
    return rows


def aggregate_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one experiment under several seeds (same label, same stage, different seeds) become one
    row: the mean of every number, `seeds` (how many) and `top1_std` (their sample standard deviation);
    the seeds and config hashes are listed. A row with one seed is left as it is."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("row"), r.get("stage"), r.get("series")), []).append(r)
    out = []
    for group in groups.values():
        if len({r.get("seed") for r in group}) < 2:
            out += group
            continue
        merged = dict(group[0])
        for k in group[0]:
            vals = [r.get(k) for r in group]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) and len(set(vals)) > 1:
                merged[k] = sum(vals) / len(vals)
        tops = [r["top1"] for r in group]
        mean = sum(tops) / len(tops)
        merged.update(seeds=len(group), top1_std=(sum((t - mean) ** 2 for t in tops) / (len(tops) - 1)) ** 0.5,
                      seed=", ".join(str(r.get("seed")) for r in group),
                      config_hash=", ".join(str(r.get("config_hash")) for r in group))
        out.append(merged)
    return out


def add_compression(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each row's size_bytes as a share of the baseline row's (the papers' 'compression factor')."""
    base = [r for r in rows if r.get("row") == baseline]
    if not base:
        raise ConfigError(f"--baseline '{baseline}' is no row of this table; rows: {', '.join(str(r.get('row')) for r in rows)}")
    return [{**r, "compression": r["size_bytes"] / base[0]["size_bytes"]} for r in rows]


def _ours(row: dict[str, Any]) -> list[str]:
    """Our columns for a row, in table order (latencies and speed-ups for whatever batch sizes it has)."""
    batches = sorted({int(k.rsplit("b", 1)[1]) for k in row if k.startswith("latency_ms_cpu_b")})
    cols = [c for c in COLUMNS if not c.startswith("latency_ms_cpu_b")]
    at = cols.index("compression") + 1
    extra = [f"latency_ms_cpu_b{b}" for b in batches] + [f"speedup_cpu_b{b}" for b in batches if f"speedup_cpu_b{b}" in row]
    extra += [f"{k}_cpu_b{b}" for b in batches for k in SPREAD if f"{k}_cpu_b{b}" in row]
    extra += sorted(k for k in row if k.startswith(("forward_ms_b", "backward_ms_b")))
    return cols[:at] + extra + cols[at:]


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Table columns of one run: each of ours, followed by the paper's value and the difference."""
    paper = row.get("paper") or {}
    out: dict[str, Any] = {}
    for k in _ours(row) + [k for k in paper if k not in COLUMNS]:
        out[k] = row.get(k)
        if k in paper:
            out[f"{k} (paper)"] = paper[k]
            out[f"Δ {k}"] = None if row.get(k) is None else row[k] - paper[k]
    out["arch"] = row["arch"]["arch"] if isinstance(row.get("arch"), dict) else row.get("arch")
    if row.get("stage") in ("ptq", "qat"):
        out["epochs"] = row["stage"]
    return out


def column_order(flat: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' columns, each paper column right after ours."""
    keys = list(dict.fromkeys(k for f in flat for k in f))
    base = list(dict.fromkeys(k.removeprefix("Δ ").removesuffix(" (paper)") for k in keys))
    rank = {k: (base.index(k.removeprefix("Δ ").removesuffix(" (paper)")), k.startswith("Δ") * 2 + k.endswith("(paper)"))
            for k in keys}
    return sorted(keys, key=rank.__getitem__)


def header(key: str) -> str:
    if key.startswith("latency_ms_cpu_b"):
        return f"CPU ms b{key.rsplit('b', 1)[1]}"
    if key.startswith("speedup_cpu_b"):
        return f"speed-up b{key.rsplit('b', 1)[1]}"
    if key.startswith(("forward_ms_b", "backward_ms_b")):
        return f"{key.split('_')[0]} ms b{key.rsplit('b', 1)[1]}"
    if key.endswith(" (paper)") or key.startswith("Δ "):
        base = key.removeprefix("Δ ").removesuffix(" (paper)")
        return key.replace(base, MD_HEADERS.get(base, base)).replace(" (paper)", ", paper")
    return MD_HEADERS.get(key, key)


def _cell(key: str, f: dict[str, Any]) -> str:
    """A Markdown cell: latencies with ± half their interquartile range, speed-ups within it marked."""
    text = _fmt(key, f.get(key))
    if key.startswith("latency_ms_cpu_b") and f.get(key.replace("latency_ms", "latency_iqr_ms")) is not None:
        text += f" ±{f[key.replace('latency_ms', 'latency_iqr_ms')] / 2:,.2f}"
    if key.startswith("speedup_cpu_b") and f.get(key.replace("speedup", "speedup_within_noise")):
        text += " (noise)"
    return text


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "–"
    base = key.removeprefix("Δ ").removesuffix(" (paper)")
    if isinstance(v, (int, float)) and base in MD_SCALE:
        v = v * MD_SCALE[base]
    sign = "+" if key.startswith("Δ") and isinstance(v, (int, float)) and v > 0 else ""
    if isinstance(v, float):
        return f"{sign}{v:,.2f}" if abs(v) < 1e5 else f"{sign}{v:,.0f}"
    if isinstance(v, int):
        return f"{sign}{v:,}"
    return str(v).replace("|", "\\|")


SHARED = ("arch", "dataset", "profile")  # shown once above the table when every row has the same value


def markdown(table: str, rows: list[dict[str, Any]], summaries: list[dict[str, Any]] | None = None,
             notes: str | None = None) -> str:
    flat = [flatten(r) for r in rows]
    keys = [k for k in column_order(flat) if k not in PROVENANCE and not k.startswith(SPREAD)
            and any(f.get(k) is not None for f in flat)]
    common = [k for k in SHARED if k in keys and len({str(f.get(k)) for f in flat}) == 1]
    keys = [k for k in keys if k not in common]
    lines = [f"# {table}", ""]
    if common:
        lines += ["All rows: " + ", ".join(f"{k} **{flat[0][k]}**" for k in common), ""]
    lines += ["| " + " | ".join(header(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, f) for k in keys) + " |" for f in flat]
    lines += ["", "MACs are multiply-accumulates of one 1-image forward pass as fvcore counts them; size is the",
              "saved state_dict (kB = 1000 bytes); compression is size / the baseline row's size; CPU latency is",
              "the median forward time at batch 1 / 64 with threads pinned, ± half its interquartile range",
              "where measured; act. peak is the most activation memory live at once in a batch-1 forward pass;",
              "int8 rows (epochs = ptq/qat) give their speed-up over the fp32 model, the two timed interleaved in",
              "one process, marked (noise) where the two latencies' interquartile ranges overlap. Δ = ours − paper.", ""]
    if notes:
        lines += ["## What these rows can and cannot show", "", notes.strip(), ""]
    titles = [sec["title"] for s in summaries or [] for sec in s.get("sections", [])]
    for s in summaries or []:
        for sec in s.get("sections", []):
            title = sec["title"] if titles.count(sec["title"]) == 1 else f"{sec['title']} — {s.get('name')}"
            lines += [f"## {title}", "", sec["markdown"], ""]
    lines += ["## Provenance", ""]
    seen = set()
    for r in rows:
        key = (r.get("command"), r.get("config_hash"), r.get("stage"))
        if "step" in r and key in seen:  # a layer-drop run's rows share one provenance line
            continue
        seen.add(key)
        lines.append(f"- **{r.get('name') if 'step' in r else r.get('row')}**: `{r.get('command')}` — config {r.get('config_hash')}, seed {r.get('seed')}, "
                     f"commit {r.get('commit')}, torch {r.get('torch')}, device {r.get('device')}, "
                     f"wall {r.get('wall_seconds', 0):.0f} s, data {r.get('data_source')}")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    flat = [flatten(r) | {k: r.get(k) for k in PROVENANCE} for r in rows]
    keys = column_order(flat)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Top-1 against MACs and against CPU latency, one labelled point per row."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in [(axes[0], "macs", "MACs (M)"), (axes[1], "latency_ms_cpu_b1", "CPU latency, batch 1 (ms)")]:
        for r in rows:
            if r.get(key) is None:
                continue
            x = r[key] * (1e-6 if key == "macs" else 1)
            ax.scatter(x, r["top1"])
            ax.annotate(str(r["row"]), (x, r["top1"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    return _png(fig)


SERIES_PLOTS = {  # file: (x column, axis label, scale, smaller x is further along)
    "accuracy_vs_layers.png": ("layers", "layers", 1, True),
    "accuracy_vs_share.png": ("share", "share of prunable filters removed (%)", 100, False),
    "accuracy_vs_macs.png": ("macs", "MACs (M)", 1e-6, True),
}


def plot_series_png(rows: list[dict[str, Any]], x: str, label: str, scale: float, invert: bool) -> bytes:
    """Top-1 against one column, a line per series (e.g. per criterion, per method)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series in dict.fromkeys(r["series"] for r in rows if "series" in r):
        pts = sorted((r[x] * scale, r["top1"]) for r in rows if r.get("series") == series and r.get(x) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 %")
    if invert:
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_gates_png(stats: dict[str, Any]) -> bytes:
    """The learned w of the full network: histogram (paper, Figure 6) and |w| vs output norm (Figure 5)."""
    plt = _pyplot()
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
    return _png(fig)


def write_table(table: str, rows: list[dict[str, Any]], out_root: Path = Path("results"),
                baseline: str | None = None, summaries: list[dict[str, Any]] | None = None,
                notes: str | None = None) -> Path:
    """Render every file in memory first, then write each atomically: a failure leaves the old table."""
    rows = aggregate_seeds(rows)
    if baseline:
        rows = add_compression(rows, baseline)
    files = {
        "table.md": markdown(table, rows, summaries, notes).encode(),
        "table.csv": to_csv(rows).encode(),
        "table.json": json.dumps({"table": table, "rows": rows}, indent=2).encode(),
        "accuracy_vs_cost.png": plot_png(rows),
    }
    for name, (x, label, scale, invert) in SERIES_PLOTS.items():
        if any("series" in r and r.get(x) is not None for r in rows) and (x != "macs" or any("share" in r for r in rows)):
            files[name] = plot_series_png(rows, x, label, scale, invert)
    unique = {json.dumps(s["full_stats"], sort_keys=True): s["full_stats"] for s in summaries or [] if s.get("full_stats")}
    for i, stats in enumerate(unique.values()):  # runs that start from one trained network share one plot
        files[f"gates{i or ''}.png"] = plot_gates_png(stats)
    final = out_root / table
    for name, blob in files.items():
        atomic_write_bytes(final / name, lambda f, b=blob: f.write(b))
    return final
