"""The `rescomp` command. Each command: load config -> one call -> print where results went."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from rescomp.errors import RescompError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Reproduce and extend CNN-compression papers on CIFAR.")
err = Console(stderr=True, log_path=False, soft_wrap=True)
out = Console(soft_wrap=True)

SetOpt = typer.Option(None, "--set", help="override a config value: --set train.epochs=5 (repeatable)")
ProfileOpt = typer.Option(None, "--profile", help="apply the config's `profiles:` entry of this name")


def user_errors(fn: Callable) -> Callable:
    """A user mistake prints one line and exits 2 (or the error's own code); never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RescompError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: run the same command again to resume from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def train(config: Path = typer.Argument(..., help="experiment YAML"), set_: Optional[List[str]] = SetOpt,
          profile: Optional[str] = ProfileOpt,
          fresh: bool = typer.Option(False, "--fresh", help="delete this run's folder and start over")) -> None:
    """Train what CONFIG describes; re-running an interrupted run resumes it."""
    from rescomp.config import load_config
    from rescomp.pipeline import run_train

    cfg = load_config(config, set_, profile)
    run_dir, summary = run_train(cfg, fresh=fresh, console=err)
    out.print(f"top-1 {summary['top1']:.2f}%  params {summary['params']:,}  MACs {summary['macs'] / 1e6:.2f} M  "
              f"-> {run_dir}/summary.json")


@app.command()
@user_errors
def quantize(config: Path = typer.Argument(..., help="experiment YAML whose trained model to quantize"),
             set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt,
             fresh: bool = typer.Option(False, "--fresh", help="redo a finished quantization")) -> None:
    """Int8 a trained model (torch.fx, x86): calibrate, evaluate and time it beside its fp32 model."""
    from rescomp.config import load_config
    from rescomp.pipeline import run_quantize

    run_dir, s = run_quantize(load_config(config, set_, profile), fresh=fresh, console=err)
    speed = "  ".join(f"{k.removeprefix('speedup_cpu_')} {v:.2f}x" for k, v in s.items() if k.startswith("speedup_cpu_"))
    out.print(f"int8 top-1 {s['top1']:.2f}% (fp32 {s['fp32_top1']:.2f}%)  size {s['size_ratio']:.2f}x of fp32  "
              f"CPU speed-up {speed or '-'}  -> {run_dir}/summary.json")


@app.command()
@user_errors
def prune(config: Path = typer.Argument(..., help="experiment YAML with a prune section"),
          set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt,
          fresh: bool = typer.Option(False, "--fresh", help="redo a finished pruning run")) -> None:
    """Score filters, remove the lowest share, fine-tune, measure; repeat on the config's schedule."""
    from rescomp.config import load_config
    from rescomp.prune_run import run_prune

    run_dir, s = run_prune(load_config(config, set_, profile), fresh=fresh, console=err)
    first, last = s["rows"][0], s["rows"][-1]
    out.print(f"{100 * last['share']:.0f}% of {s['prunable_filters']:,} prunable filters removed: params "
              f"{first['params']:,} -> {last['params']:,}, MACs {first['macs'] / 1e6:.1f} -> {last['macs'] / 1e6:.1f} M, "
              f"top-1 {first['top1']:.2f} -> {last['top1']:.2f}%  -> {run_dir}/summary.json")


@app.command("layer-drop")
@user_errors
def layer_drop(config: Path = typer.Argument(..., help="experiment YAML with a gated model and a layer_drop section"),
               set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt,
               fresh: bool = typer.Option(False, "--fresh", help="redo a finished layer-drop run")) -> None:
    """Delete residual units by learned importance, retraining between deletions; resumable."""
    from rescomp.config import load_config
    from rescomp.layer_drop_run import run_layer_drop

    run_dir, s = run_layer_drop(load_config(config, set_, profile), fresh=fresh, console=err)
    rel, smallest = s["relative_smallest_lossless"], s["smallest_lossless"]
    out.print(f"smallest lossless: {smallest['layers']} layers, top-1 {smallest['top1']:.2f}% "
              f"(full {s['start_top1']:.2f}%); MACs {rel['macs']:.1f}%, params {rel['params']:.1f}% of full "
              f"-> {run_dir}/summary.json")


@app.command()
@user_errors
def measure(target: Path = typer.Argument(..., help="experiment YAML or checkpoint (.pt)"),
            set_: Optional[List[str]] = SetOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Parameters, MACs, bytes, CPU latency, GPU throughput and activation memory of a model."""
    from rescomp import checkpoint
    from rescomp.config import load_config, validate
    from rescomp.measure import measure as measure_model
    from rescomp.models import build_model
    from rescomp.pipeline import model_spec

    if target.suffix in (".pt", ".pth") and checkpoint.load(target).get("kind") == "rescomp-int8":
        from rescomp.compress.quantize import load_int8
        from rescomp.measure import measure_int8

        model, payload = load_int8(target)
        size = payload["image_size"]
        row = {"arch": payload["arch"]["arch"], "dtype": "int8", **measure_int8(model, size)}
        _show(row, f"{row['arch']} int8 at {size}x{size}", as_json)
        return
    if target.suffix in (".pt", ".pth"):
        model, payload = checkpoint.load_model(target)
        cfg = validate(payload["config"], str(target)) if payload.get("config") else None
        arch = payload["arch"]["arch"]
    else:
        cfg = load_config(target, set_)
        model = build_model(model_spec(cfg))
        arch = cfg.model.arch
    image_size = cfg.data.image_size if cfg else 32
    row = {"arch": arch, **measure_model(model, image_size, cfg.measure if cfg else None)}
    _show(row, f"{arch} at {image_size}x{image_size}", as_json)


def _show(row: dict, title: str, as_json: bool) -> None:
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
def report(targets: List[str] = typer.Argument(..., help="run folders, folders of runs, or a table name"),
           table: Optional[str] = typer.Option(None, help="name of results/<table>/ (default: the runs' table)"),
           runs: Path = typer.Option(Path("runs"), help="where table names are looked up"),
           out_dir: Path = typer.Option(Path("results"), "--out", help="results root"),
           baseline: Optional[str] = typer.Option(None, help="row whose size_bytes the compression column divides by"),
           notes: Optional[Path] = typer.Option(None, help="a Markdown file: what the table's rows can and cannot show")) -> None:
    """Collect finished runs into results/<table>/ as Markdown, CSV, JSON and a plot."""
    from rescomp.errors import ConfigError
    from rescomp.report import expand, find_runs, load_rows, write_table

    if notes is not None and not notes.is_file():
        raise ConfigError(f"--notes '{notes}' is not a file; pass a Markdown file such as configs/table-taylor/notes.md")
    summaries = load_rows(d for t in targets for d in find_runs(t, runs))
    rows = expand(summaries)
    name = table or summaries[0].get("table") or (targets[0] if not Path(targets[0]).exists() else None)
    if not name:
        raise ConfigError("these runs name no table (report.table in their config); pass --table NAME")
    path = write_table(name, rows, out_dir, baseline=baseline, summaries=summaries,
                       notes=notes.read_text() if notes else None)
    out.print(f"{len(rows)} row(s) -> {path}/table.md")


@app.command()
@user_errors
def models() -> None:
    """List the registered architectures with their parameter counts (10 classes)."""
    from rescomp.measure import count_params
    from rescomp.models import build_model, get_entry, model_names

    t = Table(title="rescomp models (10 classes, default arguments)")
    for col in ("arch", "params", "min input", "family", "description"):
        t.add_column(col, justify="right" if col in ("params", "min input") else "left")
    for name in model_names():
        e = get_entry(name)
        t.add_row(name, f"{count_params(build_model({'arch': name, 'num_classes': 10})):,}", str(e.min_input),
                  e.family, e.summary)
    out.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
