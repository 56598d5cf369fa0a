"""Run folders: where a stage writes, whether it may, and what is left when it fails.

A run folder is named after its config and the stages that made it (`runs/<name>-prune-...-ptq`). It is
claimed only after every check has passed, compared with the config saved in it (a folder of other
settings is refused, naming the keys that differ), held by one process at a time (rescomp.runlock),
and removed when a run fails before writing anything it could resume from, so bad input leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from rescomp import checkpoint, distributed, runlock
from rescomp.config import ExperimentConfig, dump_config, validate
from rescomp.config_files import check_writable, parse_override
from rescomp.errors import CheckpointError, ConfigError
from rescomp.provenance import command_line


def differences(old: ExperimentConfig, new: ExperimentConfig, sections: tuple[str, ...] = ()) -> list[str]:
    """'key (old -> new)' for every setting that decides a run's result (ExperimentConfig.hash) and differs."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict) and d:
            return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(old.identity(*sections)), flat(new.identity(*sections))
    shown = lambda v: "unset" if v is None else (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa: E731
    return [f"{k} ({shown(a.get(k))} -> {shown(b.get(k))})" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def saved_config(run_dir: Path) -> ExperimentConfig:
    """The config a run folder keeps (config.yaml), or ConfigError naming the file where it cannot be read."""
    saved = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{saved}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}), so the run in "
                          f"'{run_dir}' cannot be judged; redo that run with --fresh, or move the folder away") from None
    return validate(raw, str(saved))


def run_of(network: Path) -> Optional[Path]:
    """The finished run whose folder holds the network file as its own: <run>/model.pt or int8.pt,
    <run>/stepNN/model.pt, <run>/toNN/stepNN/model.pt; None for any other file (a layer-drop baseline's
    network, in a folder of its run that is none of these, or a copy)."""
    folder = Path(network).parent
    if re.fullmatch(r"step\d+", folder.name):
        folder = folder.parent
        if re.fullmatch(r"to\d+", folder.name):
            folder = folder.parent
    return folder if (folder / "summary.json").is_file() else None


def run_folder(cfg: ExperimentConfig, suffix: str = "") -> Path:
    """runs/<name>, or runs/<name>-<suffix> for a later stage (`Stage.suffix`)."""
    return cfg.runs_dir / (f"{cfg.run_name}-{suffix}" if suffix else cfg.run_name)


def other_settings(run_dir: Path, cfg: ExperimentConfig, section: Optional[str] = None) -> list[str]:
    """The settings in which the run saved in run_dir differs from cfg ([] if none, or nothing saved):
    what decides the stage's result (the training sections and the stage's own `section`), and how it
    was measured and labelled. A finished run is returned only if all of it is unchanged, so no
    setting ever comes back with an old result."""
    return trained_otherwise(run_dir, cfg, *((section,) if section else ()), "measure", "report")


def trained_otherwise(run_dir: Path, cfg: ExperimentConfig, *sections: str) -> list[str]:
    """The training settings (and those of the later-stage `sections`) in which the run saved in run_dir
    differs from cfg ([] if none, or nothing saved): whether the network it made is the one cfg describes,
    for a command that reads it without running that stage (quantize, export)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    old, new = (_start_written(c, cfg, sections) for c in (saved_config(run_dir), cfg))
    return differences(old, new, sections) if old.identity(*sections) != new.identity(*sections) else []


def _start_written(c: ExperimentConfig, cfg: ExperimentConfig, sections: tuple[str, ...]) -> ExperimentConfig:
    """c with each of the stage `sections`' unset checkpoint written out as the network it names, the
    config's own training run's model.pt, as a chain writes it into the stage's config (cfg.written,
    relative to cfg's project): `rescomp prune` refused the folder `rescomp run` had made from that very
    network (prune.checkpoint 'runs/x/model.pt' -> unset), and the reverse."""
    start = cfg.written(run_folder(cfg) / "model.pt")
    unset = {s: getattr(c, s) for s in sections if getattr(getattr(c, s, None), "checkpoint", "") is None}
    return c.model_copy(update={s: part.model_copy(update={"checkpoint": start}) for s, part in unset.items()})


def resumable(run_dir: Path) -> bool:
    """Whether a run folder holds anything a run could resume from or report: any file but its config, its
    record of what it is made from and its lock."""
    return any(p.is_file() and p.name not in ("config.yaml", MADE, runlock.LOCK_NAME) for p in run_dir.rglob("*"))


# What a run is made from, recorded in its folder when it starts: the networks it starts from (and a
# distillation teacher), each by the digest of the network it holds (checkpoint.network_digest) under its
# path relative to the run folder, and the version of its stage's rules. A network re-made since under
# the same path (a checkpoint retrained with --fresh), or rules changed since, make the run's result
# stale: it is neither returned as complete nor resumed, and `rescomp report` refuses its rows (the
# summary keeps the same `inputs`).
MADE = "made.json"
# A stage's rules: the version a run of its section is made under, and what changed since version 1,
# for a given config (a change that changes only some configs' results bumps only theirs) and, for prune,
# the network scored (recorded as `gated`; a folder made before that record is judged by the networks it
# keeps). A folder without a record was made under version 1.
FINE_TUNE_SCALED = ("a fine-tune's warm-up, milestones and step size scaled to its length (a 1-epoch fine-tune "
                    "after a 2-epoch warm-up was all warm-up)")
PRUNE_RULES = ("the fast schedule's two steps 3 x finetune_epochs apart (Martineau's epochs 4 and 7; they were "
               "1), the paper policy leaving a conv that several layers read, and " + FINE_TUNE_SCALED)
GATED_SCORES = ("a gated unit's last conv scored after its BatchNorm, as every other conv is (it was scored at "
                "the conv's output)")
ACTIVATION_CRITERIA = ("taylor", "mean_activation")  # scored on activations (rescomp.compress.prune.activation_modules)
IN_PLACE_SCORES = ("a conv whose BatchNorm output the network then changes in place (torchvision's residual `out += "
                   "identity`) scored on that BatchNorm's output (it was scored on the block's output)")
# The networks whose coupled-policy scores that changed: torchvision's ResNets, and a user's own model or a
# plugin's, which rescomp cannot read (the paper policy never prunes a conv that meets an addition; an
# in-place ReLU alone leaves a x dL/da as it was).
IN_PLACE_ADDS = ("resnet18", "resnet50")
FINE_TUNING = ("layer_drop", "magnitude_prune", "weight_share", "binarize")
# summary "stage" names whose section is named otherwise
STAGE_SECTIONS = {"layerdrop": "layer_drop"}


def rules(cfg: ExperimentConfig, section: Optional[str], gated: Optional[bool] = None) -> tuple[int, str]:
    """The version of the rules a run of `section` is made under with cfg, and what changed since version 1.
    A prune run's rules depend on the network it scores: whether it is `gated` (layer-drop's gates; where not
    given, as the config's model would be: a given checkpoint may be gated under a config without gates)."""
    s = cfg.train.schedule
    if section == "prune":
        gated = bool(cfg.model.model_dump().get("gates")) if gated is None else gated
        activations, arch = cfg.prune.criterion in ACTIVATION_CRITERIA, cfg.model.arch
        if activations and cfg.prune.policy == "coupled" and (arch in IN_PLACE_ADDS or not _builtin(arch)):
            return 4, PRUNE_RULES + ", and " + IN_PLACE_SCORES
        if gated and activations:
            return 3, PRUNE_RULES + ", and " + GATED_SCORES
        return 2, PRUNE_RULES
    if section in FINE_TUNING and (s.warmup_epochs > 0 or s.name in ("step", "multistep")):
        return 2, FINE_TUNE_SCALED
    return 1, ""


def _builtin(arch: str) -> bool:
    """Whether rescomp builds `arch` itself (not a user's module or an installed plugin)."""
    from rescomp.models import get_entry

    return get_entry(arch).builder.__module__.startswith("rescomp.")


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, or ConfigError naming it: unreadable, not UTF-8 JSON, or not a rescomp run
    summary (an object naming its run, a number or nothing for top-1, its rows objects)."""
    try:
        s = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); re-run that run with --fresh") from None
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    rows = (s.get("rows") or []) if isinstance(s, dict) else None
    if not (isinstance(s, dict) and isinstance(s.get("name"), str) and number(s.get("top1")) and isinstance(rows, list)
            and all(isinstance(r, dict) and number(r.get("top1")) for r in rows)):
        raise ConfigError(f"{path} is not a rescomp run summary (a JSON object with its run's name and numbers); "
                          f"re-run that run with --fresh, or move its folder out of the runs folder")
    return s


def earlier_rules(run_dir: Path, cfg: Optional[ExperimentConfig] = None, section: Optional[str] = None) -> Optional[str]:
    """What has changed since the rules the run in run_dir was made under, if they are not the current ones
    for its config (its saved one unless cfg is given); None where they are."""
    made = made_from(run_dir)
    if section is None:
        summary = run_dir / "summary.json"
        stage = read_summary(summary).get("stage") if summary.is_file() else None
        section = made.get("section") or STAGE_SECTIONS.get(stage, stage)
    if cfg is None:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            return None
        cfg = saved_config(run_dir)
    gated = made.get("gated")
    if gated is None and section == "prune" and cfg.prune.criterion in ACTIVATION_CRITERIA:
        gated = _kept_gated(run_dir)  # a folder made before runs recorded it
    version, changed = rules(cfg, section, gated)
    # versions are cumulative: a run recorded under a later version than its network needs has every change
    return changed if made.get("rules", 1) < version else None


def _kept_gated(run_dir: Path) -> Optional[bool]:
    """Whether the networks a prune run folder keeps (its steps' model.pt, or the last.pt of a step it was
    stopped in) are gated: pruning keeps a network's gates in its spec. None where none can be read."""
    for p in sorted(run_dir.rglob("*.pt")):
        try:
            spec = checkpoint.load(p, mmap=True).get("arch")
        except CheckpointError:
            continue
        if isinstance(spec, dict):
            return bool(spec.get("gates"))
    return None


def lineage(path: Path) -> Optional[list[Path]]:
    """The network at `path` and every network it was made from (a distillation teacher included), followed
    through the made.json of the run folders that made them, back to training runs; None where a network's
    folder keeps no record to follow (a copied file, or a stage run made before runs kept one)."""
    out: list[Path] = []
    todo = [Path(path)]
    while todo:
        p = todo.pop()
        if any(os.path.samefile(p, q) for q in out if p.exists() and q.exists()):
            continue
        out.append(p)
        run = next((d for d in (p.parent, p.parent.parent) if (d / "config.yaml").is_file()), None)
        if run is None:
            return None
        inputs = made_from(run).get("inputs") or {}
        summary = run / "summary.json"
        if not inputs and not (summary.is_file() and read_summary(summary).get("stage") == "train"):
            return None  # a stage's network whose inputs were not recorded: where it came from is unknown
        todo += [_at(run, q) for q in inputs]
    return out


def _at(run_dir: Path, p: str) -> Path:
    """A recorded input's path (relative to the resolved run folder), as a path from this process's folder."""
    return Path(os.path.relpath(os.path.normpath(run_dir.resolve() / p)))


def stale_input(recorded: dict[str, str], run_dir: Path, finished: bool = True,
                digests: Optional[dict[Path, str]] = None) -> Optional[str]:
    """Why a run in run_dir made from the `recorded` networks may not be returned or resumed: the first whose
    file now holds another network, or, for a run that is not `finished`, one that is gone (it cannot resume
    from it); None where none is. A finished run whose input is gone stands: it was made from what was
    there. `digests` caches the networks' digests by path (a report reads one network for many runs)."""
    digests = {} if digests is None else digests
    for p, digest in recorded.items():
        path = _at(run_dir, p)
        if path.is_file():
            if path not in digests:
                digests[path] = checkpoint.network_digest(path)
            if digests[path] != digest:
                return _re_made(path)
        elif not finished:
            return f"was started from '{path}', which is gone, so it cannot resume"
    return None


def _re_made(path: Path) -> str:
    return f"was made from '{path}' as it was before that file was re-made"


def made_from(run_dir: Path) -> dict[str, Any]:
    """The folder's record of what its run is made from ({} for a folder made before runs kept one)."""
    rec = run_dir / MADE
    return json.loads(rec.read_text()) if rec.is_file() else {}


# What redoes a run, in the advice of a refusal or a finished run's log line: the command's own --fresh,
# except for the training run a later stage starts from, which that stage's --fresh (and a chain's) keeps.
FRESH = "--fresh"


def train_fresh(cfg: ExperimentConfig) -> str:
    """The command that redoes the training run a later stage of cfg starts from, with the config file,
    --profile, --set and --seed that this command was given (`rescomp train CONFIG ... --fresh`)."""
    path, profile, overrides = cfg._loaded or (None, None, ())
    args = [*([path] if path else []), *(["--profile", profile] if profile else [])]
    for o in overrides:
        key, value = parse_override(o)
        args += ["--seed", str(value)] if key == ["seed"] and isinstance(value, int) else ["--set", o]
    return f"`{shlex.join(['rescomp', 'train', *args, '--fresh'])}`"


def rerun(redo: str) -> str:
    """'re-run with --fresh', or 'run `rescomp train ... --fresh`' for the training run behind a later stage."""
    return "re-run with --fresh" if redo == FRESH else f"run {redo}"


def record_made(run_dir: Path, paths: list[Path], cfg: ExperimentConfig, section: Optional[str],
                spec: Optional[dict[str, Any]] = None, redo: str = FRESH) -> dict[str, str]:
    """Record in run_dir the networks its run starts from (and its stage's rules, for the arch `spec` of the
    network it starts from) when it starts anew; on a resumed start, check them against the record (a
    network re-made while the run was stopped is refused). Returns the inputs, by path relative to run_dir,
    with their digests."""
    now = {os.path.relpath(Path(p).resolve(), run_dir.resolve()): checkpoint.network_digest(p) for p in paths}
    before = made_from(run_dir)
    gated = None if spec is None or section != "prune" else bool(spec.get("gates"))
    version = rules(cfg, section, gated)[0]
    if before and resumable(run_dir):  # the networks are digested above: compare, do not read them again
        for p, digest in before.get("inputs", {}).items():
            if now.get(p, digest) != digest:
                raise ConfigError(f"'{run_dir}' {_re_made(_at(run_dir, p))}; {rerun(redo)} to start it again")
    elif now or version > 1:  # else nothing to record: no input, the first rules (as a folder without one)
        record = {"inputs": now, "rules": version, "section": section, **({} if gated is None else {"gated": gated})}
        checkpoint.atomic_write_text(run_dir / MADE, json.dumps(record, indent=2))
    return now


def other_runs(run_dir: Path) -> str:
    """The run folders inside run_dir, named ('' if none): a folder of runs is never one run's folder."""
    others = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
    return ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")


def refusal(cfg: ExperimentConfig, fresh: bool, suffix: str = "", section: Optional[str] = None,
            redo: str = FRESH) -> Optional[str]:
    """Why `claim` would refuse the stage's run folder, found without touching it (what --dry-run
    reports, in the same words); None where it would take it. `redo`: what would redo the run."""
    run_dir = run_folder(cfg, suffix)
    saved = run_dir / "config.yaml"
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():  # the run would meet it as "File exists"
        return f"'{run_dir}' is a file, not a run folder; move it away, or choose another name or out_dir"
    if others := other_runs(run_dir):  # out_dir: ., name: runs
        return (f"'{run_dir}' holds other runs ({others}), so it cannot be this run's folder"
                f"{' (nor be emptied by --fresh)' if fresh else ''}; choose another name or out_dir")
    if who := runlock.holder(run_dir):
        return runlock.busy(run_dir, who)
    if not saved.is_file() and (held := runlock.contents(run_dir)):  # another's files: never written into or deleted
        shown = ", ".join(sorted(p.name for p in held)[:3]) + (", ..." if len(held) > 3 else "")
        return (f"'{run_dir}' is not a rescomp run folder (it holds {shown} and no config.yaml), so "
                f"{'--fresh would delete' if fresh else 'a run would write into'} it; choose another name or out_dir")
    if fresh:
        return None
    if not resumable(run_dir):  # nothing to resume from: taken over
        return None
    keep = "--set name=<new name>"
    if getattr(getattr(cfg, section or "train"), "checkpoint", "") is None:  # a new name alone would train anew
        keep += f" --set {section}.checkpoint={run_folder(cfg) / 'model.pt'}"
    changed = other_settings(run_dir, cfg, section)
    if not changed:
        if changed_rules := earlier_rules(run_dir, cfg, section):
            return (f"'{run_dir}' was made under rescomp's earlier {section} rules (since then: {changed_rules}); "
                    f"{rerun(redo)} to redo it under the current ones, or {keep} to keep both")
        finished = (run_dir / "summary.json").is_file()
        why = stale_input(made_from(run_dir).get("inputs", {}), run_dir, finished)
        return why and f"'{run_dir}' {why}; {rerun(redo)} to " + (
            f"redo it from the file as it is now, or {keep} to keep both" if finished else "start it again")
    if len(changed) == 1 and changed[0].startswith("name ("):  # a renamed folder: a new name would not help
        old = saved_config(run_dir).run_name
        back = old + (f"-{suffix}" if suffix else "")
        return (f"'{run_dir}' holds the run named '{old}' (a renamed folder?); rename it back to '{back}' and use "
                f"--set name={old}, or {rerun(redo)} to replace it")
    return (f"'{run_dir}' holds a run with other settings: {', '.join(changed)}; {rerun(redo)} to replace "
            f"it, or {keep} to keep both")


def claim(cfg: ExperimentConfig, fresh: bool, suffix: str = "", section: Optional[str] = None,
          redo: str = FRESH) -> tuple[Path, Optional[dict[str, Any]]]:
    """The run folder of a stage (`run_folder(cfg, suffix)`, its config section, if any, `section`), after
    checking that it is ours to write (`refusal`); and its summary if the run is complete.

    Call it only once everything the run needs has been checked: `fresh` deletes here. A folder that
    holds a run of other settings is refused with the keys that differ, unless it holds nothing to
    resume (a run that failed before its first checkpoint), which is taken over.
    """
    run_dir = run_folder(cfg, suffix)
    check_writable(cfg.runs_dir, "out_dir")
    if not run_dir.exists():
        return run_dir, None  # claimed by `writing` when the run starts writing
    if why := refusal(cfg, fresh, suffix, section, redo):  # before it is held: a refused folder gets no lock file
        raise ConfigError(why)
    if not fresh:
        open_run_dir(run_dir)  # held from here (_empty holds it for --fresh)
    if fresh or other_settings(run_dir, cfg, section):  # --fresh, or a run of other settings with nothing to resume
        _empty(run_dir)
        return run_dir, None
    summary = run_dir / "summary.json"
    return run_dir, (read_summary(summary) if summary.is_file() else None)


def _empty(run_dir: Path) -> None:
    open_run_dir(run_dir)  # never delete what another live process is writing
    for p in runlock.contents(run_dir):  # keep our lock: deleting it would let a second process in
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def open_run_dir(run_dir: Path) -> None:
    """Create run_dir if needed and hold it for this process (rescomp.runlock): exit 2 if another
    live process is writing it. Under several processes rank 0 holds it for all of them."""
    if distributed.is_main():
        runlock.claim(run_dir, command_line())


@contextmanager
def writing(run_dir: Path, cfg: ExperimentConfig) -> Iterator[Path]:
    """Hold run_dir and save the config in it while a run writes there. A run that fails (or is
    interrupted) before writing anything it could resume from leaves no folder behind, so the
    corrected command starts clean instead of meeting a half-made folder."""
    open_run_dir(run_dir)
    checkpoint.atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    try:
        yield run_dir
    except BaseException as e:
        if distributed.is_main() and not resumable(run_dir):
            runlock.release(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            try:  # so that an interrupted command does not promise a resume from a checkpoint there is not
                e.nothing_saved = run_dir  # type: ignore[attr-defined]
            except AttributeError:
                pass
        raise
