"""Several processes, one run: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node N -m rescomp train CONFIG` (or `rescomp train CONFIG --nproc N`, which
launches torchrun) starts N copies of the same command. Every rank runs the same stages on the same
config, in step (SPMD, as torchrun expects). What they share and what only rank 0 does:

- Training and fine-tuning (the Trainer) run under DistributedDataParallel: NCCL on GPUs, Gloo on
  CPUs. The config's batch size is the global batch; each rank takes its own slice of every global
  batch (rescomp.data.BatchLoader), augmented with the draws the one-process run makes for those
  images, so the union of the shards is the one-process epoch and a rank's loss is weighted by its
  share of the batch. With `train.sync_bn` BatchNorm statistics are those of the global batch
  (torch's SyncBatchNorm on GPUs; `SyncBatchNorm2d` below on CPUs, where torch's refuses to run).
- Evaluation, filter scoring and metrics: each rank takes its shard, sums are all-reduced, so every
  rank holds the same numbers and makes the same decisions.
- After a stage transforms the network (prune, delete units, mask, share, binarize), every rank takes
  rank 0's network (`agree`), so no floating-point difference between ranks can split them.
- Only rank 0 writes: every write of rescomp.checkpoint is collective (rank 0 writes, every rank waits
  until it is there, `collective_write`). Every rank reads checkpoints, so for several nodes the run
  folder must be on a file system all nodes see. Rank 0 alone claims the run folder (its lock, --fresh)
  and times latency (`on_main`); the other ranks wait and take its answer.
- A resumed run continues from the last checkpoint with the same or another number of processes: the
  checkpoint holds no rank's state, and every epoch's batches depend only on (seed, epoch).

One process (no torchrun, or WORLD_SIZE=1) is the plain path: every helper here is then a no-op.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from rescomp.errors import ConfigError, RescompError, Terminated
from rescomp.jobs import threads_per_process, usable_cores

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_with_launcher() -> None:
    """Make this rank end (SIGTERM) when the launcher that started it does: Linux's PR_SET_PDEATHSIG.

    torchrun's agent starts the ranks in sessions of their own, so `kill -9` of the agent (or of
    `rescomp train --nproc N`, which runs it) leaves them orphaned, and they train on together,
    unseen, holding the run folder: the user's resume is refused until they finish (measured: a rank
    still running 30 s later). With this, they end with it and the run resumes from its last
    checkpoint. The agent starts the ranks from its main thread, whose end is the process's, as
    PR_SET_PDEATHSIG requires. Under another launcher the rank ends with whatever process started it.
    Elsewhere (macOS, Windows) this is a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the old behaviour
        return
    # A launcher killed before this call (while the rank still imports) goes unnoticed. Checking for a
    # parent of pid 1 would catch it, but would also stop a rank that a container's init starts
    # itself (a Kubernetes PyTorchJob), so there is no such check.


_alone = False  # inside `on_main` on rank 0: every helper here acts as for one process


def active() -> bool:
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> None:
    """Join torchrun's process group (NCCL for CUDA, Gloo for the CPU) once per process; a no-op for one
    process. The caller has picked this rank's device (`device_for`)."""
    if not launched() or active():
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun (one process)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)


def _one_gpu_named(name: str, why: str) -> None:
    """A config naming one GPU would put every process on it."""
    if name.startswith("cuda:"):
        raise ConfigError(f"device '{name}' names one GPU, but {why}; set device: cuda (or auto)")


def device_for(name: str) -> str:
    """The device this rank trains on: under torchrun, `cuda` (or `auto` on a GPU machine) is the GPU of
    this rank's LOCAL_RANK."""
    if not launched():
        return name
    _one_gpu_named(name, "under torchrun each process takes the GPU of its LOCAL_RANK")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise ConfigError(f"process {local_rank()} of this node has no GPU: the node has {n}; run at most "
                              f"{n} processes per node (--nproc / --nproc_per_node)")
        return f"cuda:{local_rank()}"
    return name


def check_launch(cfgs: list, nproc: int) -> torch.device:
    """What `--nproc nproc` needs of every config, checked before any process starts: a global batch that
    splits, and a GPU per process (or no more processes than CPU cores). The device they run on."""
    from rescomp.context import resolve_device

    for cfg in cfgs:
        check_batch(cfg.train.batch_size, nproc)
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            _one_gpu_named(cfg.device, f"--nproc {nproc} gives each process its own")
            if nproc > torch.cuda.device_count():
                raise ConfigError(f"--nproc {nproc} asks for a GPU per process, but this machine has "
                                  f"{torch.cuda.device_count()}; use --nproc {torch.cuda.device_count()} or fewer")
        elif nproc > (cores := usable_cores()):
            raise ConfigError(f"--nproc {nproc} processes on the {cores} CPU cores this process may use would slow "
                              f"each other down; use --nproc {cores} or fewer")
    return device


def check_batch(batch_size: int, world: int, what: str = "train.batch_size") -> None:
    """The global batch must split evenly, so every rank's loss counts as much as its images."""
    if world > 1 and batch_size % world:
        raise ConfigError(f"{what} {batch_size} is the global batch and must split evenly across {world} processes; "
                          f"use a multiple of {world}, or another number of processes")


# -- collectives that are no-ops for one process ------------------------------------------------

_cpu: Any = None  # a Gloo group beside an NCCL one, for work that stays on the CPU (int8 QAT)


def group_for(device: torch.device) -> Any:
    """The process group for tensors on `device`: the default one, or Gloo for CPU tensors when the
    default is NCCL (which reduces CUDA tensors only). Every rank must ask at the same point."""
    global _cpu
    if device.type != "cpu" or dist.get_backend() != "nccl":
        return None
    if _cpu is None:
        _cpu = dist.new_group(backend="gloo")
    return _cpu


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, in place (the result is bitwise the same on every rank)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group_for(t.device))
    return t


def broadcast(obj: T) -> T:
    """Rank 0's obj on every rank (pickled; on NCCL through this rank's GPU)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only, its result (or its error) on every rank: for what must happen once
    (claiming a run folder, timing latency) while the other ranks wait."""
    if not active():
        return fn()
    global _alone
    result: Any = None
    if is_main():
        _alone = True  # what fn writes or reduces, rank 0 does alone: no collective while the others wait here
        try:
            result = ("ok", fn())
        except BaseException as e:  # every rank raises it, so none waits for rank 0 forever
            result = ("error", _picklable(e))
        finally:
            _alone = False
    kind, value = broadcast(result)
    if kind == "error":
        raise value
    return value


def main_only(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` as `on_main` runs it: computed by rank 0, the same answer on every rank."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return on_main(lambda: fn(*args, **kwargs))
    return wrapper


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        cls = RescompError if isinstance(e, RescompError) else RuntimeError
        return cls(f"{type(e).__name__}: {e}")


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (decoding and caching a dataset), then the others (reading its cache)."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def collective_write(write: Callable[[], None]) -> None:
    """A write to the run folder: rank 0 writes, and no rank goes on until it is there (every rank
    calls this at the same point, as every rank runs the same stages)."""
    if not active():
        write()
        return
    try:
        if is_main():
            write()
    finally:
        dist.barrier()


# -- the model --------------------------------------------------------------------------------------

def agree(model: nn.Module, spec: dict[str, Any], info: Any) -> tuple[nn.Module, dict[str, Any], Any]:
    """Rank 0's (model, spec, info) on every rank: a stage's transform (pruning decisions, deleted units,
    masks, codes) made identical everywhere before training resumes under DDP. The network crosses as
    its spec and state_dict, as a checkpoint does."""
    if not active():
        return model, spec, info
    payload = broadcast((spec, {k: v.detach().cpu() for k, v in model.state_dict().items()}, info) if is_main() else None)
    if is_main():
        return model, spec, info
    from rescomp.checkpoint import rebuild

    spec, state, info = payload
    device = next(iter(model.parameters()), torch.empty(0)).device
    return rebuild(spec, state).to(device), spec, info


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training loop calls: `model` under DistributedDataParallel (which averages
    gradients across ranks), or `model` itself for one process. Parameters stay `model`'s, so
    checkpoints hold plain state_dict keys."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group_for(device))


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks: d(sum_r L_r)/dx_i = sum_r dL_r/dy."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(t.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum(grad.clone())


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's, on any device (torch's
    SyncBatchNorm runs on GPUs only). Two passes, as F.batch_norm computes them: the mean, then the
    mean squared deviation from it, each summed over ranks with gradients flowing back across them.
    Running statistics are updated as BatchNorm2d does (unbiased variance of the global batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        dims = (0, 2, 3)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        n = float(all_reduce_sum(count))
        mean = _SumOverRanks.apply(xf.sum(dims)) / n
        centred = xf - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def _swap_batchnorms(module: nn.Module, make: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    for name, child in module.named_children():
        new = make(child)
        if new is not None:
            setattr(module, name, new)
        else:
            _swap_batchnorms(child, make)
    return module


def _like(bn: nn.Module, cls: type) -> nn.Module:
    """A batch norm of class `cls` holding bn's own parameters and buffers (the optimizer's tensors)."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` synced across ranks (same tensors; a no-op for one process)."""
    if not active():
        return model
    cls = nn.SyncBatchNorm if device.type == "cuda" else SyncBatchNorm2d  # torch's fused kernels where it runs
    return _swap_batchnorms(model, lambda m: _like(m, cls) if type(m) is nn.BatchNorm2d else None)


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """`sync_batchnorm` undone: plain BatchNorm2d again, for evaluation, measuring, export and checkpoints."""
    return _swap_batchnorms(model, lambda m: _like(m, nn.BatchNorm2d)
                            if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)) else None)


def weighted(loss: torch.Tensor, local: int, total: int) -> torch.Tensor:
    """A rank's mean loss over its `local` images of a global batch of `total`, scaled so that DDP's
    average over ranks is the mean over the global batch: loss x local x world / total (1 when the
    shards are equal, as they are for every full batch)."""
    w = world_size()
    return loss if local * w == total else loss * (local * w / total)


# -- starting several processes -----------------------------------------------------------------------

def launch(nproc: int, argv: list[str]) -> int:
    """`rescomp <argv>` as nproc processes on this machine through torchrun (its elastic agent, run
    here), each with its share of the CPU threads; the exit code of the first process that failed
    (2 for a user mistake, as one process gives), or 0."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "rescomp", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        code = first.exitcode or 1
        return code if code > 0 else 128 - code  # killed by a signal: the shell's 128 + signal
    except SignalException as e:  # the agent's own handlers took SIGTERM / SIGINT and stopped the ranks
        raise (Terminated() if e.sigval == signal.SIGTERM else KeyboardInterrupt()) from None
    return 0

