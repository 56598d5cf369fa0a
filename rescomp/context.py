"""The run context: device, seed, output folder, precision and rank travel here, never in globals."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from rescomp.config import ExperimentConfig
from rescomp.errors import DeviceError
from rescomp.hardware import Setting, training_layout


@dataclass
class RunContext:
    device: torch.device
    seed: int = 0
    run_dir: Optional[Path] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16, resolved for the device
    channels_last: Setting = "auto"  # train.channels_last; `layout` decides it per model
    compile: bool = False
    rank: int = 0  # DistributedDataParallel rank; only rank 0 writes files and logs
    world_size: int = 1
    console: Console = field(default_factory=lambda: Console(stderr=True, log_path=False, soft_wrap=True))
    _said: set = field(default_factory=set, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def arithmetic(self) -> str:
        """What training computes in, as a summary records it: the autocast dtype, or fp32, which is TF32
        in a GPU's convolutions and matrix products (make_context allows it there)."""
        if self.precision == "fp32" and self.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return "tf32"
        return self.precision

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def layout(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` in the memory layout for passes with gradients (training, fine-tuning, QAT, scoring):
        the one decision of rescomp.hardware.training_layout, said once per reason."""
        nhwc, why = training_layout(model, self.device, self.channels_last)
        if why not in self._said:
            self._said.add(why)
            self.log(f"memory layout {why}")
        return model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)

    def log(self, message: str) -> None:
        if self.is_main:  # one unwrapped line per event, readable in CI logs as well as terminals
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", soft_wrap=True, highlight=False)


@contextmanager
def tf32(enabled: bool):
    """TF32 for a GPU's convolutions and matrix products on or off while the block runs, as it was after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def exact_fp32():
    """Convolutions and matrix products in full fp32 on a GPU while the block runs (TF32 off; make_context
    turns it on for training), so that an evaluation there reports what the CPU computes."""
    return tf32(False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"the config asks for device '{name}' but this machine has no CUDA GPU that torch "
                f"{torch.__version__} can use; set device: cpu (or auto)"
            )
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def tensorboard_writer_class():
    """torch's TensorBoard SummaryWriter, or a ConfigError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from rescomp.errors import ConfigError

        raise ConfigError("log.tensorboard needs the tensorboard package: pip install 'rescomp[tensorboard]' "
                          "(or set log.tensorboard=false)") from None
    return SummaryWriter


def join(cfg: ExperimentConfig) -> torch.device:
    """This process's device (a device that is not there is named first); under torchrun, after joining
    the process group on it, with a global batch that splits across the processes."""
    from rescomp import distributed

    device = resolve_device(distributed.device_for(cfg.device))
    distributed.init(device)
    distributed.check_batch(cfg.train.batch_size, distributed.world_size())
    return device


def make_context(cfg: ExperimentConfig, run_dir: Optional[Path] = None, console: Optional[Console] = None) -> RunContext:
    """The context of a run; under torchrun, after joining the process group on this rank's device."""
    from rescomp import distributed

    device = join(cfg)
    if cfg.log.tensorboard:
        tensorboard_writer_class()  # a missing package is named before any folder is made
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    if device.type == "cuda":
        if device.index is not None:  # cuda:N: kernels, synchronize() and new tensors default to that GPU
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    rank, world = distributed.rank(), distributed.world_size()
    return RunContext(device, cfg.seed, run_dir, precision, cfg.train.channels_last, cfg.train.compile, rank, world,
                      console or Console(stderr=True, log_path=False, soft_wrap=True))
