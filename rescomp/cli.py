"""The `rescomp` command. Each command: load config -> one call -> print where results went."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rescomp.errors import RescompError, Terminated



class _OneLineUsage(typer.core.TyperGroup):
    """Words the parser refuses (a missing argument, an option no command has, a value of the wrong type) said
    in one line naming the command, as every other user mistake is, instead of click's usage, hint and error
    lines; a bare `rescomp` still prints the help. Exit code 2, as click's."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _usage_error() as e:  # click's exceptions, under the names this typer gives them
            ctx = getattr(e, "ctx", None)
            if ctx is None or type(e).__name__ == "NoArgsIsHelpError":  # not the words (or a bare `rescomp`)
                e.show()
            else:
                where = " ".join(["rescomp", *(c.info_name for c in _parents(ctx) if c.parent is not None)])
                said = " ".join(e.format_message().split()).rstrip(".")
                err.print(f"[bold red]error:[/] {escape(f'{where}: {said}')}; see '{where} --help'", highlight=False)
            raise SystemExit(getattr(e, "exit_code", 1)) from None
        except typer.Abort:  # Ctrl-C outside a command (a command says what it kept, user_errors)
            typer.echo("Aborted!", err=True)
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


def _parents(ctx: Any) -> list:
    """A command's context and those above it, the outermost (the program, however started) first."""
    return [*_parents(ctx.parent), ctx] if ctx is not None else []


app = typer.Typer(cls=_OneLineUsage, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Reproduce and extend CNN-compression papers on CIFAR.")
err = Console(stderr=True, log_path=False, soft_wrap=True)
out = Console(soft_wrap=True)

SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="override a config value: --set train.epochs=5 (repeatable)")
ProfileOpt = typer.Option(None, "--profile", metavar="NAME", help="apply the config's `profiles:` entry of this name")
SeedOpt = typer.Option(None, "--seed", metavar="N", help="run with this seed, in its own folder <name>-seed<N>")
DryOpt = typer.Option(False, "--dry-run", help="check everything and say what would run, where and for how long; "
                                               "run nothing")
NprocOpt = typer.Option(None, "--nproc", metavar="N", help="run as N processes through torchrun with "
                        "DistributedDataParallel (one per GPU, or Gloo on the CPU); train.batch_size is the global batch")
# The commands that train or fine-tune, and so may run as several processes (--nproc, or under torchrun).
DISTRIBUTED_COMMANDS = ("train", "prune", "layer-drop", "quantize", "run", "magnitude-prune", "weight-share", "binarize")


def _dry_run(cfgs: list, command: str, nproc: Optional[int], fresh: bool = False) -> None:
    """The plan, then exit 2 where the command would refuse to start: a folder it may not use, or --nproc."""
    from rescomp import distributed
    from rescomp.plan import describe_all

    plan, refused = describe_all(cfgs, command, fresh)
    print(plan)
    if nproc is not None:
        _nproc_ok(nproc)
        if nproc > 1:
            distributed.check_launch(cfgs, nproc)
    _refuse(refused)


def _checks(cfgs: list, command: str, fresh: bool = False) -> None:
    """Every check of `command` on cfgs (what --dry-run runs), before --nproc starts its processes."""
    from rescomp.plan import describe_all

    _refuse(describe_all(cfgs, command, fresh)[1])


def _refuse(refused: list[str]) -> None:
    from rescomp.errors import ConfigError

    if refused:
        raise ConfigError(refused[0])


def _configs(config: Path, set_: Optional[List[str]], profile: Optional[str], seed: Optional[int]) -> list:
    """The runs a command makes: one per seed of the config's `seeds:` (or its one seed); --seed N picks one."""
    from rescomp.config import load_config

    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    return load_config(config, overrides, profile).per_seed()


def _spread(nproc: Optional[int], argv: list[str], cfgs: list, check: Callable[[], Any]) -> None:
    """With --nproc N > 1: run this command as N processes through torchrun (after every check here,
    so bad input exits 2 before any process starts) and exit with their code. Else return: run it here."""
    if nproc is None:
        return
    from rescomp import distributed
    from rescomp.errors import ConfigError

    _nproc_ok(nproc)
    if distributed.launched():
        raise ConfigError("--nproc starts torchrun itself; under torchrun, the number of processes is its "
                          "--nproc_per_node: drop --nproc")
    if nproc == 1:
        return
    check()
    device = distributed.check_launch(cfgs, nproc)
    err.print(f"[dim]starting {nproc} processes (torchrun, {'NCCL' if device.type == 'cuda' else 'Gloo'})[/]",
              highlight=False)
    raise typer.Exit(distributed.launch(nproc, argv))


def _nproc_ok(nproc: int) -> None:
    from rescomp.errors import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes of at least 1 (one per GPU, or up to the "
                          f"CPU cores on a CPU)")


def _argv(command: str, config: Path, set_: Optional[List[str]], profile: Optional[str], seed: Optional[int],
          fresh: bool = False) -> list[str]:
    """The command line each process of --nproc runs: this one, without --nproc."""
    return ([command, str(config)] + [a for s in set_ or [] for a in ("--set", s)]
            + (["--profile", profile] if profile else []) + (["--seed", str(seed)] if seed is not None else [])
            + (["--fresh"] if fresh else []))


def _version(value: bool) -> None:
    if value:
        import torch

        from rescomp import __version__
        from rescomp.provenance import git_commit

        out.print(f"rescomp {__version__} (commit {git_commit()}), torch {torch.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print rescomp's version, commit and torch version, and exit")) -> None:
    """Reproduce and extend CNN-compression papers on CIFAR."""
    quiet_library_warnings()
    from rescomp import distributed

    if distributed.launched():  # one of torchrun's processes: rank 0 speaks for all
        distributed.end_with_launcher()
        if ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
            err.print(f"[bold red]error:[/] rescomp {ctx.invoked_subcommand} runs in one process; run it without "
                      f"torchrun (only {', '.join(DISTRIBUTED_COMMANDS)} train on several)", highlight=False)
            raise typer.Exit(2)
        if int(os.environ.get("RANK", "0")) != 0:
            out.quiet = err.quiet = True


def quiet_library_warnings() -> None:
    """Library warnings (deprecations in torch.ao, fvcore, ...) are for developers: each is written once
    to <cache>/warnings.log instead of the terminal. RESCOMP_WARNINGS=1 shows them."""
    if os.environ.get("RESCOMP_WARNINGS") == "1":
        return
    log = logging.getLogger("py.warnings")
    if not log.handlers:
        from rescomp.config import DataConfig
        from rescomp.data import cache_root

        path = cache_root(DataConfig()) / "warnings.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, delay=True)
        except OSError:
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    logging.captureWarnings(True)


# The file-system errors a user can act on (a folder not writable, a file where a folder should be)
USER_OS_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _terminate(signum, frame) -> None:
    raise Terminated()


def _what_was_kept(e: BaseException) -> str:
    """What an interrupted command left to resume from: its run's checkpoints, or, stopped before its first
    (rescomp.rundir.writing then removes the folder), nothing of that run."""
    gone = getattr(e, "nothing_saved", None)
    if gone is not None:
        return (f" before {gone} saved its first checkpoint, so that folder is removed: run the same command "
                f"again to start it anew")
    return ": run the same command again to resume from the last checkpoint"


def user_errors(fn: Callable) -> Callable:
    """A user mistake prints one line and exits 2 (or the error's own code); never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        # Only the main thread can set a handler. A rank under torchrun keeps SIGTERM's default, dying at
        # once: its launcher's end (PR_SET_PDEATHSIG) must stop it even inside a native collective, where a
        # Python handler would wait; the launcher itself ends as a Terminated run (distributed.launch).
        main = threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1")) <= 1
        before = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            return fn(*args, **kwargs)
        except Terminated as e:
            err.print(f"[yellow]terminated[/]{_what_was_kept(e)}")
            raise typer.Exit(Terminated.exit_code) from None
        except RescompError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # [x] stays text
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            err.print(f"[yellow]interrupted[/]{_what_was_kept(e)}")
            raise typer.Exit(130) from None
        except OSError as e:  # what the checks before the work cannot see: a full disk, a path that changed since
            if not (isinstance(e, USER_OS_ERRORS) or e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)):
                raise
            where = f": '{e.filename}'" if e.filename else ""
            err.print(f"[bold red]error:[/] {escape((e.strerror or str(e)) + where)}; check the path, its permissions "
                      f"and the free space, then run the same command again", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, before)

    return wrapper


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
def train(config: Path = typer.Argument(..., help="experiment YAML"), set_: Optional[List[str]] = SetOpt,
          profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt, dry_run: bool = DryOpt,
          fresh: bool = typer.Option(False, "--fresh", help="delete this run's folder and start over"),
          nproc: Optional[int] = NprocOpt) -> None:
    """Train what CONFIG describes; re-running an interrupted run resumes it."""
    from rescomp.stages.train import run_train

    cfgs = _configs(config, set_, profile, seed)
    if dry_run:
        return _dry_run(cfgs, "train", nproc, fresh)
    _spread(nproc, _argv("train", config, set_, profile, seed, fresh), cfgs, lambda: _checks(cfgs, "train", fresh))
    for cfg in cfgs:
        run_dir, summary = run_train(cfg, fresh=fresh, console=err)
        out.print(f"top-1 {summary['top1']:.2f}%  params {summary['params']:,}  MACs {summary['macs'] / 1e6:.2f} M  "
                  f"-> {run_dir}/summary.json")


@app.command()
@user_errors
def quantize(config: Path = typer.Argument(..., help="experiment YAML whose trained model to quantize"),
             set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt, dry_run: bool = DryOpt,
             fresh: bool = typer.Option(False, "--fresh", help="redo a finished quantization"),
             nproc: Optional[int] = NprocOpt) -> None:
    """Int8 a trained model (quantize.backend: FX x86, pt2e or onnxruntime): calibrate, evaluate and time it beside its fp32 model."""
    from rescomp.stages.quantize import run_quantize

    cfgs = _configs(config, set_, profile, seed)
    if dry_run:
        return _dry_run(cfgs, "quantize", nproc, fresh)
    _spread(nproc, _argv("quantize", config, set_, profile, seed, fresh), cfgs, lambda: _checks(cfgs, "quantize", fresh))
    for cfg in cfgs:
        run_dir, s = run_quantize(cfg, fresh=fresh, console=err)
        speed = "  ".join(f"{k.removeprefix('speedup_cpu_')} {v:.2f}x" for k, v in s.items() if k.startswith("speedup_cpu_"))
        out.print(f"int8 top-1 {s['top1']:.2f}% (fp32 {s['fp32_top1']:.2f}%, drop {s['top1_drop']:.2f} ± {s['top1_drop_se']:.2f}, "
                  f"same class on {s['agreement']:.2f}% of images)  size {s['size_ratio']:.2f}x of fp32  "
                  f"CPU speed-up {speed or '-'}  -> {run_dir}/summary.json")


@app.command()
@user_errors
def prune(config: Path = typer.Argument(..., help="experiment YAML with a prune section"),
          set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt, dry_run: bool = DryOpt,
          fresh: bool = typer.Option(False, "--fresh", help="redo a finished pruning run"),
          nproc: Optional[int] = NprocOpt) -> None:
    """Score filters, remove the lowest share, fine-tune, measure; repeat on the config's schedule."""
    from rescomp.stages.prune import run_prune

    cfgs = _configs(config, set_, profile, seed)
    if dry_run:
        return _dry_run(cfgs, "prune", nproc, fresh)
    _spread(nproc, _argv("prune", config, set_, profile, seed, fresh), cfgs, lambda: _checks(cfgs, "prune", fresh))
    for cfg in cfgs:
        run_dir, s = run_prune(cfg, fresh=fresh, console=err)
        first, last = s["rows"][0], s["rows"][-1]
        out.print(f"{100 * last['share']:.0f}% of {s['prunable_filters']:,} prunable filters removed: params "
                  f"{first['params']:,} -> {last['params']:,}, MACs {first['macs'] / 1e6:.1f} -> {last['macs'] / 1e6:.1f} M, "
                  f"top-1 {first['top1']:.2f} -> {last['top1']:.2f}%  -> {run_dir}/summary.json")


@app.command("run")
@user_errors
def run_pipeline(config: Path = typer.Argument(..., help="experiment YAML with a `pipeline:` of stages"),
                 set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt,
                 dry_run: bool = DryOpt,
                 fresh: bool = typer.Option(False, "--fresh", help="redo every stage of the chain (not a training run "
                                                                  "that a first later stage starts from)"),
                 nproc: Optional[int] = NprocOpt) -> None:
    """Run the config's pipeline (train -> prune -> layer_drop -> quantize, or any chain of them): each stage
    from the network the previous one left, each in its own resumable folder."""
    from rescomp.chain import run_chain

    cfgs = _configs(config, set_, profile, seed)
    if dry_run:
        return _dry_run(cfgs, "run", nproc, fresh)
    checks = lambda: _checks(cfgs, "run", fresh)  # noqa: E731 (every folder the chain can judge before it starts)
    _spread(nproc, _argv("run", config, set_, profile, seed, fresh), cfgs, checks)
    checks()
    for cfg in cfgs:
        def done(i, step, run_dir, s):
            top1 = s.get("top1", (s.get("rows") or [{}])[-1].get("top1"))
            out.print(f"{i + 1}. {step.name:<10} top-1 {top1:.2f}%  -> {run_dir}/summary.json" if top1 is not None
                      else f"{i + 1}. {step.name:<10} -> {run_dir}/summary.json", highlight=False)

        run_chain(cfg, fresh=fresh, console=err, report=done)


def _one_stage(name: str, command: str, doc: str) -> None:
    """`rescomp <command> CONFIG`: the one-stage chain of stage `name`, from the config's trained model
    (or <section>.checkpoint), resumable like every stage."""

    @user_errors
    def cmd(config: Path = typer.Argument(..., help=f"experiment YAML with a {name} section (or its defaults)"),
            set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt,
            dry_run: bool = DryOpt, fresh: bool = typer.Option(False, "--fresh", help=f"redo a finished {command} run"),
            nproc: Optional[int] = NprocOpt) -> None:
        from rescomp.runner import execute, stage

        cfgs = _configs(config, set_, profile, seed)
        if dry_run:
            return _dry_run(cfgs, command, nproc, fresh)
        _spread(nproc, _argv(command, config, set_, profile, seed, fresh), cfgs, lambda: _checks(cfgs, command, fresh))
        for cfg in cfgs:
            run_dir, s = execute(stage(name), cfg, fresh=fresh, console=err)
            last = s["rows"][-1]
            size = last.get("stored_bytes")
            out.print(f"top-1 {s['rows'][0]['top1']:.2f} -> {last['top1']:.2f}%"
                      + (f"  stored in {size / 1e3:,.1f} kB" if size else "") + f"  -> {run_dir}/summary.json")

    cmd.__doc__ = doc
    app.command(command)(cmd)


_one_stage("magnitude_prune", "magnitude-prune", "Deep Compression's pruning: zero the smallest weights step by step, "
           "retraining with the masks held; resumable.")
_one_stage("weight_share", "weight-share", "Deep Compression's weight sharing: k-means codes per layer, centroid "
           "fine-tuning, and the network written as Huffman-coded sparse codes (compressed.rcdc).")
_one_stage("binarize", "binarize", "SEP-Net pattern binarization: every k x k filter its sign pattern times a scale, "
           "fine-tuned straight through; written at 1 bit per weight (binarized.rcbn).")


@app.command("layer-drop")
@user_errors
def layer_drop(config: Path = typer.Argument(..., help="experiment YAML with a gated model and a layer_drop section"),
               set_: Optional[List[str]] = SetOpt, profile: Optional[str] = ProfileOpt, seed: Optional[int] = SeedOpt, dry_run: bool = DryOpt,
               fresh: bool = typer.Option(False, "--fresh", help="redo a finished layer-drop run"),
               nproc: Optional[int] = NprocOpt) -> None:
    """Delete residual units by learned importance, retraining between deletions; resumable."""
    from rescomp.stages.layer_drop import run_layer_drop

    cfgs = _configs(config, set_, profile, seed)
    if dry_run:
        return _dry_run(cfgs, "layer-drop", nproc, fresh)
    _spread(nproc, _argv("layer-drop", config, set_, profile, seed, fresh), cfgs,
            lambda: _checks(cfgs, "layer-drop", fresh))
    for cfg in cfgs:
        run_dir, s = run_layer_drop(cfg, fresh=fresh, console=err)
        rel, smallest = s["relative_smallest_lossless"], s["smallest_lossless"]
        judged = (f", chosen on validation top-1 {smallest['val_top1']:.2f}% (full {s['rows'][0]['val_top1']:.2f}%)"
                  if s.get("stop_on") == "val" else "")
        out.print(f"smallest lossless: {smallest['layers']} layers, top-1 {smallest['top1']:.2f}% "
                  f"(full {s['start_top1']:.2f}%){judged}; MACs {rel['macs']:.1f}%, params {rel['params']:.1f}% of full "
                  f"-> {run_dir}/summary.json")


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
def jobs(file: str = typer.Argument(..., help="a file of rescomp commands, one per line (--- ends a phase), or - "
                                             "for standard input"),
         gpus: Optional[str] = typer.Option(None, "--gpus", metavar="0,1,...", help="run one job per listed GPU at "
                                            "a time, each seeing only its GPU"),
         n_jobs: Optional[int] = typer.Option(None, "--jobs", metavar="N", help="run N jobs at a time on this "
                                              "machine (default 1: in order, to this terminal)"),
         logs: Path = typer.Option(Path("runs/logs"), "--logs", help="where side-by-side jobs write their output")) -> None:
    """Run a table's independent runs side by side: one per GPU (--gpus) or N at a time (--jobs); phases
    (--- lines) finish before the next starts, so shared training runs are made once, first."""
    import sys

    from rescomp import jobs as jobs_mod
    from rescomp.config_files import check_writable, read_text

    if file == "-":
        text, source = sys.stdin.read(), "standard input"
    else:
        text = read_text(Path(file), "jobs file", "pass a file of rescomp commands, one per line, or - for standard input")
        source = file
    phases = jobs_mod.parse(text, source, _command_fault)
    where = jobs_mod.slots(gpus, n_jobs)
    if len(where) > 1:  # side by side, each job writes its log there
        check_writable(logs, "--logs")
    code = jobs_mod.run(phases, where, logs, lambda line: err.print(line, highlight=False, markup=False))
    raise typer.Exit(code)


def _usage_error() -> type[Exception]:
    """What a command's parser raises for words it refuses: typer's own click's error (typer 0.26 and later
    vendor click), else click's."""
    try:
        from typer import TyperException
        return TyperException
    except ImportError:
        from click import ClickException
        return ClickException


def _command_fault(args: list[str], first: bool = True) -> Optional[str]:
    """What is wrong with the words of `rescomp <args>` that no run needs to find out: a command or an
    option this CLI does not have, a config it names that cannot be read with its --set and --profile;
    None if nothing. A line of a later phase (`first` false) may name a config an earlier phase writes
    (runs/<name>/config.yaml): one not there yet is left to the run."""
    from rescomp.errors import ConfigError
    from rescomp.registry import suggest

    commands = typer.main.get_command(app).commands
    if args[0] not in commands:
        return f"'{args[0]}' is no rescomp command{suggest(args[0], list(commands))}"
    params = {o: p for p in commands[args[0]].params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    words = iter(args[1:])
    given: dict[str, list[str]] = {"--set": [], "--profile": [], "": []}  # option values; "": the arguments
    for word in words:
        if word == "--":  # the end of options: the rest are arguments
            given[""] += list(words)
            break
        opt = word.split("=", 1)[0]
        if opt in params:
            if "=" not in word and not getattr(params[opt], "is_flag", False):
                value = next(words, None)  # its value, which may start with '-' (--seed -1, --baseline -r20)
            else:
                value = word.split("=", 1)[1] if "=" in word else None
            if opt in given and value is not None:
                given[opt].append(value)
        elif opt.startswith("-") and opt != "--help":
            return f"rescomp {args[0]} has no option '{opt}'{suggest(opt, sorted(params))}"
        else:
            given[""].append(word)
    try:  # the rest of the words as the command parses them: a value of the wrong type, an extra argument
        parsed = commands[args[0]].make_context(f"rescomp {args[0]}", list(args[1:])).params
        if parsed.get("nproc") is not None:
            _nproc_ok(parsed["nproc"])
    except typer.Exit:  # --help
        pass
    except _usage_error() as e:
        return f"rescomp {args[0]}: {getattr(e, 'format_message', e.__str__)()}"
    except ConfigError as e:
        return str(e)
    config = next((a for a in given[""] if a.endswith((".yaml", ".yml"))), None)
    if config is not None and (first or Path(config).exists()):  # its file, keys and values, as the command reads them
        from rescomp.config import load_config

        try:
            load_config(config, given["--set"], given["--profile"][-1] if given["--profile"] else None)
        except ConfigError as e:
            return str(e)
    return None


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
