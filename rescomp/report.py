"""Rows -> results/<table>/ as Markdown, CSV, JSON and a PNG plot, each row with its provenance.

A row is a run's summary.json. Where the run's config gives the paper's numbers (report.paper), the
table prints the paper's value beside ours and the difference (ours - paper).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from rescomp.checkpoint import write_files
from rescomp.errors import ConfigError
from rescomp.rundir import earlier_rules, read_summary, stale_input

COLUMNS = ["row", "arch", "dataset", "profile", "epochs", "method", "int8_layers", "weight_layers", "share", "removed", "removed_coupled_channels", "finetune_epochs_total",
           "layers", "units_deleted", "seeds", "top1", "top1_std", "val_top1", "loss", "fp32_top1", "top1_drop", "top1_drop_se", "agreement", "params", "params_with_bn_stats", "macs", "paper_input", "paper_head",
           "macs_paper_input", "params_paper_head", "size_bytes", "compression", "weights_kept", "weights_compression",
           "dc_dense_bytes", "dc_sparse_bytes", "dc_shared_bytes", "dc_huffman_bytes", "dc_compression", "latency_ms_cpu_b1",
           "latency_ms_cpu_b64", "act_peak_bytes_b1", "gpu_images_per_s_b256", "train_seconds", "wall_seconds",
           "seed", "config_hash", "commit", "torch", "device"]
# Markdown headers with units; CSV and JSON keep the raw names and units.
MD_HEADERS = {"top1_std": "top-1 sd", "fp32_top1": "fp32 top-1 %", "top1_drop": "top-1 drop", "top1_drop_se": "drop SE", "agreement": "same class %", "method": "method", "int8_layers": "int8 layers", "share": "pruned %", "removed": "filters removed in step", "removed_coupled_channels": "coupled channels removed in step",
              "finetune_epochs_total": "fine-tune epochs", "paper_input": "paper's input px", "paper_head": "paper's classes",
              "macs_paper_input": "MACs (M) at paper's input", "params_paper_head": "params with paper's head", "top1": "top-1 %", "val_top1": "val top-1 %", "params": "params", "params_with_bn_stats": "params + BN stats", "macs": "MACs (M)", "size_bytes": "size (kB)",
              "act_peak_bytes_b1": "act. peak kB", "weights_kept": "weights kept %", "weights_compression": "weights ×",
              "dc_dense_bytes": "dense kB", "dc_sparse_bytes": "sparse kB", "dc_shared_bytes": "shared kB",
              "dc_huffman_bytes": "Huffman kB", "dc_compression": "storage ×", "gpu_images_per_s_b256": "GPU img/s", "train_seconds": "train s"}
MD_SCALE = {"share": 100, "macs": 1e-6, "macs_paper_input": 1e-6, "size_bytes": 1e-3, "act_peak_bytes_b1": 1e-3,
            "weights_kept": 100, **{f"dc_{k}_bytes": 1e-3 for k in ("dense", "sparse", "shared", "huffman")}}
# The runtimes a latency can come from (rescomp.measure.RUNTIME_COLUMN): latency_ms_<column>_b<N>
RUNTIME_HEADERS = {"cpu": "PyTorch ms", "ort": "ONNX Runtime ms", "ind": "Inductor ms"}
LATENCY = tuple(f"latency_ms_{c}_b" for c in RUNTIME_HEADERS)
# The spread behind each latency (CSV and JSON columns; in Markdown folded into the latency cell).
SPREAD = ("latency_iqr_ms", "latency_runs", "speedup_within_noise")
# Columns whose Markdown cell folds in another's (CSV and JSON keep both): int8 layers "56 of 57".
FOLDED = {"weight_layers": "int8_layers"}
PROVENANCE = ["seed", "config_hash", "commit", "torch", "device", "wall_seconds", "command", "data_source",
              "train_images", "test_images"]
# Markdown: one section per kind of row (stage), each split into tables of at most MAX_COLUMNS columns
# (the row label repeated in each) so that a table fits a screen; whole column groups go together.
STAGES = {"train": "Trained networks", "ptq": "int8 networks", "qat": "int8 networks", "prune": "Pruned networks",
          "layerdrop": "Layer deletion", "magnitude_prune": "Magnitude pruning (Deep Compression)",
          "weight_share": "Weight sharing and Huffman coding (Deep Compression)", "binarize": "Pattern binarization (SEP-Net)"}
MAX_COLUMNS = 11
CONTEXT = ("arch", "dataset", "profile", "epochs", "method", "int8_layers", "share", "removed", "removed_coupled_channels",
           "finetune_epochs_total", "layers", "units_deleted", "seeds")
ACCURACY = ("top1", "top1_std", "val_top1", "loss", "fp32_top1", "top1_drop", "top1_drop_se", "agreement")


def find_runs(target: str, runs_root: Path) -> list[Path]:
    """Run folders named by `target`: a run folder, a folder of them, or a table name used in configs."""
    p = Path(target)
    if p.is_dir():
        found = sorted(s.parent for s in p.rglob("summary.json"))
        if not found and (p / "config.yaml").is_file():  # a run named on its own: never left out without a word
            raise ConfigError(f"'{p}' is a run that has not finished (it has no summary.json yet); run its command "
                              f"again to finish it (it resumes), or leave it out")
        return found
    if runs_root.is_dir():
        tagged = [s.parent for s in sorted(runs_root.rglob("summary.json")) if read_summary(s).get("table") == target]
        if tagged:
            return tagged
    raise ConfigError(f"'{target}' is neither a run folder nor a table that any run under '{runs_root}' reports to; "
                      f"pass a run folder (e.g. runs/demo-resnet20) or train a config with report.table: {target}")


def unfinished(targets: Iterable[str], runs_root: Path) -> list[Path]:
    """The runs that `targets` name (find_runs) that have not finished (a config.yaml, no summary.json yet):
    under a folder given, or, for a table name, under runs_root with that report.table in their config.
    report and compare leave them out, and say so (a table that lost a run without a word looks complete)."""
    def table_of(config: Path) -> Optional[str]:
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return ((raw or {}).get("report") or {}).get("table") if isinstance(raw, dict) else None

    found: set[Path] = set()
    for t in targets:
        here = Path(t) if Path(t).is_dir() else runs_root if runs_root.is_dir() else None
        for c in here.rglob("config.yaml") if here else []:
            if not (c.parent / "summary.json").is_file() and (here == Path(t) or table_of(c) == t):
                found.add(c.parent)
    return sorted(found)


def unique_runs(run_dirs: Iterable[Path]) -> list[Path]:
    """Each run folder once, in the order first given: two targets may name the same run (a folder of runs
    and a run in it), which counted twice."""
    return list({Path(d).resolve(): Path(d) for d in reversed(list(run_dirs))}.values())[::-1]


def load_rows(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """The summaries of the runs in run_dirs, each run once (two targets may name the same run), after
    checking that none is stale and that the runs report would merge as seeds are one experiment's."""
    rows, run_dirs = [], unique_runs(run_dirs)
    for d in run_dirs:
        rows.append(read_summary(d / "summary.json"))
    if not rows:
        raise ConfigError("no finished runs (summary.json) found to report")
    if why := seeds_conflict(run_dirs, rows):
        raise ConfigError(why)
    digests: dict[Path, str] = {}
    for d, s in zip(run_dirs, rows):
        command = s.get("command") or "its command"
        redo = f"redo it with `{command}{'' if '--fresh' in command.split() else ' --fresh'}`, or leave it out of the table"
        if changed := earlier_rules(Path(d)):
            raise ConfigError(f"'{d}' was made under rescomp's earlier rules of its stage (since then: {changed}); {redo}")
        if why := stale_input(s.get("inputs") or {}, Path(d), digests=digests):  # paths relative to the run folder
            raise ConfigError(f"'{d}' {why}, so its numbers are of the old network; {redo}")
    return rows


def expand(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, or per entry of a run's `rows` (a layer-drop run), carrying the run's provenance.
    Rows of different experiments that share a label (one stage run on two networks: five rows all 'Tiny
    int8 ONNX Runtime', with three top-1s) are told apart by their run's name; seeds of one share theirs."""
    rows = []
    for s in summaries:
        common = {k: v for k, v in s.items() if k not in ("rows", "full_stats", "sections")}
        rows += [{**common, **r} for r in s["rows"]] if "rows" in s else [dict(s)]
    runs: dict[tuple, set[str]] = {}
    for r in rows:
        runs.setdefault(label_key(r), set()).add(experiment(r))
    for r in rows:
        if len(runs[label_key(r)]) > 1:
            r["row"] = f"{r.get('row')} ({experiment(r)})"
    return rows


# Timings and their ratios, on a ratio scale: seeds' values meet in their geometric mean (speed-ups of 2x and
# 0.5x are 1x, not 1.25x); a spread (interquartile range) in its largest, a "within the noise" flag where any
# seed's is
GEOMETRIC = ("latency_ms_", "reference_latency_ms_", "fp32_latency_ms_", "speedup_cpu_", "speedup_ort_", "speedup_ind_",
             "forward_ms_b", "backward_ms_b", "reference_forward_ms_b", "reference_backward_ms_b", "gpu_images_per_s")


def label_key(row: dict[str, Any]) -> tuple:
    """What a row is labelled by in a table: its label, stage and series. Rows of one experiment's seeds that
    share it become one row (aggregate_seeds); rows of different experiments that share it say their run."""
    return row.get("row"), row.get("stage"), row.get("series")


def experiment(row: dict[str, Any]) -> str:
    """The run a row comes from, without its seed: a config's other seeds run as <name>-seed<n> (and their
    later stages as <name>-seed<n>-<stage>), so the seeds of one experiment share this."""
    return re.sub(r"-seed\d+(?=-|$)", "", str(row.get("name")))


def seeds_conflict(run_dirs: list[Path], summaries: list[dict[str, Any]]) -> Optional[str]:
    """Why runs that aggregate_seeds would merge as the seeds of one experiment are not that (None if they
    are): two runs of one seed (a copied folder), or runs that differ in a setting other than the seed, the
    name and the checkpoint each seed's own stage starts from (a 3-epoch run beside 2-epoch seeds was
    averaged in as a fourth seed)."""
    from rescomp.config import validate
    from rescomp.rundir import differences, saved_config

    def settings(d: Path):
        """The run's config without what its seed's run may have of its own: the seed, name, where it ran
        (device, the data's copy) and the networks it starts from (each seed's own)."""
        raw = saved_config(d).to_dict()
        raw.update(seed=0, name=None, seeds=None, device="auto")
        raw["data"].update(path=None, cache_dir=None)
        for section in raw.values():
            if isinstance(section, dict) and "checkpoint" in section:
                section["checkpoint"] = None
        if raw["train"].get("distill"):
            raw["train"]["distill"]["teacher"] = "teacher.pt"
        return validate(raw, str(d / "config.yaml"))

    groups: dict[tuple, list[tuple[Path, dict[str, Any]]]] = {}
    for d, s in zip(run_dirs, summaries):
        groups.setdefault((*label_key(s), experiment(s)), []).append((d, s))
    for (label, *_), group in groups.items():
        if len({s.get("seed") for _, s in group}) < 2 or not all((d / "config.yaml").is_file() for d, _ in group):
            continue
        by_seed: dict[Any, Path] = {}
        for d, s in group:
            if (other := by_seed.setdefault(s.get("seed"), d)) != d:
                return (f"'{other}' and '{d}' are both seed {s.get('seed')} of row '{label}', which report would "
                        f"average as two seeds; leave one out")
        try:
            judged = [settings(d) for d, _ in group]
        except ConfigError:  # a config of an older rescomp that no longer validates: not judged here
            continue
        for (d, _), other in zip(group[1:], judged[1:]):
            if changed := differences(judged[0], other, SEED_SECTIONS):
                return (f"'{group[0][0]}' and '{d}' would be averaged as seeds of row '{label}', but they differ in "
                        f"{', '.join(changed)}; give one another report.row (or name), or leave one out")
    return None


# The sections whose settings the seeds of one experiment share (besides training's): every stage's, and
# how they were measured
SEED_SECTIONS = ("measure", "quantize", "layer_drop", "prune", "magnitude_prune", "weight_share", "binarize")


def aggregate_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one experiment under several seeds (same label, same stage, same run but for its seed,
    different seeds) become one row: the mean of every number (the geometric mean of timings and speed-ups,
    the largest timing spread), `seeds` (how many) and `top1_std` (their sample standard deviation); the
    seeds and config hashes are listed, a speed-up is within the noise where any seed's was, and the fastest
    runtime is named again from the merged latencies. A row with one seed is left as it is. Rows of two
    runs that share a label are never merged. A merged `top1_drop_se` is the mean of the seeds' paired
    standard errors: the test-image noise of one seed's drop (the seeds share their test images, so their
    errors need not be independent and are not divided by the seeds' number); top1_std is the seeds' spread."""

    from rescomp.measure import RUNTIME_COLUMN

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*label_key(r), experiment(r)), []).append(r)
    out = []
    for group in groups.values():
        if len({r.get("seed") for r in group}) < 2:
            out += group
            continue
        merged = dict(group[0])
        for k in dict.fromkeys(k for r in group for k in r):
            vals = [r.get(k) for r in group]
            if k.startswith("speedup_within_noise"):
                merged[k] = any(vals)
            elif any(finite(v) for v in vals) and not all(finite(v) for v in vals):
                merged[k] = None  # measured in some seeds only (or NaN in one, a diverged loss): no merged figure
            elif all(finite(v) for v in vals) and len(set(vals)) > 1:
                if k.startswith(GEOMETRIC):
                    merged[k] = math.exp(sum(math.log(v) for v in vals) / len(vals)) if all(v > 0 for v in vals) else None
                elif "_iqr_" in k:
                    merged[k] = max(vals)
                else:
                    merged[k] = sum(vals) / len(vals)
        for k in [k for k in merged if k.startswith(("fastest_runtime_b", "fp32_fastest_runtime_b"))]:
            prefix, b = ("fp32_" if k.startswith("fp32_") else ""), k.rsplit("_b", 1)[1]
            timed = {rt: merged[f"{prefix}latency_ms_{col}_b{b}"] for rt, col in RUNTIME_COLUMN.items()
                     if isinstance(merged.get(f"{prefix}latency_ms_{col}_b{b}"), (int, float))}
            if timed:
                merged[k] = min(timed, key=timed.get)
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
    batches = sorted({int(k.rsplit("b", 1)[1]) for k in row if k.startswith(LATENCY)})
    cols = [c for c in COLUMNS if not c.startswith("latency_ms_cpu_b")]
    at = cols.index("compression") + 1
    extra = [f"latency_ms_cpu_b{b}" for b in batches] + [f"speedup_cpu_b{b}" for b in batches if f"speedup_cpu_b{b}" in row]
    extra += [f"{k}_b{b}" for b in batches for k in ("latency_ms_ort", "latency_ms_ind", "fastest_runtime", "fp32_fastest_runtime")
              if f"{k}_b{b}" in row]
    extra += [f"{k}_{rt}_b{b}" for b in batches for rt in RUNTIME_HEADERS for k in SPREAD if f"{k}_{rt}_b{b}" in row]
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
    out["arch"] = arch_label(row)
    if row.get("stage") in ("ptq", "qat"):
        out["method"] = row["stage"]
    return out


# What a stage adds to a network's spec (its surgery), as opposed to the config's model arguments.
SURGERY_KEYS = ("shapes", "deleted", "masked", "shared", "binarized")


def arch_label(row: dict[str, Any]) -> Optional[str]:
    """The network a row is, as its config's model says: the architecture and the arguments given to it
    ('resnet56 (shortcut B)', 'resnet56_bottleneck (width 8, gates)'), from the row's spec, or the spec a
    later stage started from; a row that keeps only the name gives the name."""
    spec = row.get("arch") if isinstance(row.get("arch"), dict) else row.get("start_arch")
    if not isinstance(spec, dict):
        return row.get("arch")
    args = [k if v is True else f"{k}({', '.join(f'{a}={b}' for a, b in v.items())})" if isinstance(v, dict)
            else f"{k} {v}" for k, v in spec.items()
            if k not in ("arch", "num_classes", "pretrained", *SURGERY_KEYS) and v is not None and v is not False]
    return spec.get("arch") + (f" ({', '.join(args)})" if args else "")


def column_order(flat: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' columns, each paper column right after ours."""
    keys = list(dict.fromkeys(k for f in flat for k in f))
    base = list(dict.fromkeys(k.removeprefix("Δ ").removesuffix(" (paper)") for k in keys))
    rank = {k: (base.index(k.removeprefix("Δ ").removesuffix(" (paper)")), k.startswith("Δ") * 2 + k.endswith("(paper)"))
            for k in keys}
    return sorted(keys, key=rank.__getitem__)


def header(key: str) -> str:
    if key.startswith(LATENCY):
        return f"{RUNTIME_HEADERS[key.split('_')[2]]} b{key.rsplit('b', 1)[1]}"
    if key.startswith("fastest_runtime_b"):
        return f"fastest b{key.rsplit('b', 1)[1]}"
    if key.startswith("fp32_fastest_runtime_b"):
        return f"fp32 compared on, b{key.rsplit('b', 1)[1]}"
    if key.startswith("speedup_cpu_b"):
        return f"speed-up b{key.rsplit('b', 1)[1]}"
    if key.startswith(("forward_ms_b", "backward_ms_b")):
        return f"{key.split('_')[0]} ms b{key.rsplit('b', 1)[1]}"
    if key.endswith(" (paper)") or key.startswith("Δ "):
        base = key.removeprefix("Δ ").removesuffix(" (paper)")
        return key.replace(base, MD_HEADERS.get(base, base)).replace(" (paper)", ", paper")
    return MD_HEADERS.get(key, key)


def _cell(key: str, f: dict[str, Any]) -> str:
    """A Markdown cell: latencies with ± half their interquartile range (and the mark of the run that timed
    them, where a table's were timed in several), speed-ups within it marked."""
    text = _fmt(key, f.get(key))
    if key.startswith(LATENCY) and f.get(key.replace("latency_ms", "latency_iqr_ms")) is not None:
        text += f" ±{f[key.replace('latency_ms', 'latency_iqr_ms')] / 2:,.2f}"
    if key.startswith(TIMINGS) and f.get(key) is not None and f.get(TIMED):
        text += f" [{f[TIMED]}]"
    if key.startswith("speedup_cpu_b") and f.get(key.replace("speedup", "speedup_within_noise")):
        text += " (noise)"
    for folded, into in FOLDED.items():
        if key == into and f.get(folded) is not None:
            text += f" of {_fmt(folded, f[folded])}"
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
# Columns timed on the machine (not counted): a table whose rows were timed in several runs marks each cell
# with its run (timing_marks), since a CPU's speed drifts between runs; speed-ups, timed side by side, are not.
TIMINGS = LATENCY + ("forward_ms_b", "backward_ms_b")
TIMED = "_timed"  # a flat row's timing mark (not a column)


def timing_of(row: dict[str, Any]) -> Optional[tuple[str, str]]:
    """The run a row's latencies were timed in, as far as a row says: (the CPU with the threads they were
    pinned to, commit); None for a row without any. A row measured before `latency_device` was recorded
    names its run's device, whose threads were the latencies' in every committed table."""
    if not any(k.startswith(TIMINGS) and v is not None for k, v in row.items()):
        return None
    return str(row.get("latency_device") or row.get("device")), str(row.get("commit"))


def timed_runs(rows: list[dict[str, Any]]) -> set[Any]:
    """The runs (each its own process) that timed these rows: a table's rows name theirs, compare's points
    their `run`."""
    return {r.get("name") or r.get("run") for r in rows if timing_of(r) is not None}


def timing_marks(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's mark (a, b, ...) of the run its latencies were timed in, '' for all where they were timed
    in one (or none): a run is a device (threads included) at a commit."""
    runs = list(dict.fromkeys(t for t in map(timing_of, rows) if t is not None))
    if len(runs) < 2:
        return [""] * len(rows)
    return ["" if timing_of(r) is None else _letter(runs.index(timing_of(r))) for r in rows]


def _letter(i: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[i % 26] * (i // 26 + 1)


def footnote(keys: list[str], marks: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """What the table's counted and timed columns mean, a sentence for each kind it has."""
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    said = []
    if has("val_top1"):
        said.append("top-1 is on the test set, val top-1 on the run's validation split (data.val_fraction of the "
                    "training images, held out from its training; where early stopping kept its best epoch, or a "
                    "layer-drop run with stop_on: val stopped on it, the split also chose, and its top-1 flatters)")
    if has("macs"):
        said.append("MACs are multiply-accumulates of one batch-1 forward pass at the input size the network ran at "
                    "(the paper's, where a column says so), as fvcore counts them: convolutions "
                    "and linear layers, plus two per element for BatchNorm (normalisation, then scale and shift) and "
                    "one for adaptive average pooling (other pooling counts none)")
    if has("macs", "params") and any(r.get("stage") in ("ptq", "qat") for r in rows):
        said.append("an int8 row's params and MACs are those of the fp32 network it quantizes (the same layers, "
                    "their multiply-accumulates in int8)")
    if has("size_bytes"):
        said.append("size is the network's tensors as torch.save writes them (its state_dict; an int8 ONNX graph's "
                    "initializers or a PT2E program's tensors, without the graph; kB = 1000 bytes)")
    if has("compression"):
        said.append("compression is size / the baseline row's size")
    if has(*LATENCY):
        said.append("PyTorch (eager), ONNX Runtime and Inductor ms are CPU latencies: the median forward time at "
                    "that batch size with threads pinned, ± half its interquartile range where measured")
    if has("forward_ms_b", "backward_ms_b"):
        said.append("forward and backward ms are the mean passes of a training step at that batch size, without "
                    "autocast (on a CPU, with the latencies' threads)")
    if has("act_peak"):
        said.append("act. peak is the most activation memory live at once in a batch-1 forward pass")
    if has("speedup_"):
        said.append("a speed-up is over the network a row came from (an int8 row's fp32 model, a pruned or "
                    "shortened row's unpruned network), the two timed interleaved in one process, marked (noise) "
                    "where their two ranges there (median ± half the interquartile range) overlap; the reference's "
                    "latency from that process is in table.json, not in this table, and may differ from its own "
                    "row's, timed in another process")
    lines = [_wrap("; ".join(said) + ".")] if said else []
    runs = list(dict.fromkeys((m, timing_of(r)) for m, r in zip(marks, rows) if m))
    if not runs and len(timed_runs(rows)) > 1:
        lines += ["", _wrap("The latencies were timed on one device at one commit, but in separate processes (one "
                            "per run), minutes apart, so they differ by the machine's drift too; only a speed-up "
                            "compares two networks timed side by side.")]
    if runs:
        lines += ["", _wrap(f"The latencies are marked [a] to [{runs[-1][0]}] by the device (threads included) and "
                            "commit they were timed with: latencies of two marks come from different sessions and do "
                            "not compare. Those of one mark were still timed in separate processes, minutes apart, "
                            "so they differ by the machine's drift too; only a speed-up compares two networks timed "
                            "side by side.")]
        lines += [f"- [{m}] {device}, commit {commit}" for m, (device, commit) in runs]
    return lines + [""]


def _wrap(text: str, width: int = 100) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


def _group(key: str) -> int:
    """Which column group a key belongs to: 0 what the row is, 1 accuracy, 2 size and work, 3 speed."""
    if key in CONTEXT:
        return 0
    if key in ACCURACY:
        return 1
    if key.startswith(("latency_", "speedup_", "fastest_", "fp32_fastest_", "forward_ms", "backward_ms", "act_peak", "gpu_", "train_seconds")):
        return 3
    return 2


def split_columns(keys: list[str], limit: int = MAX_COLUMNS) -> list[list[str]]:
    """The columns of one section as tables of at most `limit` columns, `row` first in each: column groups
    (_group) are packed in order, a group split only where it alone is wider than a table."""
    groups: dict[int, list[str]] = {}
    for k in keys:
        if k != "row":
            groups.setdefault(_group(k), []).append(k)
    parts: list[list[str]] = [[]]
    for g in sorted(groups):
        cols = groups[g]
        if parts[-1] and len(parts[-1]) + len(cols) > limit - 1:
            parts.append([])
        for k in cols:
            if len(parts[-1]) == limit - 1:
                parts.append([])
            parts[-1].append(k)
    return [["row", *p] for p in parts if p]


def _table(keys: list[str], flat: list[dict[str, Any]]) -> list[str]:
    return (["| " + " | ".join(header(k) for k in keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_cell(k, f) for k in keys) + " |" for f in flat] + [""])


def paper_table(flat: list[dict[str, Any]]) -> list[str]:
    """Every comparison with the paper as its own line: row, measure, ours, the paper's, the difference."""
    lines = []
    for f in flat:
        for k in f:
            if k.endswith(" (paper)") and f.get(k.removesuffix(" (paper)")) is not None:  # ours measured
                base = k.removesuffix(" (paper)")
                lines.append(f"| {_fmt('row', f.get('row'))} | {header(base)} | {_fmt(base, f.get(base))} | "
                             f"{_fmt(k, f[k])} | {_fmt('Δ ' + base, f.get('Δ ' + base))} |")
    if not lines:
        return []
    return ["## Against the paper", "", "| row | measure | ours | paper | Δ = ours − paper |", "|---|---|---|---|---|",
            *lines, ""]


def markdown(table: str, rows: list[dict[str, Any]], run_sections: list[dict[str, str]] | None = None,
             notes: str | None = None) -> str:
    """table.md: the rows' tables by stage, the footnote, the paper's numbers, the notes, then the runs' own
    sections (title, Markdown: `run_sections`) and the provenance."""
    flat = [flatten(r) for r in rows]
    ours = [k for k in column_order(flat) if k not in PROVENANCE and k not in FOLDED and not k.startswith(SPREAD)
            and not k.endswith(" (paper)") and not k.startswith("Δ ")]
    common = [k for k in SHARED if k in ours and len({str(f.get(k)) for f in flat}) == 1 and flat[0].get(k) is not None]
    lines = [f"# {table}", ""]
    if common:
        lines += ["All rows: " + ", ".join(f"{k} **{flat[0][k]}**" for k in common), ""]
    marks = timing_marks(rows)
    for f, mark in zip(flat, marks):
        f[TIMED] = mark
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r, f in zip(rows, flat):
        by_stage.setdefault(STAGES.get(r.get("stage", "train"), "Other rows"), []).append(f)
    for title, group in by_stage.items():
        if len(by_stage) > 1:
            lines += [f"## {title}", ""]
        keys = [k for k in ours if k not in common and any(f.get(k) is not None for f in group)]
        for part in split_columns(keys):
            lines += _table(part, group)
    lines += footnote([k for k in ours if any(f.get(k) is not None for f in flat)], marks, rows)
    lines += paper_table(flat)
    if notes:
        lines += ["## What these rows can and cannot show", "", notes.strip(), ""]
    for sec in run_sections or []:
        lines += [f"## {sec['title']}", "", sec["markdown"], ""]
    lines += ["## Provenance", ""]
    seen = set()
    for r in rows:
        key = (r.get("command"), r.get("config_hash"), r.get("stage"))
        if "step" in r and key in seen:  # a layer-drop run's rows share one provenance line
            continue
        seen.add(key)
        images = (f", {r['train_images']:,} train / {r['test_images']:,} test images"
                  if isinstance(r.get("train_images"), int) and isinstance(r.get("test_images"), int) else "")
        lines.append(f"- **{r.get('name') if 'step' in r else r.get('row')}**: `{r.get('command')}` — config {r.get('config_hash')}, seed {r.get('seed')}, "
                     f"commit {r.get('commit')}, torch {r.get('torch')}, device {r.get('device')}, "
                     f"wall {r.get('wall_seconds', 0):.0f} s, data {r.get('data_source')}{images}")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    flat = [flatten(r) | {k: r.get(k) for k in PROVENANCE} for r in rows]
    return csv_text(flat, column_order(flat))


def csv_text(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """Rows as CSV with these columns, in this order (a row without a column leaves it empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def finite(v: Any) -> bool:
    """A number that can be plotted or ranked: not None, a bool, NaN or infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def noisy(row: dict[str, Any], key: str) -> bool:
    """A latency whose interquartile range over its repeats exceeds the latency itself: no place on an axis
    (report's latency_ms_<runtime>_b<B> columns and compare's latency_ms_b1 alike)."""
    iqr = row.get(key.replace("latency_ms", "latency_iqr_ms")) if key.startswith("latency_ms_") else None
    return finite(row.get(key)) and finite(iqr) and iqr > row[key]


def placed(row: dict[str, Any], key: str) -> bool:
    """Whether a row has a place on a plot's or a front's `key` axis: a finite value and top-1, and not a
    latency that says nothing (`noisy`)."""
    return finite(row.get(key)) and finite(row.get("top1")) and not noisy(row, key)


def sections(summaries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The runs' own sections of the table (title, Markdown), a title that several runs give suffixed with
    the run's name."""
    titles = [sec["title"] for s in summaries for sec in s.get("sections", [])]
    return [{"title": sec["title"] if titles.count(sec["title"]) == 1 else f"{sec['title']} — {s.get('name')}",
             "markdown": sec["markdown"]} for s in summaries for sec in s.get("sections", [])]


# The headings a table.md gives its own parts; any other is a run's section (a table.json made before
# sections were kept in it has them only in its table.md).
OWN_HEADINGS = {*STAGES.values(), "Other rows", "Against the paper", "What these rows can and cannot show", "Provenance"}


def rendered_table(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """A committed table to render again (`rescomp report results/<table>`, after a change to the renderer or
    to its notes): its name, its rows, and what it keeps of its runs besides (write_table's `kept`): their
    sections as they were titled, and their gates plots (None: the plots in its folder stay as they are).
    The runs are not needed; their rows and provenance are in table.json as they were collected."""
    path = path / "table.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
        name, rows = data["table"], data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"'{path}' is not a table.json that `rescomp report` wrote ({type(e).__name__}); pass a "
                          f"results/<table> folder") from None
    if "sections" in data:
        extra = {"sections": data["sections"], "gates": data.get("gates")}  # absent: the plots stay as they are
    else:  # written before table.json kept them: from its table.md, and its gates plots are left as they are
        md = path.with_name("table.md")
        blocks = md.read_text().split("\n## ")[1:] if md.is_file() else []
        extra = {"sections": [{"title": b.split("\n", 1)[0], "markdown": b.split("\n", 1)[1].strip()}
                              for b in blocks if b.split("\n", 1)[0] not in OWN_HEADINGS], "gates": None}
    return name, rows, extra


def write_table(table: str, rows: list[dict[str, Any]], out_root: Path = Path("results"),
                baseline: str | None = None, summaries: list[dict[str, Any]] | None = None,
                notes: str | None = None, kept: dict[str, Any] | None = None) -> Path:
    """Render every file in memory first, then write each atomically: a failure leaves the old table. The
    runs' sections and gates plots come from their `summaries`, or, rendering a table again, as `kept`
    (rendered_table)."""
    from rescomp.plots import gates_plots, plot_files  # plots reads this module's row helpers

    rows = aggregate_seeds(rows)
    if baseline:
        rows = add_compression(rows, baseline)
    secs = (kept["sections"] if kept else []) + sections(summaries or [])
    keep_gates = kept is not None and kept["gates"] is None  # a table.json without them: its plots stay
    gates = gates_plots(summaries or [], table) + ((kept or {}).get("gates") or [])
    files = {
        "table.md": markdown(table, rows, secs, notes).encode(),
        "table.csv": to_csv(rows).encode(),
        "table.json": json.dumps({"table": table, "rows": rows, "sections": secs,
                                  **({} if keep_gates else {"gates": gates})}, indent=2).encode(),
    }
    files.update(plot_files(table, rows, gates))
    files = {name: blob for name, blob in files.items() if blob is not None}
    final = out_root / table
    write_files(final, files)
    for old in [*final.glob("accuracy_vs_*.png"), *([] if keep_gates else final.glob("gates*.png"))]:
        if old.name not in files:  # a plot of an earlier report that these rows no longer make
            old.unlink()
    return final
