"""`rescomp run`: a chain of stages (rescomp.runner.STAGES) from one config.

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
from rescomp.config import ExperimentConfig, validate
from rescomp.config_files import deep_merge
from rescomp.errors import ConfigError
from rescomp.rundir import other_settings, read_summary, refusal, run_folder, saved_config, train_fresh
from rescomp.runner import Stage, execute, stage, traits_of


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
        out.append(Step(name, stage(name), overrides or {}))
    return out


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
    scfg = validate(raw, f"pipeline stage {step.name}").rooted(cfg._root)
    scfg._loaded = cfg._loaded  # the same file and options load it: its training run is the chain's
    return scfg


def plan(cfg: ExperimentConfig) -> list[tuple[Step, ExperimentConfig]]:
    """Every stage's config, after refusing a chain that cannot work: a stage that cannot take what the
    one before it makes, or a stage config with a mistake its own command would refuse. Nothing runs."""
    chain = steps(cfg)
    first = chain[0]
    if first.stage.first_only:
        traits = traits_of({"arch": stage_config(cfg, first).model.spec(cfg.data.num_classes)})
    else:  # a chain that starts later starts from that stage's checkpoint, or from the config's trained network
        own = getattr(stage_config(cfg, first), first.stage.section).checkpoint
        traits = traits_of(checkpoint.load(cfg.at(own), mmap=True)) if own and cfg.at(own).is_file() else \
            traits_of({"arch": cfg.model.spec(cfg.data.num_classes)})
    out = []
    for i, step in enumerate(chain):
        why = step.stage.refuses(traits) if i or not step.stage.first_only else None
        if why:
            after = f" cannot follow {chain[i - 1].name}" if i else ""
            raise ConfigError(f"pipeline stage {i + 1} ({step.name}){after}: {why}")
        scfg = stage_config(cfg, step)
        step.stage.chain_check(scfg)
        if i == 0:  # no earlier stage makes its input; judged first, as its checks then read that network
            step.stage.check_source(scfg)
        step.stage.check(scfg)
        out.append((step, scfg))
        traits = step.stage.gives(traits)
    return out


def _settings_refusal(scfg: ExperimentConfig, folder: Path, suffix: str, section: str) -> Optional[str]:
    """What the chain will refuse of a later stage's folder that can be read before the stage ahead of it is
    complete: a run of other settings than the stage's, apart from the network it starts from (not made
    yet; taken as the one the folder was made from). The chain trained the stages ahead first, then refused."""
    if not (folder / "config.yaml").is_file():
        return None
    start = getattr(saved_config(folder), section).checkpoint
    same = scfg.model_copy(update={section: getattr(scfg, section).model_copy(update={"checkpoint": start})})
    return refusal(same, False, suffix, section) if other_settings(folder, same, section) else None


def describe(cfg: ExperimentConfig, refused: list[str], fresh: bool = False) -> list[str]:
    """`rescomp run --dry-run`: each stage, its run folder and what the chain would do there, judged as the
    stage's own command judges it (rescomp.plan.folder_state), with the input the chain would hand it; the
    folders the chain would refuse go into `refused`, in its words. A stage after one that is not complete
    is judged when that one is (the network it starts from does not exist yet), unless `fresh` (the chain's
    --fresh) redoes it whatever it holds. Nothing runs."""
    from rescomp.plan import folder_state

    lines, name, source, before = [], None, None, ""
    for i, (step, scfg) in enumerate(plan(cfg)):
        if i:
            scfg = stage_config(cfg, step, name, source) if source else scfg.model_copy(update={"name": name})
        suffix = step.stage.suffix(scfg)
        first_done = i == 0 and (run_folder(scfg, suffix) / "summary.json").is_file() and not fresh
        if i == 0 and step.stage.trains_first(scfg) and not first_done:  # its input: the config's training run
            trained, state = folder_state(scfg, refused, redo=train_fresh(scfg))
            lines.append(f"0. {'train':<10} -> {trained}: {state}")
        if i and source is None and not fresh:
            folder, state = run_folder(scfg, suffix), f"judged when stage {i} ({before}) is complete"
            if why := _settings_refusal(scfg, folder, suffix, step.stage.section):
                refused.append(why)
                state = "refused (below)"
        else:
            folder, state = folder_state(scfg, refused, suffix, step.stage.section, fresh)
        done = folder / "summary.json"
        source = (Path(cfg.written(step.stage.network(scfg, folder, read_summary(done))))
                  if state.startswith("complete") else None)
        name, before = folder.name, step.name
        lines.append(f"{i + 1}. {step.name:<10} -> {folder}: {state}")
    return lines


def run_chain(cfg: ExperimentConfig, *, fresh: bool = False, console: Optional[Console] = None,
              report: Optional[Callable[[int, Step, Path, dict[str, Any]], None]] = None) -> list[tuple[Path, dict[str, Any]]]:
    """Run every stage in order, each from the network the previous one left; finished stages are
    returned as they are, an interrupted one resumes (`fresh`: every stage is redone)."""
    planned = plan(cfg)
    done: list[tuple[Path, dict[str, Any]]] = []
    name, source = None, None
    for i, (step, scfg) in enumerate(planned):
        if i:
            scfg = stage_config(cfg, step, name, source)
        run_dir, summary = execute(step.stage, scfg, fresh=fresh, console=console)
        output = step.stage.network(scfg, run_dir, summary)
        name, source = run_dir.name, Path(cfg.written(output))
        done.append((run_dir, summary))
        if report:
            report(i, step, run_dir, summary)
    return done

