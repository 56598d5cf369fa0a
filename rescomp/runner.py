"""The stage interface and the one resumable step runner every stage runs through.

A technique is a `Stage`, registered by name in `STAGES` (rescomp.stages holds one file per stage):
its config section, the run-folder suffix it writes, the checks of its config, the network it starts
from, its `body` (the work), the network it leaves, and what it can take from the stage before it.
`execute` runs any stage the same way, so no stage re-implements folders, resume or provenance:

    context (device named first) -> check (every user mistake, before any folder is touched)
    -> data -> claim the run folder (a finished run is returned as it is; --fresh empties it)
    -> the network it starts from (a checkpoint, or this config's training run, trained first)
    -> body(StageRun) inside `writing` (removed again if it fails before anything resumable)
    -> summary.json: the body's fields and rows, with the provenance every row carries.

A stage that works in steps (prune, layer-drop) runs each through `StageRun.step`: one folder per
step, returned as saved if finished, else seeded, transformed, fine-tuned (resumably, from its own
checkpoints), reloaded and measured, its row written last, so an interrupted run resumes at the step
where it stopped. A single command is a one-stage chain (`rescomp prune` = `execute(STAGES['prune'])`);
rescomp.chain strings stages together.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.console import Console

from rescomp import checkpoint, distributed
from rescomp.config import ExperimentConfig
from rescomp.context import RunContext, make_context, seed_everything
from rescomp.data import make_loaders, prepare
from rescomp.errors import CheckpointError, ConfigError
from rescomp.models import base_network, check_spec, get_entry, probe
from rescomp.provenance import stamp
from rescomp.registry import Registry
from rescomp.rundir import FRESH, claim, read_summary, record_made, refusal, run_folder, train_fresh, writing
from rescomp.train import Trainer, evaluate

Traits = frozenset[str]  # what a network is, as far as later stages care: 'gated' residual units, 'int8'
Start = tuple[torch.nn.Module, dict[str, Any], Path]  # (model, its checkpoint payload, where it came from)


def traits_of(payload: dict[str, Any]) -> Traits:
    """What a stored network is, as far as stages care: gated residual units, masked (sparse) or weight-shared
    or binarized ('coded') layers, from its arch spec; int8, from its checkpoint's kind; what its checkpoint
    says besides (`traits`: magnitude_prune's network, sparse with its masks baked into zeros). A bare spec
    is `{"arch": spec}`."""
    spec = payload.get("arch") or {}
    found = {t for t, key in (("gated", "gates"), ("sparse", "masked"), ("coded", "shared"), ("coded", "binarized"))
             if spec.get(key)}
    found |= set(payload.get("traits") or [])
    return frozenset(found | ({"int8"} if payload.get("kind") == checkpoint.INT8 else set()))


@dataclass(frozen=True)
class Stage:
    """A technique as the runner and the chains see it. `body` gets the network to work on (with its spec),
    the config and the context in a `StageRun`, and returns its summary fields, `rows` among them; the
    network it leaves is `output(cfg, run folder, summary)`, a model.pt or int8.pt that rebuilds from its spec."""
    name: str
    section: str  # the config section a pipeline entry overrides, and that decides its result with the recipe
    suffix: Callable[[ExperimentConfig], str]  # its run folder: runs/<name>-<suffix> ('' for runs/<name>)
    check: Callable[[ExperimentConfig], Any]  # user mistakes, before anything runs; its result is run.checked
    body: Callable[["StageRun"], dict[str, Any]]
    output: Callable[[ExperimentConfig, Path, dict[str, Any]], Path]
    refuses: Callable[[Traits], Optional[str]]  # why it cannot take a network with these traits, or None
    gives: Callable[[Traits], Traits] = lambda t: t
    start: Optional[Callable[[ExperimentConfig, RunContext], Start]] = None  # default: start_model(<section>.checkpoint)
    context: Callable[[ExperimentConfig, Optional[Console]], RunContext] = lambda cfg, console: make_context(cfg, console=console)
    first_only: bool = False  # train starts a chain from the config's model; it takes no input
    chain_check: Callable[[ExperimentConfig], None] = lambda cfg: None  # what else a chain needs: one network out
    # Its input, where it must exist already: checked by a run (and --dry-run) before the data is decoded
    # and its folder claimed, not by a chain's plan, whose earlier stages make it. Default: the section's
    # checkpoint, where one is given (without one, the config's training run is made first). It returns
    # the payload of the section's checkpoint if it read it, so that check_source does not read it again.
    check_input: Optional[Callable[[ExperimentConfig], Optional[dict[str, Any]]]] = None
    # Files besides the network it starts from whose bytes decide its result (train's distillation teacher):
    # recorded with that network's (rescomp.rundir.MADE), so a result made from an older copy is not reused.
    inputs: Callable[[ExperimentConfig], list[Path]] = lambda cfg: []

    def network(self, cfg: ExperimentConfig, run_dir: Path, summary: dict[str, Any]) -> Path:
        """The network a finished run hands on (`output`), or ConfigError where its summary lacks what names it."""
        try:
            return self.output(cfg, run_dir, summary)
        except (KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"{run_dir / 'summary.json'} is not a complete {self.name} summary (nothing names its "
                              f"network: {e}); re-run that stage with --fresh") from None

    def trains_first(self, cfg: ExperimentConfig) -> bool:
        """Whether it starts from this config's own training run, made (or found finished) first: it has no
        start of its own and its section names no checkpoint."""
        return self.start is None and not getattr(cfg, self.section).checkpoint

    def check_source(self, cfg: ExperimentConfig) -> None:
        """The network it is given (its section's checkpoint) is there and one it can take, as a chain judges
        the network an earlier stage hands it: missing, corrupt, not rescomp's, or int8 for a stage that
        takes fp32 is one line, before any work."""
        read = self.check_input(cfg) if self.check_input is not None else None
        path = getattr(getattr(cfg, self.section, None), "checkpoint", None)
        if path:
            payload = read if read is not None else checkpoint.load(cfg.at(path), mmap=True)
            why = self.refuses(traits_of(payload)) or other_classes(payload, cfg) or other_network(payload, cfg)
            if why:
                raise CheckpointError(f"{self.section}.checkpoint '{path}': {why}")


def other_classes(payload: dict[str, Any], cfg: ExperimentConfig) -> Optional[str]:
    """Why a network cannot be fine-tuned, scored or evaluated on cfg's data: its classifier has another
    number of classes (fewer fail on the first label past them; more would be scored as if it fit)."""
    classes = (payload.get("arch") or {}).get("num_classes")
    if classes is None or classes == cfg.data.num_classes:
        return None
    return (f"it classifies {classes} classes, but the data ({cfg.data.dataset}) has {cfg.data.num_classes}; give a "
            f"network trained on this dataset, or set data: to the one it was trained on")


def other_network(payload: dict[str, Any], cfg: ExperimentConfig) -> Optional[str]:
    """Why a network is not the one cfg's model section describes: another architecture or builder argument
    (the transforms a stage adds, gates, pruned shapes or deleted units, may differ). The run's config, its
    hash and its rows' labels would name a network it did not work on."""
    spec = payload.get("arch") or {}
    if not spec.get("arch"):
        return None
    held, mine = base_network(spec), base_network(cfg.model.spec(cfg.data.num_classes))
    if held == mine:
        return None
    keys = ["arch"] if held["arch"] != mine["arch"] else sorted(held.keys() | mine.keys())  # another builder: its name
    changed = ", ".join(f"{k} {held.get(k)!r} (here {mine.get(k)!r})" for k in keys if held.get(k) != mine.get(k))
    return (f"it holds another network than this config's model: {changed}; set model: to the network it holds, "
            f"or leave the checkpoint unset to start from this config's own training run")


STAGES: Registry[Stage] = Registry("pipeline stage")


def stage(name: str) -> Stage:
    """The registered stage `name`; the stage modules register themselves when rescomp.stages is imported."""
    importlib.import_module("rescomp.stages")
    return STAGES.get(name)


def fp32_only(name: str, retrains: bool = False) -> Callable[[Traits], Optional[str]]:
    """Why `name` cannot take a network with these traits: int8 (quantize ends a chain), codes
    (weight_share and binarize end one), or, for a stage that `retrains` every weight without a mask, the
    zeros of magnitude_prune (they would grow back)."""
    def refuses(t: Traits) -> Optional[str]:
        if "int8" in t:
            return (f"{name} takes an fp32 network, and this one is int8; start from the fp32 model.pt it was "
                    f"quantized from (quantize comes last in a chain)")
        if "coded" in t:
            return (f"{name} cannot take a network made by weight_share or binarize: their codes are how the "
                    f"network is stored, so they end a chain")
        if retrains and "sparse" in t:
            return (f"{name} retrains every weight without a mask, so magnitude_prune's zeros would grow back; "
                    f"put {name} before magnitude_prune")
        return None

    return refuses


@dataclass
class StageRun:
    """What the runner hands a stage's body: config, context, data, its run folder, and the network it
    starts from (model on the context's device, spec, checkpoint payload, source path)."""
    cfg: ExperimentConfig
    ctx: RunContext
    splits: Any
    out: Path
    model: Optional[torch.nn.Module]
    payload: dict[str, Any]
    source: Optional[Path]
    checked: Any = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def spec(self) -> dict[str, Any]:
        return self.payload.get("arch", {})

    @cached_property
    def trained(self) -> Optional[int]:
        """The epochs the network it starts from was trained in all (epochs_trained)."""
        return epochs_trained(self.payload, self.source)

    @cached_property
    def loaders(self) -> dict[str, Any]:
        return train_loaders(self.cfg, self.ctx, self.splits)

    def step(self, n: int, transform: Callable[[], tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]],
             row: Callable[[torch.nn.Module, dict[str, Any], dict[str, Any], dict[str, float]], dict[str, Any]], *,
             epochs: int, lr: Optional[float] = None, base: Optional[Path] = None
             ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        """Step n in <base or the run folder>/stepNN: (model, spec, row) as saved if it finished; else, seeded
        with seed + n, `transform()` -> (model, spec, info), `epochs` of fine-tuning (resumable from the
        step's checkpoints), the fine-tuned model reloaded from its model.pt, `row(model, spec, info,
        test metrics)`, written last: a step without its row.json is redone from its checkpoints."""
        step_dir = (base or self.out) / f"step{n:02d}"
        done = finished_step(step_dir)
        if done:
            model, spec, r = done
            return model.to(self.ctx.device), spec, r
        seed_everything(self.cfg.seed + n)
        model, spec, info = distributed.agree(*transform())  # under several processes, rank 0's network on every rank
        # the network step n transforms is step n - 1's (in the same base folder), or the one the run starts from
        previous = step_dir.parent / f"step{n - 1:02d}" / "model.pt"
        before = self.trained if n == 1 else epochs_trained(checkpoint.peek(previous) or {}, previous)
        ev = train_and_eval(model, spec, retrain_config(self.cfg, epochs, lr), self.ctx, self.loaders, step_dir,
                            before=before)
        model, _ = checkpoint.load_model(step_dir / "model.pt")
        model = model.to(self.ctx.device)
        r = row(model, spec, info, ev)
        checkpoint.atomic_write_text(step_dir / "row.json", json.dumps(r, indent=2))
        return model, spec, r


def execute(st: Stage, cfg: ExperimentConfig, *, fresh: bool = False,
            console: Optional[Console] = None, redo: str = FRESH) -> tuple[Path, dict[str, Any]]:
    """Run one stage on cfg (module docstring): its folder and summary, finished or resumed (`redo`: what
    would redo it, said where it is found finished)."""
    t_start = time.perf_counter()
    ctx = st.context(cfg, console)  # a device that is not there is named first
    st.check_source(cfg)  # what it is given first: its checks then judge that network (start_spec)
    checked = st.check(cfg)
    if fresh and st.trains_first(cfg):  # what that training run would refuse stops this one here, before
        # --fresh empties its folder (that run's own --fresh is `rescomp train --fresh`)
        train = stage("train")
        train.check_source(cfg)
        train.check(cfg)
        if why := distributed.on_main(lambda: refusal(cfg, False, "", train.section, train_fresh(cfg))):
            raise ConfigError(why)
        if (run_folder(cfg) / "summary.json").is_file():  # its network, gone or corrupt, before --fresh deletes
            checkpoint.load(run_folder(cfg) / "model.pt", mmap=True)
    splits = prepare(cfg.data, cfg.seed)
    out, finished = distributed.on_main(lambda: claim(cfg, fresh, st.suffix(cfg), st.section, redo))  # rank 0 decides
    if finished is not None:
        ctx.log(f"{out} is already complete; {redo} redoes it")
        return out, finished
    model, payload, source = (st.start or _start_from_section(st.section))(cfg, ctx)
    ctx.run_dir = out
    run = StageRun(cfg, ctx, splits, out, model, payload, source, checked, t_start)
    with writing(out, cfg):
        inputs = distributed.on_main(lambda: record_made(out, ([source] if source is not None else []) + st.inputs(cfg),
                                                         cfg, st.section, payload.get("arch"), redo=redo))
        fields = st.body(run)
        summary = {"stage": st.name, "name": out.name, "table": cfg.report.table, "dataset": cfg.data.dataset,
                   "profile": cfg.profile, "seed": cfg.seed, "config_hash": cfg.hash(st.section), "precision": ctx.arithmetic,
                   **({"source": cfg.written(source)} if source is not None else {}), **({"inputs": inputs} if inputs else {}), **fields, **splits.stamp(),
                   "wall_seconds": time.perf_counter() - t_start, **stamp(ctx.device)}
        checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return out, summary


# -- what every stage shares ------------------------------------------------------------------------

def start_spec(cfg: ExperimentConfig, section: str) -> tuple[dict[str, Any], Optional[str]]:
    """The spec of the network a stage will start from, for its checks before any work (and what --dry-run
    says of it), and the checkpoint it was read from: its section's checkpoint's, where one is given and can
    be read (Stage.check_source refuses one that cannot), else the config's model (None). The config's model
    is validated either way."""
    spec = model_spec(cfg)
    path = getattr(cfg, section).checkpoint
    if path:
        given = (checkpoint.peek(cfg.at(path)) or {}).get("arch")
        if given:
            return given, path
    return spec, None


def model_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    """The validated arch spec of the config's model, or ConfigError."""
    spec = cfg.model.spec(cfg.data.num_classes)
    check_spec(spec)
    entry = get_entry(spec["arch"])
    if cfg.data.image_size < entry.min_input:
        raise ConfigError(
            f"model '{spec['arch']}' needs inputs of at least {entry.min_input} pixels but data.image_size is "
            f"{cfg.data.image_size}; raise data.image_size"
        )
    probe(spec, cfg.data.image_size)
    return spec


def train_loaders(cfg: ExperimentConfig, ctx: RunContext, splits) -> dict[str, Any]:
    """The train / test (/ val) loaders of the config's training recipe on the context's device."""
    return make_loaders(splits, cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                        device=ctx.device, seed=cfg.seed, max_steps=cfg.train.max_steps_per_epoch,
                        rank=ctx.rank, world=ctx.world_size)


def start_model(cfg: ExperimentConfig, ctx: RunContext, path: Optional[str]) -> Start:
    """What a later stage starts from: the checkpoint at `path`, or this config's own training run
    (trained first, resumed, or found finished)."""
    if path:
        source = cfg.at(path)
    else:
        source = execute(stage("train"), cfg, console=ctx.console, redo=train_fresh(cfg))[0] / "model.pt"
    model, payload = checkpoint.load_model(source)
    return model, payload, source


def _start_from_section(section: str) -> Callable[[ExperimentConfig, RunContext], Start]:
    return lambda cfg, ctx: start_model(cfg, ctx, getattr(cfg, section).checkpoint)


def retrain_config(cfg: ExperimentConfig, epochs: int, lr: Optional[float] = None) -> ExperimentConfig:
    """The training config for a fine-tuning stage: `epochs`, the schedule's shape, lr if given. The shape
    is the training schedule's on a time axis scaled to the fine-tune: a warm-up of 2 of 30 epochs lasts
    2/30 of it, and milestones move with it, so that a 1-epoch fine-tune is neither all warm-up (ending at
    half its lr, undecayed) nor past no milestone."""
    s = cfg.train.schedule
    scale = epochs / cfg.train.epochs if cfg.train.epochs else 1.0
    schedule = s.model_copy(update={"warmup_epochs": s.warmup_epochs * scale, "step_size": s.step_size * scale or s.step_size,
                                    "milestones": [m * scale for m in s.milestones]})
    train = {"epochs": epochs, "eval_test_every": 0, "schedule": schedule}
    if lr is not None:
        train["optimizer"] = cfg.train.optimizer.model_copy(update={"lr": lr})
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def finished_step(step_dir: Path) -> Optional[tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]]:
    if (step_dir / "row.json").is_file() and (step_dir / "model.pt").is_file():
        model, payload = checkpoint.load_model(step_dir / "model.pt")
        return model, payload["arch"], json.loads((step_dir / "row.json").read_text())
    return None


def train_and_eval(model, spec, cfg: ExperimentConfig, ctx: RunContext, loaders, run_dir: Path,
                   distill=None, before: Optional[int] = None) -> dict[str, float]:
    """Train (resumably) in run_dir, then test; model.pt + the evaluation are kept there, with the epochs the
    network has been trained in all (epochs_trained): `before` this training, where known, and the epochs
    it ran (fewer than asked where it stopped early)."""
    done = run_dir / "model.pt"
    if done.is_file():
        return checkpoint.load(done)["metrics"]
    trainer = Trainer(model, loaders, cfg, ctx, run_dir, spec, distill=distill)
    state = trainer.fit()
    ev = evaluate(trainer.model, loaders["test"], ctx)
    checkpoint.save(done, {"arch": spec, "state_dict": trainer.model.state_dict(), "metrics": ev, "config": cfg.to_dict(),
                           **({} if before is None else {"epochs_total": before + state.epoch})})
    return ev


def epochs_trained(payload: dict[str, Any], source: Optional[Path]) -> Optional[int]:
    """The epochs the network in `payload` (read from `source`) has been trained in all: its training run's,
    then every fine-tune since (a pruned step's config says only its own fine-tune: layer-drop after pruning
    called a 5-epoch network a 1-epoch one). Checkpoints record it as epochs_total; for one saved before they
    did, a training run's network says it (its summary, else its config); None for an older later stage's."""
    if payload.get("epochs_total") is not None:
        return int(payload["epochs_total"])
    source = Path(source or "")
    if payload.get("traits") or payload.get("kind") or re.fullmatch(r"step\d+", source.parent.name):
        return None  # a later stage's network from before epochs_total: its config says only its own epochs
    summary = source.parent / "summary.json"
    try:
        made = read_summary(summary) if source.name == "model.pt" and summary.is_file() else {}
    except ConfigError:  # not a summary: its config says it, below
        made = {}
    if made.get("stage") == "train" and made.get("epochs"):
        return int(made["epochs"])
    epochs = ((payload.get("config") or {}).get("train") or {}).get("epochs")
    return int(epochs) if epochs else None
