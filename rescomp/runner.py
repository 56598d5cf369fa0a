"""`rescomp run`: a chain of stages (train, prune, layer_drop, quantize) from one config.

Each stage is registered by name with what it needs from its input network and what it makes of it
(traits: `gated` residual units, `int8`), so a chain that cannot work is refused, exit 2, before any
stage runs or any folder is made. Each stage then runs as its own command does, in its own resumable
folder, starting from the network the previous stage left:

    runs/<name>                                  train
    runs/<name>-prune-paper-taylor-custom        prune, from the trained network
    runs/<name>-prune-...-layerdrop-gate-k2-n10  layer-drop, from the last pruned network
    runs/<name>-prune-...-layerdrop-...-ptq      int8, from the smallest lossless shortened network

A stage's folder name extends the previous one's, so every folder says the chain that made it, and a
single command (`rescomp prune`) is the one-stage chain that starts from the config's trained network.
Running the same command again skips finished stages and resumes an interrupted one at its last
checkpoint (a prune or layer-drop stage at its last finished step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from rescomp import checkpoint
from rescomp.config import ExperimentConfig, deep_merge, validate
from rescomp.errors import ConfigError
from rescomp.registry import Registry

Traits = frozenset[str]


@dataclass(frozen=True)
class Stage:
    section: str  # the config section a pipeline entry's mapping overrides
    run: Callable[..., tuple[Path, dict[str, Any]]]  # (cfg, fresh=, console=) -> (run folder, summary)
    check: Callable[[ExperimentConfig], None]  # mistakes in its config, before anything runs
    output: Callable[[ExperimentConfig, Path, dict[str, Any]], Path]  # the network a finished run leaves
    refuses: Callable[[Traits], Optional[str]]  # why it cannot take a network with these traits
    folder: Callable[[ExperimentConfig], Path]  # the run folder it writes for a config
    gives: Callable[[Traits], Traits] = lambda t: t
    first_only: bool = False  # train starts a chain from the config's model; it takes no input


STAGES: Registry[Stage] = Registry("pipeline stage")


def _fp32_only(name: str) -> Callable[[Traits], Optional[str]]:
    return lambda t: f"{name} takes an fp32 network, and an earlier stage made it int8; put quantize last" \
        if "int8" in t else None


def _nothing(cfg: ExperimentConfig) -> None:
    return None


# -- the stages ------------------------------------------------------------------------------------

def _train_run(cfg, **kw):
    from rescomp.pipeline import run_train

    return run_train(cfg, **kw)


def _train_check(cfg: ExperimentConfig) -> None:
    from rescomp.pipeline import model_spec

    model_spec(cfg)


def _prune_run(cfg, **kw):
    from rescomp.prune_run import run_prune

    return run_prune(cfg, **kw)


def _prune_check(cfg: ExperimentConfig) -> None:
    from rescomp.prune_run import check

    if len(cfg.prune.plan()) > 1:
        raise ConfigError(f"prune.schedule {cfg.prune.schedule} prunes each target from the trained network in a run "
                          f"of its own, so it leaves no one network for the next stage; use a gradual schedule "
                          f"(prune.schedule: custom with share_per_step and steps)")
    check(cfg)


def _prune_output(cfg: ExperimentConfig, run_dir: Path, summary: dict[str, Any]) -> Path:
    return run_dir / f"step{summary['rows'][-1]['step']:02d}" / "model.pt"  # where it stopped (stop_at) or ended


def _layer_drop_run(cfg, **kw):
    from rescomp.layer_drop_run import run_layer_drop

    return run_layer_drop(cfg, **kw)


def _layer_drop_check(cfg: ExperimentConfig) -> None:
    from rescomp.layer_drop_run import check

    check(cfg)


def _layer_drop_output(cfg: ExperimentConfig, run_dir: Path, summary: dict[str, Any]) -> Path:
    """The method's result: the smallest network whose top-1 stayed within the tolerance (Algorithm 1's
    stop rule), or the network it started from if no deletion kept it."""
    from rescomp.layer_drop_run import smallest_lossless

    rows = [r for r in summary["rows"] if r["method"] == "layer-drop"]
    best = smallest_lossless(rows, summary["start_top1"] - cfg.layer_drop.tolerance)
    return run_dir / f"step{best['step']:02d}" / "model.pt" if best["step"] else Path(summary["source"])


def _gates_needed(t: Traits) -> Optional[str]:
    if "int8" in t:
        return _fp32_only("layer_drop")(t)
    return None if "gated" in t else ("layer_drop needs gated residual units: add `gates: {init: [-1, 1]}` under "
                                      "model: (the network the chain starts from has none)")


def _quantize_run(cfg, **kw):
    from rescomp.pipeline import run_quantize

    return run_quantize(cfg, **kw)


def _folder(stage: Callable[[ExperimentConfig], str]) -> Callable[[ExperimentConfig], Path]:
    def folder(cfg: ExperimentConfig) -> Path:
        from rescomp.pipeline import run_folder

        return run_folder(cfg, stage(cfg))

    return folder


def _prune_suffix(cfg: ExperimentConfig) -> str:
    from rescomp.prune_run import suffix

    return suffix(cfg)


STAGES.register("train")(Stage("train", _train_run, _train_check, lambda c, d, s: d / "model.pt",
                               lambda t: "train starts a chain from the config's model; it takes no network "
                                         "from an earlier stage (put it first)", _folder(lambda c: "train"),
                               first_only=True))
STAGES.register("prune")(Stage("prune", _prune_run, _prune_check, _prune_output, _fp32_only("prune"),
                               _folder(_prune_suffix)))
STAGES.register("layer_drop")(Stage("layer_drop", _layer_drop_run, _layer_drop_check, _layer_drop_output,
                                    _gates_needed, _folder(lambda c: "layerdrop")))
STAGES.register("quantize")(Stage("quantize", _quantize_run, _nothing, lambda c, d, s: d / "int8.pt",
                                  lambda t: ("a chain quantizes once: the network is int8 already" if "int8" in t
                                             else None), _folder(lambda c: c.quantize.method),
                                  gives=lambda t: t | {"int8"}))


# -- chains -----------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    stage: Stage
    overrides: dict[str, Any]


def steps(cfg: ExperimentConfig) -> list[Step]:
    if not cfg.pipeline:
        raise ConfigError("this config has no pipeline; add one, e.g. `pipeline: [train, {prune: {steps: 6}}, "
                          "quantize]`, or run a single stage with its own command")
    out = []
    for entry in cfg.pipeline:
        name, overrides = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        out.append(Step(name, STAGES.get(name), overrides or {}))
    return out


def _traits(spec: dict[str, Any]) -> Traits:
    return frozenset({"gated"} if spec.get("gates") else set())


def stage_config(cfg: ExperimentConfig, step: Step, name: Optional[str] = None,
                 source: Optional[Path] = None) -> ExperimentConfig:
    """The config a stage runs with: its section overridden by its entry, named after the previous stage's
    folder (`name`) and starting from the network that stage left (`source`, relative to the project)."""
    raw = cfg.to_dict()
    raw["pipeline"] = None
    if step.overrides:
        raw = deep_merge(raw, {step.stage.section: step.overrides})
    if name is not None:
        raw["name"] = name
    if source is not None:
        raw[step.stage.section]["checkpoint"] = str(source)
    return validate(raw, f"pipeline stage {step.name}").rooted(cfg._root)


def plan(cfg: ExperimentConfig) -> list[tuple[Step, ExperimentConfig]]:
    """Every stage's config, after refusing a chain that cannot work: a stage that cannot take what the
    one before it makes, or a stage config with a mistake its own command would refuse. Nothing runs."""
    chain = steps(cfg)
    first = chain[0]
    if first.stage.first_only:
        traits = _traits(stage_config(cfg, first).model.spec(cfg.data.num_classes))
    else:  # a chain that starts later starts from that stage's checkpoint, or from the config's trained network
        own = getattr(stage_config(cfg, first), first.stage.section).checkpoint
        traits = _traits(checkpoint.load(cfg.at(own))["arch"]) if own and cfg.at(own).is_file() else \
            _traits(cfg.model.spec(cfg.data.num_classes))
    out = []
    for i, step in enumerate(chain):
        why = step.stage.refuses(traits) if i or not step.stage.first_only else None
        if why:
            after = f" cannot follow {chain[i - 1].name}" if i else ""
            raise ConfigError(f"pipeline stage {i + 1} ({step.name}){after}: {why}")
        scfg = stage_config(cfg, step)
        step.stage.check(scfg)
        out.append((step, scfg))
        traits = step.stage.gives(traits)
    return out


def run_chain(cfg: ExperimentConfig, *, console: Optional[Console] = None,
              report: Optional[Callable[[int, Step, Path, dict[str, Any]], None]] = None) -> list[tuple[Path, dict[str, Any]]]:
    """Run every stage in order, each from the network the previous one left; finished stages are
    returned as they are, an interrupted one resumes."""
    planned = plan(cfg)
    done: list[tuple[Path, dict[str, Any]]] = []
    name, source = None, None
    for i, (step, scfg) in enumerate(planned):
        if i:
            scfg = stage_config(cfg, step, name, source)
        run_dir, summary = step.stage.run(scfg, console=console)
        output = step.stage.output(scfg, run_dir, summary)
        name, source = run_dir.name, _project_relative(cfg, output)
        done.append((run_dir, summary))
        if report:
            report(i, step, run_dir, summary)
    return done


def _project_relative(cfg: ExperimentConfig, path: Path) -> Path:
    """`path` (usable from this process's folder) as the config writes paths: relative to its project."""
    import os

    root = cfg._root
    return Path(os.path.relpath(Path(path).resolve(), root)) if root is not None else Path(path)
