"""Experiment configs: YAML validated by pydantic, with `--set dotted.key=value` overrides.

load_config(path, overrides) -> ExperimentConfig, or ConfigError naming the bad key's path and the
nearest valid key. Unknown keys are errors everywhere except under `model:`, whose keys are the
chosen architecture's builder arguments and are checked against that builder when it is built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rescomp.config_files import apply_overrides, deep_merge, parse_override, project_root, read_with_extends
from rescomp.config_sections import (NAME_BYTES, BinarizeConfig, LayerDropConfig, MagnitudePruneConfig, PruneConfig,
                                     QuantizeConfig, Rooted, Strict, WeightShareConfig, folder_name)
from rescomp.errors import ConfigError
from rescomp.registry import suggest


class AugmentConfig(Strict):
    crop_padding: int = Field(4, ge=0, description="random crop after zero-padding by this many pixels")
    flip: bool = True  # random horizontal flips
    rotate_degrees: float = Field(0.0, ge=0, le=180, description="random rotation in +-degrees")


class SyntheticConfig(Strict):
    train_size: int = Field(256, ge=1)  # images in the synthetic train split (tests, smoke runs)
    test_size: int = Field(128, ge=1)  # images in the synthetic test split
    num_classes: int = Field(10, ge=2)  # classes of the synthetic data


class DataConfig(Rooted):
    dataset: Literal["cifar10", "cifar100", "synthetic"] = "cifar10"  # which dataset
    # auto: `path` if given, else the first local copy found (rescomp.data.search_paths), else a download.
    source: Literal["auto", "torchvision", "folder"] = "auto"
    path: Optional[str] = None  # a dataset folder, .tar(.gz) or torchvision root; default: searched (README, Set-up)
    # auto: download through torchvision (into rescomp.data.download_root) only when no local copy is
    # found; true: always use torchvision's official files, downloading them if missing; false: never.
    download: Literal["auto", True, False] = "auto"
    image_size: int = Field(32, ge=8, le=512, description="inputs are resized to this on the fly")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # share of train held out (seeded) as a validation split
    train_limit: Optional[int] = Field(None, ge=1, description="use a seeded random subset of train")
    test_limit: Optional[int] = Field(None, ge=1)  # use a seeded random subset of test
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    cache_dir: Optional[str] = None  # decoded-image caches and downloads; default $RESCOMP_CACHE or ~/.cache/rescomp

    @property
    def num_classes(self) -> int:
        return {"cifar10": 10, "cifar100": 100}.get(self.dataset, self.synthetic.num_classes)


class ModelConfig(BaseModel):
    # Extra keys are the builder's arguments, validated against its signature in models.build_model.
    model_config = ConfigDict(extra="allow")
    arch: str = "resnet20"  # a name from `rescomp models`, or your own builder as module.path:function

    def spec(self, num_classes: int) -> dict[str, Any]:
        return {"num_classes": num_classes, **self.model_dump()}


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # optimizer
    lr: float = Field(0.1, gt=0)  # initial learning rate
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = Field(1e-4, ge=0)  # L2 weight decay
    no_decay_bn_bias: bool = Field(False, description="no weight decay on BatchNorm and bias parameters")
    gate_weight_decay: bool = Field(False, description="decay layer-drop's residual gates too")
    betas: tuple[float, float] = (0.9, 0.999)  # Adam / AdamW betas


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "multistep", "cosine", "onecycle"] = "multistep"  # the lr schedule, stepped per batch
    milestones: list[float] = [100, 150]  # epochs, for multistep (He et al. 2016: 32k, 48k of 64k iterations)
    step_size: float = Field(30, gt=0)  # epochs, for step
    gamma: float = Field(0.1, gt=0)  # decay factor of step / multistep
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a share of lr
    pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle: share of training spent rising
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from 0 before the schedule


class EarlyStoppingConfig(Strict):
    patience: Optional[int] = Field(None, ge=1, description="epochs without val-loss improvement")
    min_delta: float = Field(0.0, ge=0)  # smallest val-loss decrease that counts
    restore_best: bool = True  # on an early stop, end with the best validation epoch's weights (as tf.keras 2's EarlyStopping(restore_best_weights=True); a run that reaches train.epochs keeps its last)


class DistillConfig(Strict):
    teacher: str  # a trained model.pt whose softened outputs the student learns from
    temperature: float = Field(4.0, gt=0)  # softmax temperature T (the soft term is scaled by T^2)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) term")


class TrainConfig(Strict):
    # training epochs; a training run needs 1 or more (0 is a later stage's fine-tune of none, as its
    # checkpoints record it; `rescomp measure CONFIG` counts and times a network without training it)
    epochs: int = Field(200, ge=0)
    batch_size: int = Field(128, ge=1)  # images per training step
    eval_batch_size: int = Field(1000, ge=1)  # images per evaluation batch
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # auto: NHWC on CUDA (tensor cores); on the CPU NHWC unless the network has a conv that oneDNN
    # gets wrong in NHWC (rescomp.hardware.training_layout; results/bench/cpu_layout.md). true is
    # overridden on the CPU for such networks: wrong gradients are never worth the speed.
    channels_last: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile the model (CUDA; slow to start)
    grad_clip: Optional[float] = Field(None, gt=0)  # clip the gradient norm to this
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap steps per epoch (smoke runs)")
    checkpoint_every: int = Field(1, ge=1)  # save a resumable checkpoint every N epochs
    eval_test_every: int = Field(1, ge=0, description="evaluate on test every N epochs (0: only at the end)")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for training; default all cores")
    # Under several processes (torchrun, --nproc), BatchNorm statistics of the global batch rather than of each
    # rank's slice: the one-process result, at the cost of two all-reduces per BatchNorm (rescomp.distributed)
    sync_bn: bool = False
    distill: Optional[DistillConfig] = None  # knowledge distillation (Hinton et al. 2015) from a teacher


class MeasureConfig(Strict):
    latency: bool = True  # time the forward pass on the CPU
    batch_sizes: list[int] = [1, 64]  # batch sizes timed (latency_ms_cpu_b<N>)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads pinned for latency (and layer-drop's training-step times); default the process's (a run's training threads)")
    channels_last: bool = True  # time the fp32 model in NHWC, the faster layout on CPUs with oneDNN
    warmup: int = Field(3, ge=0)  # untimed forward passes before timing
    repeats: int = Field(10, ge=1)  # timed forward passes at least; the median is reported
    # more passes (up to 20 x repeats, or max_seconds per batch size) until the interquartile range is
    # at most this share of the median; null: exactly `repeats`
    max_spread: Optional[float] = Field(0.05, gt=0)
    max_seconds: float = Field(20.0, gt=0)  # timing time per batch size at most, when max_spread asks for more
    gpu_throughput: bool = True  # also images/s on a GPU, where there is one
    # where fp32 latency is timed, all in one process, interleaved, same threads: eager = PyTorch in
    # the layout channels_last says (latency_ms_cpu_b<N>); onnxruntime = the network exported to ONNX
    # (checked against PyTorch) and run by ONNX Runtime's CPU provider (latency_ms_ort_b<N>); inductor =
    # torch.compile with weight freezing (latency_ms_ind_b<N>; compiles once per batch size). With more
    # than one, each row also names its fastest (fastest_runtime_b<N>).
    runtimes: list[Literal["eager", "onnxruntime", "inductor"]] = ["eager"]

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:  # checked here: a training run measures only once it has trained
            raise ValueError("must list one or more batch sizes of at least 1, e.g. [1, 64]")
        return list(dict.fromkeys(v))

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: list[str]) -> list[str]:
        if "eager" not in v:
            raise ValueError("must include eager (the latency columns every table has); add onnxruntime beside it")
        return list(dict.fromkeys(v))


class ReportConfig(Strict):
    table: Optional[str] = None  # results/<table>/
    row: Optional[str] = None  # the row's label; default the run name
    paper: dict[str, float] = {}  # the paper's numbers for this row, keyed like our columns
    paper_int8: dict[str, float] = {}  # the same for the row `rescomp quantize` writes
    paper_by_share: dict[str, dict[str, float]] = {}  # prune / magnitude_prune rows: {"0": {...}, "0.3": {...}} by share pruned
    paper_shared: dict[str, float] = {}  # the weight_share row (Deep Compression's storage factor, dc_compression)
    paper_by_schedule: dict[str, dict[str, dict[str, float]]] = {}  # the same for prune.schedule fast / slow
    # layer-drop: the paper's costs of its smallest lossless network as % of the full one's (keys macs,
    # forward, backward, params), compared only where a config gives them (residual-block deletion, Table 2)
    paper_relative: dict[Literal["macs", "forward", "backward", "params"], float] = {}
    # Where the paper counted costs on another input size or head than ours (Martineau counts FLOPs at
    # 224x224, and some parameters with ImageNet's 1000-class head): prune rows are measured again that
    # way as macs_paper_input / params_paper_head, and compared with the paper only there.
    paper_input: Optional[int] = Field(None, ge=8)
    paper_head: Optional[int] = Field(None, ge=1)  # classes of the paper's head for params_paper_head (see paper_input)

    @field_validator("table")
    @classmethod
    def _table(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else folder_name(v)


# Sections a run's identity leaves out unless it is the stage they configure (out_dir, measure, report
# and log say where results go and how they are shown, not what the run computes).
LATER_SECTIONS = ("out_dir", "measure", "report", "log", "quantize", "layer_drop", "prune", "magnitude_prune",
                  "weight_share", "binarize", "pipeline")
# Keys added after runs were made, with the value that does what those runs did: at that value a key is
# left out of the identity, so an older run's hash (in its checkpoints and rows) still matches.
# train.sync_bn: false is one process's BatchNorm, which every earlier run used.
# layer_drop.stop_on: test is the rule every earlier layer-drop run used.
ADDED_LATER = (("train", "sync_bn", False), ("layer_drop", "stop_on", "test"))


class LogConfig(Strict):
    # also write every training run's per-epoch metrics (losses, top-1, learning rate, images/s) as
    # TensorBoard events in <run folder>/tensorboard/ (`tensorboard --logdir runs`); needs the
    # optional package: pip install 'rescomp[tensorboard]'
    tensorboard: bool = False


class ExperimentConfig(Rooted):
    # how this config was loaded: its file as given, --profile, the --set overrides (--seed N as seed=N);
    # advice names the command that loads it again (rescomp.rundir.train_fresh). None: it came from no file
    _loaded: Optional[tuple[str, Optional[str], tuple[str, ...]]] = PrivateAttr(None)
    name: Optional[str] = None  # run name; default the config file's stem (+ "-<profile>")
    profile: Optional[str] = None  # the `profiles:` entry applied, if any
    seed: int = 0  # seeds weights, data order, augmentation and subsets
    # run the command once per seed, each in its own folder <name>-seed<N> (the config's own seed keeps
    # <name>); `rescomp report` gives the mean and standard deviation over a row's seeds
    seeds: Optional[list[int]] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # where run folders go; this and every other relative path in a config (data.path, *.checkpoint,
    # train.distill.teacher, data.cache_dir) is relative to the config's project: the nearest folder
    # above the config file that holds pyproject.toml or .git, else the config file's own folder
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    measure: MeasureConfig = MeasureConfig()
    report: ReportConfig = ReportConfig()
    log: LogConfig = LogConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    layer_drop: LayerDropConfig = LayerDropConfig()
    prune: PruneConfig = PruneConfig()
    magnitude_prune: MagnitudePruneConfig = MagnitudePruneConfig()
    weight_share: WeightShareConfig = WeightShareConfig()
    binarize: BinarizeConfig = BinarizeConfig()
    # `rescomp run`: stages in order, each starting from the previous stage's network, e.g.
    # [train, {prune: {steps: 6}}, {layer_drop: {k: 2}}, quantize]; an entry's mapping overrides its
    # stage's section (prune:, layer_drop:, magnitude_prune:, weight_share:, binarize:, quantize:, train:) for that
    # stage only (rescomp.chain)
    pipeline: Optional[list[Union[str, dict[str, Optional[dict[str, Any]]]]]] = None

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline_entries(cls, v: Any) -> Any:
        """Each entry a stage name or {stage: settings}, said in those words rather than pydantic's union types."""
        for i, entry in enumerate(v if isinstance(v, list) else []):
            if isinstance(entry, dict) and len(entry) == 1:
                (name, settings), = entry.items()
                if not isinstance(name, str) or not (settings is None or isinstance(settings, dict)):
                    raise ValueError(f"entry {i + 1} ({entry}) gives {name} {settings!r}; a stage's settings are a "
                                     f"mapping of its section's keys, e.g. - {name}: {{steps: 6}}")
            elif isinstance(entry, dict):
                raise ValueError(f"entry {i + 1} names {len(entry)} stages ({', '.join(map(str, entry)) or 'none'}); "
                                 f"write one stage per entry, e.g. - prune: {{steps: 6}}")
            elif not isinstance(entry, str):
                raise ValueError(f"entry {i + 1} ({entry!r}) is neither a stage name nor {{stage: settings}}; write "
                                 f"e.g. [train, {{prune: {{steps: 6}}}}, quantize]")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline(cls, v: Optional[list]) -> Optional[list]:
        if v is not None and not v:
            raise ValueError("is empty; name its stages, e.g. [train, prune, quantize]")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else folder_name(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _coherent(self) -> "ExperimentConfig":
        if self.train.early_stopping.patience and self.data.val_fraction <= 0:
            raise ValueError("train.early_stopping.patience needs data.val_fraction > 0 (it watches validation loss)")
        return self

    @property
    def runs_dir(self) -> Path:
        return self.at(self.out_dir)

    def rooted(self, root: Optional[Path]) -> "ExperimentConfig":
        """This config with its relative paths taken from the project at `root` (see out_dir)."""
        self._root = self.data._root = root
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model.arch}-{self.hash()}"

    @property
    def label(self) -> str:
        """The row label of this run in a table: report.row, else the run name without its seed suffix,
        so that the seeds of one experiment share a row (rescomp.report.aggregate_seeds)."""
        return self.report.row or self.run_name.removesuffix(f"-seed{self.seed}")

    def per_seed(self) -> list["ExperimentConfig"]:
        """One config per entry of `seeds` (or this one): each with its seed, in its own run folder."""
        if not self.seeds:
            return [self]
        out = []
        for s in dict.fromkeys(self.seeds):
            name = self.run_name if s == self.seed else f"{self.run_name}-seed{s}"
            one = self.model_copy(update={"seed": s, "seeds": None, "name": name})
            if self._loaded:  # loaded again with --seed s; a --set name=X keeps X as given, so it says this name
                path, profile, overrides = self._loaded
                keys = [parse_override(o)[0] for o in overrides]
                kept = tuple(o for o, k in zip(overrides, keys) if k not in (["name"], ["seed"], ["seeds"]))
                one._loaded = (path, profile, (*kept, *([f"name={name}"] if ["name"] in keys else []), f"seed={s}"))
            out.append(one)
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def identity(self, *sections: str) -> dict[str, Any]:
        """What decides the training run's result, plus the named later-stage `sections` (quantize,
        layer_drop, prune): the config without where outputs go and how they are reported."""
        d = self.to_dict()
        for key in set(LATER_SECTIONS) - set(sections):
            d.pop(key, None)
        d.pop("seeds", None)  # a list of runs, not part of any one run
        for section, key, neutral in ADDED_LATER:  # runs made before such a key existed keep their hash
            if d.get(section, {}).get(key, neutral) == neutral:
                d.get(section, {}).pop(key, None)
        return d

    def hash(self, *sections: str) -> str:
        """A short digest of identity(*sections): equal hashes, equal runs."""
        blob = json.dumps(self.identity(*sections), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Loading, overrides and readable errors


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, path + "."))
    return keys


def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        known = _known_keys(ExperimentConfig)
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        siblings = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
        leaf = path.rsplit(".", 1)[-1]
        near = [k for k in siblings  # prune.epochs: prune.finetune_epochs
                if len(leaf) > 2 and (leaf in k[len(parent):] or k[len(parent):] in leaf)]
        if near:
            return f"unknown key '{path}' (did you mean '{near[0]}'?)"
        section = path.split(".", 1)[0] + "."  # its own section's first: quantize.lr: quantize.qat.lr
        elsewhere = sorted((k for k in known if k.rsplit(".", 1)[-1] == leaf), key=lambda k: not k.startswith(section))
        if elsewhere:  # image_size: data.image_size
            more = f", ... ({len(elsewhere)} in all)" if len(elsewhere) > 3 else ""
            return (f"unknown key '{path}' (did you mean " + (f"'{elsewhere[0]}'?)" if len(elsewhere) == 1 else
                    "one of " + ", ".join(f"'{k}'" for k in elsewhere[:3]) + f"{more}?)"))
        return f"unknown key '{path}'{suggest(path, siblings)}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path or 'config'}: {msg}{shown}" if path else msg


def validate(raw: dict[str, Any], origin: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_format_error(err) for err in e.errors()]
        if len(problems) > 5:  # not a config at all (a summary.json?): the first few say so
            problems = [*problems[:4], f"and {len(problems) - 4} more; is it a rescomp config?"]
        raise ConfigError(f"{origin}: {'; '.join(problems)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None, profile: Optional[str] = None) -> ExperimentConfig:
    """Read, merge `extends:` bases, apply a `profiles:` entry and `--set` overrides, validate.

    A profile is a named partial config kept in the file (e.g. a short CPU schedule beside the
    paper's); its runs are named <name>-<profile> so profiles never share a run folder.
    """
    path = Path(path)
    raw = read_with_extends(path)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) or v is None for v in profiles.values()):
        raise ConfigError(f"{path}: profiles must map each profile's name to its settings (e.g. profiles: {{cpu: "
                          f"{{train: {{epochs: 4}}}}}}); it is {profiles!r}")
    raw.setdefault("name", path.stem)
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: no profile '{profile}'{suggest(profile, list(profiles))}; "
                              f"profiles: {', '.join(profiles) or '(none)'}")
        raw = deep_merge(raw, profiles[profile] or {})
        raw["name"] = f"{raw['name']}-{profile}"
        raw["profile"] = profile
    own_seed = raw.get("seed", 0)
    raw = apply_overrides(raw, list(overrides or []))
    keys = [parse_override(o)[0] for o in overrides or []]
    if ["seed"] in keys and ["seeds"] not in keys:
        raw["seeds"] = None  # one seed asked for: that run, not the config's list
    if raw.get("seed", 0) != own_seed and ["name"] not in keys and isinstance(raw.get("seed"), int):
        raw["name"] = f"{raw['name']}-seed{raw['seed']}"  # another seed is another run, in its own folder
    root = project_root(path)
    raw = _rebase_cli_paths(raw, overrides or [], root)
    cfg = validate(raw, str(path)).rooted(root)
    if len(cfg.run_name.encode()) > NAME_BYTES:  # else an OSError where a folder is made, a later stage's first
        raise ConfigError(f"{path}: name: the run name '{cfg.run_name[:40]}...' is {len(cfg.run_name.encode())} bytes "
                          f"long; keep it to {NAME_BYTES}, which leaves room for the endings later stages add to it")
    cfg._loaded = (str(path), profile, tuple(overrides or []))
    return cfg


# The config keys that hold paths (see ExperimentConfig.out_dir)
# (every stage section's checkpoint: a new stage's is rebased without being listed here)
PATH_KEYS = (("out_dir",), ("data", "path"), ("data", "cache_dir"), ("train", "distill", "teacher"),
             *((name, "checkpoint") for name, f in ExperimentConfig.model_fields.items()
               if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
               and "checkpoint" in f.annotation.model_fields))


def _rebase_cli_paths(raw: dict[str, Any], overrides: list[str], root: Path) -> dict[str, Any]:
    """A relative path given with --set is typed from the shell's folder (tab completion): store it
    relative to the project instead, where the config file's own paths are relative to."""
    given = {tuple(parse_override(o)[0]) for o in overrides}
    for key in PATH_KEYS:
        if key not in given:
            continue
        node = raw
        for k in key[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            node[key[-1]] = os.path.relpath(Path.cwd() / value, root)
    return raw


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
