"""Experiment configs: YAML validated by pydantic, with `--set dotted.key=value` overrides.

load_config(path, overrides) -> ExperimentConfig, or ConfigError naming the bad key's path and the
nearest valid key. Unknown keys are errors everywhere except under `model:`, whose keys are the
chosen architecture's builder arguments and are checked against that builder when it is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rescomp.errors import ConfigError
from rescomp.registry import suggest


def folder_name(v: str) -> str:
    """A run or table name is one folder of out_dir or results/: a '/' or '..' in it would put a run, its
    --fresh deletion and a table's files somewhere else (`name: .` made --fresh empty every run)."""
    if not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0"):
        raise ValueError("must be one folder name: not empty, '.' or '..', and without '/' or '\\'")
    return v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v: Any, info: Any) -> Any:
        """true/false where a count or a number goes (`train.epochs: true`) is a mistake, not 1 or 0 as
        pydantic would take it; a key that takes either (a bool or a number) takes it as given."""
        if isinstance(v, bool) and info.field_name:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if kinds & {int, float} and bool not in kinds:
                raise ValueError("a number, not true/false")
        return v


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: Optional[int] -> {int, NoneType}; Literal values' types."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    return set().union(*(_kinds(a) for a in args)) if get_origin(annotation) in (Union, UnionType) else {annotation}


class Rooted(Strict):
    """A section whose paths are relative to its project (project_root), not to the shell's folder."""
    _root: Optional[Path] = PrivateAttr(None)

    def at(self, p: str) -> Path:
        """Where the config path `p` is, as a path usable from this process's folder: a relative `p` is
        relative to the config's project (relative to the current folder only for a config that came
        from no file)."""
        path = Path(p).expanduser()
        if path.is_absolute() or self._root is None:
            return path
        return Path(os.path.relpath(self._root / path))

    def written(self, path: Path) -> str:
        """The config path of `path` (a path usable from this process's folder): relative to the project,
        as `at` reads it back."""
        return os.path.relpath(Path(path).resolve(), self._root) if self._root is not None else str(path)


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


class QATConfig(Strict):
    epochs: int = Field(3, ge=1)  # fake-quant fine-tuning epochs
    lr: float = Field(1e-3, gt=0)  # fine-tuning learning rate


class QuantizeConfig(Strict):
    checkpoint: Optional[str] = None  # default: runs/<name>/model.pt, this config's training run
    method: Literal["ptq", "qat"] = "ptq"  # qat: fake-quant fine-tuning for qat.epochs, then convert
    # int8 engine. torch.ao FX: x86 (FBGEMM + oneDNN), fbgemm, qnnpack (ARM); onnxruntime: ONNX
    # Runtime's static QDQ quantization (int8 activations and per-channel weights, PTQ only); pt2e:
    # torchao's PT2E flow with X86InductorQuantizer, run compiled by Inductor (PTQ and QAT)
    backend: Literal["x86", "fbgemm", "qnnpack", "onnxruntime", "pt2e"] = "x86"
    # Activations in 7 bits (true) or 8 (false, as TFLite); auto = the backend's default (x86, fbgemm:
    # true; qnnpack: false; pt2e: true where the CPU has no VNNI). rescomp.compress.quantize says why,
    # and what false costs without VNNI. onnxruntime: weights in 7 bits instead; auto = 7 where the
    # CPU has no VNNI (quantize_ort).
    reduce_range: Literal["auto", True, False] = "auto"
    calibration_images: int = Field(1000, ge=1, description="training images run through the observers")
    # how onnxruntime turns calibration activations into ranges (the FX backends use their own observers)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    qat: QATConfig = QATConfig()

    @model_validator(mode="after")
    def _backend_options(self) -> "QuantizeConfig":
        if self.backend == "onnxruntime":
            if self.method == "qat":
                raise ValueError("method qat is not available with backend onnxruntime (it has no quantization-aware "
                                 "training); use method ptq, or backend x86 for QAT")
        if self.backend != "onnxruntime" and self.calibration_method != "minmax":
            raise ValueError(f"calibration_method applies to backend onnxruntime; {self.backend} uses its own observers")
        return self


class TimingConfig(Strict):
    batch_size: int = Field(128, ge=1)  # batch of the timed training steps
    runs: int = Field(100, ge=1)  # paper: the mean of 100 runs
    warmup: int = Field(10, ge=0)  # untimed steps first


class BaselinesConfig(Strict):
    # regular: ResNets of the run's family with the same number of units in every stage (paper 4.2.2 and
    # Figure 3: 6, 5, ..., 1 units per stage, 56 ... 11 layers); reached: the irregular structures the
    # deletion loop reached, each trained anew.
    structure: Literal["regular", "reached"] = "regular"
    depths: Optional[list[int]] = None  # regular: layers of the networks to train; default every depth of the family
    scratch: bool = True  # trained from scratch
    distill: bool = True  # ... and distilled from the full network (Hinton et al. 2015)
    # Epochs each baseline trains: default train.epochs (the full network's recipe); "matched": the
    # layer-drop network's total at that depth, the full network's epochs + n x ceil(units removed / k).
    epochs: Optional[int | str] = None
    temperature: float = Field(4.0, gt=0)  # distillation temperature T
    alpha: float = Field(0.9, ge=0, le=1)  # distillation: weight of the soft term

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: Optional[int | str]) -> Optional[int | str]:
        if v is None or v == "matched" or (isinstance(v, int) and v >= 1):
            return v
        raise ValueError("must be a number of epochs (1 or more), or 'matched' (the layer-drop network's at that depth)")


class LayerDropConfig(Strict):
    checkpoint: Optional[str] = None  # a trained gated model.pt; default: train this config first
    criterion: str = "gate"  # gate | random | bn_gamma | output_norm
    k: int = Field(2, ge=1, description="units deleted per step")
    retrain_epochs: int = Field(60, ge=0, description="n: epochs of retraining after each deletion")
    max_units: Optional[int] = Field(None, ge=1, description="stop after deleting this many (default: all)")
    tolerance: float = Field(0.0, ge=0, description="stop once top-1 (on stop_on's split) < the full network's - tolerance")
    # the split whose top-1 the stop rule and the smallest lossless network are judged on: test, as the
    # paper's Algorithm 1 (which flatters the chosen network's test top-1), or val: data.val_fraction of the
    # training images, held out (seeded) and never trained on, so the chosen network's test top-1 is unbiased
    stop_on: Literal["test", "val"] = "test"
    keep_going: bool = False  # delete on past the first loss, to trace the whole accuracy-depth curve
    score_images: int = Field(1000, ge=1, description="training images for data-based criteria")
    timing: TimingConfig = TimingConfig()
    baselines: BaselinesConfig = BaselinesConfig()


class StopAtConfig(Strict):
    params: Optional[float] = Field(None, gt=0, lt=1, description="stop once params <= this share of the start")
    macs: Optional[float] = Field(None, gt=0, lt=1, description="stop once MACs <= this share of the start")


# Martineau, Table 1 and Figure 3: each share is reached from the trained network in its own run,
# "fast" in two reduction iterations at epochs 4 and 7 (3 epochs apart), "slow" in ten gradual ones, one
# an epoch ("average", five iterations with two steps of levelling, has no numbers in the paper and is
# not a preset). The gap between reductions is gap_steps x finetune_epochs. Both get the same
# fine-tuning, 10 x finetune_epochs per run (unless finetune_budget says otherwise; the paper states no
# total), so they differ only in how the share is reached: the last step gets what the ones before left.
PRUNE_PRESETS = {"fast": {"targets": [0.1, 0.3, 0.5, 0.75], "iterations": 2, "budget_steps": 10, "gap_steps": 3},
                 "slow": {"targets": [0.1, 0.3, 0.5, 0.75], "iterations": 10, "budget_steps": 10, "gap_steps": 1}}


class PruneConfig(Strict):
    checkpoint: Optional[str] = None  # a trained model.pt; default: train this config first
    criterion: str = "taylor"  # taylor | mean_activation | l1 | random
    policy: Literal["paper", "coupled"] = "paper"  # paper: never prune channels that meet an addition; coupled: prune them as groups
    exclude: list[str] = []  # fnmatch patterns of conv names never to prune
    allocation: Literal["global", "uniform"] = "global"  # global: rank all layers together (paper); uniform: the same share per layer
    # After each removal (Martineau 0.3): reset the running statistics of the BatchNorms whose channels
    # changed (`slice`: keep torch-pruning's sliced statistics), and scale a linear layer whose inputs
    # shrank by inputs before / after (the dropout weight-scaling rule).
    bn_stats: Literal["reset", "slice"] = "reset"
    fc_scaling: bool = True  # scale a linear layer whose inputs shrank (see bn_stats)
    # custom (share_per_step x steps, or targets) | fast / slow (Table 1 presets: they set targets and iterations)
    schedule: Literal["custom", "fast", "slow"] = "custom"
    share_per_step: Optional[float] = Field(0.05, gt=0, lt=1, description="share of the prunable filters per step")
    steps: int = Field(6, ge=1)  # paper: 5 % per step, 6 steps (about 30 %)
    targets: Optional[list[float]] = None  # cumulative shares to reach (each step ends on or before one)
    iterations: Optional[int] = Field(None, ge=1, description="reach each target in its own run from the trained "
                                                               "network, in this many equal steps")
    finetune_epochs: int = Field(1, ge=0)  # fine-tuning epochs after each step
    finetune_budget: Optional[int] = Field(None, ge=1, description="fine-tuning epochs per run in all: the last step "
                                                                    "gets what the steps before it left")
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: train.optimizer.lr / 10")
    score_batches: int = Field(10, ge=1)  # training batches the criterion is averaged over
    stop_at: StopAtConfig = StopAtConfig()

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and (not v or any(not 0 < t < 1 for t in v) or v != sorted(set(v))):
            raise ValueError("must be increasing shares, each between 0 and 1 (exclusive)")
        return v

    @model_validator(mode="after")
    def _budget(self) -> "PruneConfig":
        preset = PRUNE_PRESETS.get(self.schedule, {})
        for key in ("targets", "iterations"):  # a preset's own would replace them without a word
            if preset and getattr(self, key) is not None:
                raise ValueError(f"{key} is given, but schedule: {self.schedule} sets its own ({key} {preset[key]}, "
                                 f"Martineau Table 1); leave prune.{key} out, or use prune.schedule: custom")
        if self.share_per_step is None and not (self.targets or self.schedule != "custom"):
            raise ValueError("prune.share_per_step is needed unless prune.targets (or a schedule) gives the shares")
        if max(t[-1] for _, t in self.plan()) >= 1 and not (self.stop_at.params or self.stop_at.macs):
            # only share_per_step x steps gets there (targets are < 1); stop_at ends such a run on its own
            raise ValueError(f"share_per_step x steps = {self.share_per_step * self.steps:g} would remove every prunable "
                             f"filter (the shares add up, each of the starting network's prunable filters); keep it "
                             f"under 1, with fewer steps or a smaller share")
        most = max(len(t) for _, t in self.plan())
        if self.budget() is not None and self.budget() < self.gap() * (most - 1):
            raise ValueError(f"prune.finetune_budget={self.budget()} is less than the {most - 1} steps before "
                             f"the last already take ({self.gap()} epochs each); raise it or lower "
                             f"prune.finetune_epochs")
        return self

    def plan(self) -> list[tuple[Optional[float], list[float]]]:
        """The runs of this schedule: (the target, or None for one gradual run; the cumulative share of
        the starting prunable filters removed after each of its steps)."""
        preset = PRUNE_PRESETS.get(self.schedule, {})
        targets = preset.get("targets") or self.targets
        iterations = preset.get("iterations") or self.iterations
        if targets and iterations:
            return [(t, [round(t * i / iterations, 6) for i in range(1, iterations + 1)]) for t in targets]
        if not targets:
            return [(None, [round(self.share_per_step * i, 6) for i in range(1, self.steps + 1)])]
        if self.share_per_step is None:  # straight to each target, one step each
            return [(None, list(targets))]
        grid = [round(self.share_per_step * i, 6) for i in range(1, int(max(targets) / self.share_per_step + 1e-9) + 1)]
        return [(None, sorted(set(grid) | set(targets)))]

    def budget(self) -> Optional[int]:
        """Fine-tuning epochs per run in all, if fixed (finetune_budget, else the schedule's)."""
        steps = PRUNE_PRESETS.get(self.schedule, {}).get("budget_steps")
        return self.finetune_budget or (steps * self.finetune_epochs if steps else None)

    def gap(self) -> int:
        """Fine-tuning epochs between two steps: finetune_epochs, times the schedule's gap_steps (fast: 3)."""
        return self.finetune_epochs * PRUNE_PRESETS.get(self.schedule, {}).get("gap_steps", 1)

    def epochs_at(self, step: int, steps: int) -> int:
        """Fine-tuning epochs after step `step` (1-based) of a run of `steps` steps."""
        if self.budget() is None or step < steps:
            return self.gap()
        return self.budget() - self.gap() * (steps - 1)


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


# Deep Compression (Han et al. 2015, 2016; survey-cnn-compression.txt, sep-net-slides.txt).
class MagnitudePruneConfig(Strict):
    checkpoint: Optional[str] = None  # a trained model.pt; default: train this config first
    share_per_step: float = Field(0.15, gt=0, lt=1, description="share of the conv and linear weights zeroed per "
                                  "step; after step s, s x share_per_step are zero (Han et al. 2015 keep 1/9 to 1/13)")
    steps: int = Field(6, ge=1, description="pruning steps, each followed by retraining with the mask held")
    # layer: each layer the same share; global: one threshold of |w|; std: Han et al. 2015's rule, one
    # threshold of |w| / the layer's std (a quality parameter times each layer's std)
    scope: Literal["layer", "global", "std"] = "layer"
    finetune_epochs: int = Field(2, ge=0, description="retraining epochs after each step")
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: train.optimizer.lr / 10")

    @model_validator(mode="after")
    def _reaches(self) -> "MagnitudePruneConfig":
        if self.share_per_step * self.steps >= 1:
            raise ValueError(f"share_per_step x steps = {self.share_per_step * self.steps:g} would zero every weight; "
                             f"keep it under 1")
        return self


class WeightShareConfig(Strict):
    checkpoint: Optional[str] = None  # a trained (or magnitude-pruned) model.pt; default: train this config first
    # codes per layer 2**bits (code 0 the exact zero): Han et al. 2016, 8 bits for conv, 5 for linear layers
    conv_bits: int = Field(8, ge=1, le=8)
    fc_bits: int = Field(5, ge=1, le=8, description="code width of linear layers: 2**fc_bits codes, code 0 the zero")
    # relative-index width of the sparse storage: Han et al. 2016, 8 bits for conv, 5 for linear layers
    gap_bits_conv: int = Field(8, ge=1, le=8)
    gap_bits_fc: int = Field(5, ge=1, le=8, description="relative-index width of linear layers")
    iterations: int = Field(30, ge=1, description="k-means iterations (linear initialisation)")
    finetune_epochs: int = Field(2, ge=0, description="epochs of centroid fine-tuning")
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: train.optimizer.lr / 10")


# SEP-Net pattern binarization (sep-net-slides.txt).
class BinarizeConfig(Strict):
    checkpoint: Optional[str] = None  # a trained model.pt; default: train this config first
    # SEP-Net-BQ: 1x1 convs and linear layers also linearly quantized to 8 bits (symmetric, per layer)
    quantize_others: bool = False
    # the slides' "keep binarization filter same during fine-tuning": the sign patterns stay fixed and
    # only the other layers learn; default (false) trains them as BinaryConnect does, full-precision
    # weights updated through a straight-through gradient
    freeze_patterns: bool = False
    finetune_epochs: int = Field(2, ge=0, description="fine-tuning epochs of the binarized network")
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: train.optimizer.lr / 10")


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


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, text = item.partition("=")
    if not sep or any(not k for k in key.strip().split(".")):  # no '=', or an empty key or part ('=3', 'a..b=3')
        raise ConfigError(f"--set '{item}': expected dotted.key=value, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set '{item}': '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def read_text(path: Path, what: str, hint: str) -> str:
    """A text file the user named (a config, notes, a jobs file), or one line saying why it is not one and
    `hint`, how to fix it ("pass a Markdown file such as ...")."""
    if path.is_dir():
        raise ConfigError(f"{what} '{path}' is a folder, not a file; {hint}")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found; {hint}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not text (byte {e.start} is not UTF-8); {hint}") from None


def check_writable(folder: Path, what: str) -> None:
    """That files can be made in `folder` (made if missing), checked before any work and leaving nothing
    behind: the nearest existing folder on its path must be a folder this process can write in."""
    here = Path(os.path.abspath(folder))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ConfigError(f"{what} '{folder}': '{here}' is a file, not a folder; choose another {what}")
    try:  # a file made and gone at once: os.access says yes to root on read-only /sys and /proc
        tempfile.TemporaryFile(dir=here).close()
    except OSError as e:
        raise ConfigError(f"{what} '{folder}': cannot write in '{here}' ({e.strerror}); choose another {what}, or make "
                          f"it writable") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, but a key written twice in one mapping is an error: PyYAML keeps the last
    one silently, so `epochs: 200` above a forgotten `epochs: 2` ran 2. Checked on the composed nodes,
    before construction, where merges (<<) and aliases have not yet rewritten any mapping."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._unique(node, set())
        return super().construct_document(node)

    def _unique(self, node: yaml.Node, done: set[int]) -> None:
        if id(node) in done:  # an alias: the anchored node is checked once
            return
        done.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in lines:
                        raise yaml.constructor.ConstructorError(
                            problem=f"key '{key.value}' is given twice (lines {lines[key.tag, key.value]} and "
                                    f"{key.start_mark.line + 1}); keep one", problem_mark=key.start_mark)
                    lines[key.tag, key.value] = key.start_mark.line + 1
                self._unique(key, done)
                self._unique(value, done)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._unique(item, done)


def read_yaml(path: Path) -> dict[str, Any]:
    hint = "pass a YAML config such as configs/demo/resnet20.yaml"
    if path.is_dir() and (path / "config.yaml").is_file():
        hint = f"pass {path / 'config.yaml'}, the config this run folder keeps"
        steps = sorted(path.glob("step*/model.pt"))
        made = (f"the network it made is {path / 'int8.pt'}" if (path / "int8.pt").is_file() else
                f"the network it made is {path / 'model.pt'}" if steps and (path / "model.pt").is_file() else
                f"the networks it made are its steps' model.pt (the last: {steps[-1]})" if steps else "")
        if made:  # a later stage's folder: its config describes the network it started from
            hint += f" (which describes the network it started from); {made}, which `rescomp measure` takes"
    elif path.suffix in (".pt", ".onnx", ".pth"):
        hint += f"; `rescomp measure {path}` measures a saved network"
    text = read_text(path, "config file", hint)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:  # an empty file would run every default: ResNet-20 on all of CIFAR-10, for hours
        raise ConfigError(f"{path} is empty; a config names its settings (model:, data:, train:, ...), e.g. "
                          f"configs/demo/resnet20.yaml; write {{}} to run every default")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (data:, model:, train:, ...)")
    return raw


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML at `path`, merged over the file(s) its `extends:` names (relative to it)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    raw = read_yaml(path)
    bases = raw.pop("extends", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise ConfigError(f"{path}: extends must name a base config file, or a list of them (e.g. extends: "
                          f"_base.yaml), relative to this file; it is {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        if not (path.parent / base).is_file():  # named from the file that extends it, where the fix is
            raise ConfigError(f"{path}: extends '{base}', which is not a file (looked for {path.parent / base}); "
                              f"a base is named relative to the config that extends it")
        merged = deep_merge(merged, read_with_extends(path.parent / base, (*seen, path.resolve())))
    return deep_merge(merged, raw)


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
    cfg._loaded = (str(path), profile, tuple(overrides or []))
    return cfg


# The config keys that hold paths (see ExperimentConfig.out_dir)
# (every stage section's checkpoint: a new stage's is rebased without being listed here)
PATH_KEYS = (("out_dir",), ("data", "path"), ("data", "cache_dir"), ("train", "distill", "teacher"),
             *((name, "checkpoint") for name, f in ExperimentConfig.model_fields.items()
               if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
               and "checkpoint" in f.annotation.model_fields))


def project_root(config_file: Path) -> Path:
    """The project a config file belongs to: the nearest folder above it (itself included) holding
    pyproject.toml or .git, else the config file's own folder."""
    here = config_file.resolve().parent
    for d in (here, *here.parents):
        if (d / "pyproject.toml").exists() or (d / ".git").exists():
            return d
    return here


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
