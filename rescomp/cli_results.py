"""The commands that look at networks, runs and tables rather than make them: measure, export, report,
compare, runs, config and models. Registered on rescomp.cli's app, which imports this module last."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rescomp.cli import ProfileOpt, SetOpt, app, err, out, user_errors
from rescomp.errors import RescompError


def _table_name(name: str) -> None:
    """results/<name>/ must be a folder of results/, not a path out of it."""
    from rescomp.config_sections import folder_name
    from rescomp.errors import ConfigError

    try:
        folder_name(name)
    except ValueError as e:
        raise ConfigError(f"table '{name}': {e}; pass --table NAME") from None


@app.command()
@user_errors
def measure(target: Path = typer.Argument(..., help="experiment YAML or checkpoint (.pt)"),
            set_: Optional[List[str]] = SetOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Parameters, MACs, bytes, CPU latency, GPU throughput and activation memory of a model.

    --set applies to a checkpoint's stored config too (measure.batch_sizes, device, ...)."""
    from rescomp import checkpoint
    from rescomp.config import load_config, validate
    from rescomp.config_files import apply_overrides, project_root
    from rescomp.context import resolve_device
    from rescomp.errors import DeviceError
    from rescomp.measure import measure as measure_model
    from rescomp.models import build_model
    from rescomp.runner import model_spec

    if target.suffix in (".pt", ".pth"):
        payload = checkpoint.load(target)
        raw = apply_overrides(dict(payload.get("config") or {}), list(set_ or []))
        cfg = validate(raw, str(target)).rooted(project_root(target)) if raw else None
    else:
        payload, cfg = None, load_config(target, set_)
    device = resolve_device(cfg.device) if cfg else None  # a device that is not there is an error, never the CPU
    if payload is not None and payload.get("kind") == checkpoint.INT8:
        from rescomp.compress.quantize import backend, layer_counts, load_int8
        from rescomp.measure import measure_int8

        if device is not None and device.type != "cpu" and cfg.device != "auto":
            raise DeviceError(f"'{target}' is an int8 model, which runs on the CPU only; drop --set device={cfg.device}")
        model, payload = load_int8(target)
        size = payload["image_size"]
        row = {"arch": payload["arch"]["arch"], "dtype": "int8", **layer_counts(backend(payload["quantize"]["backend"]), model),
               **measure_int8(model, size, cfg.measure if cfg else None)}
        _show(row, f"{row['arch']} int8 at {size}x{size}", as_json)  # int8 runs on the CPU
        return
    stored = None
    if payload is not None:
        from rescomp.compress.codec import stored_form

        model, payload = checkpoint.load_model(target)
        arch = payload["arch"]["arch"]
        ws = cfg.weight_share if cfg else None
        stored = stored_form(model, payload["arch"], *((ws.gap_bits_conv, ws.gap_bits_fc) if ws else ()))
        if stored is not None:  # measured as its stage measures it: the network its own file decodes to
            model, stored = stored
    else:
        model = build_model(model_spec(cfg))
        arch = cfg.model.arch
    image_size = cfg.data.image_size if cfg else 32
    mc = cfg.measure if cfg else None
    if mc is not None and device is not None and device.type == "cpu":
        mc = mc.model_copy(update={"gpu_throughput": False})  # asked for the CPU: no GPU figure either
    row = {"arch": arch, **measure_model(model, image_size, mc), **(stored or {})}
    _show(row, f"{arch} at {image_size}x{image_size}", as_json, device)


def _show(row: dict, title: str, as_json: bool, device=None) -> None:
    """A measured row with how it was made (commit, torch, the device; in JSON every detail of the
    hardware), as a table or as JSON."""
    from rescomp.provenance import stamp

    made = stamp(device if device is not None else "cpu")
    row = {**row, **{k: v for k, v in made.items() if as_json or k != "hardware"}}
    if as_json:
        out.print_json(json.dumps(row))
        return
    t = Table(title=title)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in row.items():
        t.add_row(k, f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    out.print(t)


@app.command()
@user_errors
def export(target: Path = typer.Argument(..., help="a model.pt or int8.pt, or an experiment YAML (its training "
                                          "run's model.pt; with --int8, its quantize run's int8.pt)"),
           out_path: Optional[Path] = typer.Option(None, "--out", help="the .onnx file (default: beside the model.pt)"),
           int8: bool = typer.Option(False, "--int8", help="export the int8 model (quantize.backend pt2e or onnxruntime)"),
           opset: int = typer.Option(18, help="ONNX opset"), set_: Optional[List[str]] = SetOpt,
           profile: Optional[str] = ProfileOpt) -> None:
    """Write a trained network as ONNX (dynamic batch), kept only if ONNX Runtime agrees with PyTorch
    (fp32: outputs to 1e-4; int8: top-1 on a batch)."""
    from rescomp.config import load_config
    from rescomp.errors import ConfigError
    from rescomp.export import export_checkpoint
    from rescomp.rundir import run_folder, trained_otherwise
    from rescomp.stages.quantize import suffix as int8_suffix

    if out_path is not None and out_path.suffix != ".onnx":
        raise ConfigError(f"--out '{out_path}' must end in .onnx")
    source = target
    if target.suffix in (".yaml", ".yml"):
        cfg = load_config(target, set_, profile)
        source = run_folder(cfg, int8_suffix(cfg)) / "int8.pt" if int8 else run_folder(cfg) / "model.pt"
        if not source.is_file():
            given = "".join(f" --set {shlex.quote(v)}" for v in set_ or []) + (f" --profile {profile}" if profile else "")
            todo = (f"rescomp quantize {target}{given}` (quantize.backend pt2e or onnxruntime)" if int8
                    else f"rescomp train {target}{given}`")
            raise ConfigError(f"no {'int8' if int8 else 'trained'} model at '{source}'; run `{todo} first, or pass "
                              f"{'an int8.pt' if int8 else 'a model.pt'}")
        if changed := trained_otherwise(source.parent, cfg, *(("quantize",) if int8 else ())):
            raise ConfigError(f"'{source.parent}' holds a network made with other settings than this config's: "
                              f"{', '.join(changed)}; pass {source} itself to export that network as it is")
    elif target.suffix not in (".pt", ".pth"):
        raise ConfigError(f"'{target}' is neither a model.pt nor a config (.yaml); pass one of them")
    elif set_ or profile:  # a checkpoint holds its network: a setting would be taken and then ignored
        raise ConfigError(f"--{'set' if set_ else 'profile'} applies to a config, and '{target}' is a checkpoint, "
                          f"exported as it is; pass the config instead, or drop the option")
    path, rec = export_checkpoint(source, out_path, opset, int8=int8)
    if rec.get("int8"):
        agreement = (f"ONNX Runtime's top-1 agrees with the {rec['backend']} int8 model's on {rec['top1_agreement']:.0%} "
                     f"of {rec['checked_batches'][0]} images")
    else:
        agreement = f"ONNX Runtime matches PyTorch to {rec['max_abs_diff']:.2g} (allowed {rec['tolerance']:.2g})"
    out.print(f"{rec['arch']['arch']} -> {path} ({rec['onnx_bytes'] / 1e6:.2f} MB, opset {rec['opset']}); {agreement} "
              f"-> {path}.json", highlight=False)


@app.command()
@user_errors
def report(targets: List[str] = typer.Argument(..., help="run folders, folders of runs, or a table name; or one "
                                                          "results/<table> folder, to render it again from its table.json"),
           table: Optional[str] = typer.Option(None, help="name of results/<table>/ (default: the runs' table)"),
           runs: Path = typer.Option(Path("runs"), help="where table names are looked up: a folder, or a config file (its out_dir)"),
           out_dir: Path = typer.Option(Path("results"), "--out", help="results root"),
           baseline: Optional[str] = typer.Option(None, help="row whose size_bytes the compression column divides by"),
           notes: Optional[Path] = typer.Option(None, help="a Markdown file: what the table's rows can and cannot show")) -> None:
    """Collect finished runs into results/<table>/ as Markdown, CSV, JSON and a plot; or render a committed
    table again from its table.json (the same rows and provenance, the current renderer and notes)."""
    from rescomp.errors import ConfigError
    from rescomp.config import load_config
    from rescomp.config_files import check_writable, read_text
    from rescomp.report import expand, find_runs, load_rows, rendered_table, write_table

    check_writable(out_dir, "--out")
    if runs.suffix in (".yaml", ".yml"):
        runs = load_config(runs).runs_dir
    notes_text = None if notes is None else read_text(notes, "--notes",
                                                      "pass a Markdown file such as configs/table-taylor/notes.md")
    tables = [t for t in targets if Path(t).name == "table.json" or (Path(t) / "table.json").is_file()]
    if tables:
        if len(targets) > 1:
            raise ConfigError(f"'{tables[0]}' is a rendered table: render it again alone, or collect its runs "
                              f"(runs/...) with the others")
        name, rows, kept = rendered_table(Path(tables[0]))
        folder = Path(tables[0]) if Path(tables[0]).is_dir() else Path(tables[0]).parent
        where = folder.parent if out_dir == Path("results") else out_dir  # in place, unless --out says where
        check_writable(where, "--out")
        # in place: the folder given, whatever the table.json calls it (a renamed copy stays a copy)
        path = write_table(table or (folder.name if out_dir == Path("results") else name), rows, where,
                           baseline=baseline, notes=notes_text, kept=kept)
        out.print(f"{len(rows)} row(s) rendered again -> {path}/table.md")
        return
    summaries = load_rows(d for t in targets for d in find_runs(t, runs))
    _left_out(targets, runs)
    rows = expand(summaries)
    name = table or summaries[0].get("table") or (targets[0] if not Path(targets[0]).exists() else None)
    if not name:
        raise ConfigError("these runs name no table (report.table in their config); pass --table NAME")
    _table_name(name)
    path = write_table(name, rows, out_dir, baseline=baseline, summaries=summaries,
                       notes=notes_text)
    written = len(json.loads((path / "table.json").read_text())["rows"])  # a row per experiment: seeds meet in one
    out.print(f"{written} row(s) from {len(summaries)} run(s) -> {path}/table.md")


def _left_out(targets: List[str], runs: Path) -> None:
    """Say which unfinished runs of the folders or table names given a table leaves out."""
    from rescomp.report import unfinished

    if left := unfinished(targets, runs):
        names = ", ".join(str(d) for d in left[:3]) + (", ..." if len(left) > 3 else "")
        err.print(f"left out {len(left)} unfinished run(s), with no summary.json yet: {names} (its command resumes "
                  f"a run; report it once it has finished)", highlight=False)


@app.command()
@user_errors
def compare(targets: List[str] = typer.Argument(..., help="run folders, folders of runs (e.g. runs/), or a table name; "
                                                      "or one results/<table> folder (or its compare.json), rendered again from that file"),
            table: str = typer.Option(..., help="name of results/<table>/"),
            baseline: Optional[str] = typer.Option(None, help="the run every point is compared with (default: the "
                                                              "one trained network among them)"),
            runs: Path = typer.Option(Path("runs"), help="where table names are looked up: a folder, or a config file (its out_dir)"),
            profile: Optional[str] = typer.Option(None, help="only the runs of this config profile (paper: none)"),
            notes: Optional[Path] = typer.Option(None, help="a Markdown file: what the points can and cannot show"),
            out_dir: Path = typer.Option(Path("results"), "--out", help="results root")) -> None:
    """Every technique and chain against one baseline: accuracy, params, MACs, bytes and latency, with the
    Pareto front of each cost, as results/<table>/compare.{md,csv,json} and pareto.png."""
    from rescomp import compare as cmp
    from rescomp.config import load_config
    from rescomp.config_files import check_writable, read_text

    _table_name(table)
    check_writable(out_dir, "--out")
    notes_text = None if notes is None else read_text(notes, "--notes",
                                                      "pass a Markdown file such as configs/table-combined/notes.md")
    if runs.suffix in (".yaml", ".yml"):
        runs = load_config(runs).runs_dir
    pts = cmp.collect(targets, runs, baseline, profile)
    _left_out(targets, runs)
    path = cmp.write(table, pts, out_dir, notes_text)
    front = sum(1 for p in pts if p.get("pareto_macs"))
    out.print(f"{len(pts)} networks, {front} on the MACs Pareto front -> {path}/compare.md", highlight=False)


@app.command()
@user_errors
def runs(root: Path = typer.Argument(Path("runs"), help="a folder of runs, or a config file (its out_dir)")) -> None:
    """List the runs under ROOT with their state: complete, running, interrupted (resumable) or empty; a
    complete run made from a network re-made since, or under its stage's earlier rules, is stale."""
    from rescomp import runlock
    from rescomp.config import load_config
    from rescomp.errors import ConfigError
    from rescomp.rundir import earlier_rules, read_summary, stale_input

    if root.suffix in (".yaml", ".yml"):
        root = load_config(root).runs_dir
    if not root.is_dir():
        raise ConfigError(f"'{root}' is not a folder of runs; pass a config's out_dir (default: runs) or the config file")
    if (root / "config.yaml").is_file():  # its checkpoints/ folder was listed as an interrupted run
        raise ConfigError(f"'{root}' is a run folder, not a folder of runs; list it among its neighbours: "
                          f"rescomp runs {root.parent}")
    rows, digests = [], {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = d / "summary.json"
        try:
            s, broken = (read_summary(summary) if summary.is_file() else {}), None
        except ConfigError as e:  # this run's summary is not one; the others are listed
            s, broken = {}, str(e).split(";")[0]
        who, lasts = runlock.holder(d), list(d.rglob("last.pt"))
        state = ("running: " + who if who else "complete" if s else
                 "interrupted, resumable" if lasts or any(d.rglob("row.json")) else "empty")
        cut = [p for p in lasts if not p.stat().st_size]
        if broken or cut and not s and not who:  # a run there would refuse the empty checkpoint too
            state = f"broken: {broken or f'an empty checkpoint ({cut[0].relative_to(d)})'}; re-run it with --fresh"
        try:
            if not who and state != "empty" and not broken and earlier_rules(d):
                state = "stale: made under its stage's earlier rules"
            elif state == "complete" and stale_input(s.get("inputs") or {}, d, digests=digests):
                state = "stale: its input was re-made since"
        except RescompError as e:  # an unreadable input or config: this run cannot be checked, the others can
            state = f"stale: cannot be checked ({str(e).split(';')[0]})"
        top1 = s.get("top1", (s.get("rows") or [{}])[-1].get("top1"))
        rows.append([d.name, s.get("stage", "-"), state, "-" if top1 is None else f"{top1:.2f}",
                     str(s.get("seed", "-")), str(s.get("table") or "-"), s.get("commit", "-")])
    _print_rows(f"runs in {root}", ["run", "stage", "state", "top-1 %", "seed", "table", "commit"], rows)


@app.command("config")
@user_errors
def config_(config: Optional[Path] = typer.Argument(None, help="experiment YAML (omit with --keys)"),
            set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt,
            keys: bool = typer.Option(False, "--keys", help="list every config key with its type, default and meaning")) -> None:
    """Print CONFIG as rescomp reads it (extends, profile and --set applied, every default filled in)."""
    from rescomp.config import dump_config, load_config
    from rescomp.errors import ConfigError

    if keys:
        from rescomp.config_doc import reference

        if config is not None or set_ or profile:
            raise ConfigError("--keys lists every key of every config, so it takes no CONFIG, --set or --profile; "
                              "drop them, or drop --keys to print that config")
        print(reference(), end="")
        return
    if config is None:
        raise ConfigError("pass a config file (rescomp config configs/demo/resnet20.yaml), or --keys for every key")
    print(dump_config(load_config(config, set_, profile)), end="")


@app.command()
@user_errors
def models() -> None:
    """List the architectures: registered, installed plugins, and how to name your own."""
    import inspect

    import torch

    from rescomp.measure import count_params
    from rescomp.models import build_model, get_entry, model_names, transform_keys

    rows = []
    for name in model_names():
        e = get_entry(name)
        sig = inspect.signature(e.builder).parameters.values()
        args = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                         for p in sig if p.name != "num_classes" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        with torch.device("meta"):  # shapes only: no memory, no initialisation, so the list is quick
            n = count_params(build_model({"arch": name, "num_classes": 10}))
        rows.append({"arch": name, "params": f"{n:,}", "min input": str(e.min_input), "family": e.family,
                     "arguments (model: keys)": args or "-", "description": e.summary})
    note = (f"Every model also takes {', '.join(transform_keys())} (set by the techniques). Your own: model.arch "
            f"module.path:function (README, 'Your own model').")
    _print_rows("rescomp models (params with 10 classes and default arguments)", list(rows[0]),
                [list(r.values()) for r in rows], caption=note, right=("params", "min input"))


def _print_rows(title: str, cols: list[str], rows: list[list[str]], caption: Optional[str] = None,
                right: tuple[str, ...] = ()) -> None:
    """A table on a terminal; piped, one tab-separated line per row, nothing cut to the terminal's width."""
    if not out.is_terminal:
        print("\t".join(cols))
        for r in rows:
            print("\t".join(r))
        return
    t = Table(title=title, caption=caption)
    for c in cols:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold")
    for r in rows:
        t.add_row(*r)
    out.print(t)
