"""The sections of a config that configure the stages after training (quantize, layer_drop, prune,
magnitude_prune, weight_share, binarize), and the base classes every section shares (Strict, Rooted).
rescomp.config assembles them into ExperimentConfig.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


def folder_name(v: str) -> str:
    """A run or table name is one folder of out_dir or results/: a '/' or '..' in it would put a run, its
    --fresh deletion and a table's files somewhere else (`name: .` made --fresh empty every run)."""
    if not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0"):
        raise ValueError("must be one folder name: not empty, '.' or '..', and without '/' or '\\'")
    if len(v.encode()) > 255:
        raise ValueError(f"must be at most 255 bytes long, as a file name (it is {len(v.encode())})")
    return v


# A config's run name leaves room for the endings later stages add to their folders' names: a chain's last
# (<name>-prune-coupled-mean_activation-custom-layerdrop-output_norm-k2-n10-ptq-onnxruntime-seed12) adds
# about 90 bytes, and a file name holds at most 255 (rescomp.config.load_config checks it).
NAME_BYTES = 120


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr: inf ran to NaN

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
