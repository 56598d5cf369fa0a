"""The `rescomp` command. Each command: load config -> one call -> print where results went."""

from __future__ import annotations

import errno
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rescomp.errors import RescompError, Terminated, parser_error
from rescomp.jobs import check_nproc



class _OneLineUsage(typer.core.TyperGroup):
    """Words the parser refuses (a missing argument, an option no command has, a value of the wrong type) said
    in one line naming the command, as every other user mistake is, instead of click's usage, hint and error
    lines; a bare `rescomp` still prints the help. Exit code 2, as click's."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except parser_error() as e:  # click's exceptions, under the names this typer gives them
            ctx = getattr(e, "ctx", None)
            if ctx is None or type(e).__name__ == "NoArgsIsHelpError":  # not the words (or a bare `rescomp`)
                e.show()
            else:
                where = " ".join(["rescomp", *(c.info_name for c in _parents(ctx) if c.parent is not None)])
                said = " ".join(e.format_message().split()).rstrip(".")
                if type(e).__name__ == "NoSuchOption" and any(p.name == "set_" for p in ctx.command.params):
                    from rescomp.config_doc import set_hint

                    if hint := set_hint(e.option_name):  # a config key taken for an option: say how to set it
                        said = f"no option '{e.option_name}'; {hint}"
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
        check_nproc(nproc)
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

    check_nproc(nproc)
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


def _command_fault(args: list[str], first: bool = True) -> Optional[str]:
    """What is wrong with the words of `rescomp <args>` that no run needs to find out (rescomp.jobs.command_fault)."""
    from rescomp.jobs import command_fault

    return command_fault(typer.main.get_command(app).commands, args, first)


# The commands that look at what runs made (measure, export, report, compare, runs, config, models), after these
from rescomp import cli_results  # noqa: E402,F401  (registers them; it imports this module's app)


def main() -> None:
    app()


if __name__ == "__main__":  # `python -m rescomp.cli`: this file is then another module than rescomp.cli, whose
    from rescomp.cli import main as registered  # app is the one cli_results registers its commands on

    registered()
