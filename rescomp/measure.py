"""What a network costs: parameters, MACs, bytes on disk, CPU latency, GPU throughput, activations.

One module that every technique reuses. fvcore counts one multiply-add as one "flop"; we call that
number MACs, as it is (DESIGN.md, habit 6).
"""

from __future__ import annotations

import io
import logging
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from rescomp import checkpoint
from rescomp.config import MeasureConfig
from rescomp.distributed import main_only
from rescomp.hardware import device_name

_timing_depth = 0  # this process holds the machine's timing lock while > 0


def timed_alone(fn):
    """`fn` (it times something) run while this process holds the machine's timing lock, a file in the
    cache folder: runs side by side (`rescomp jobs`, or by hand) never time at the same moment, so one
    clock is not slowed by another process's timing loop."""
    import fcntl
    import functools
    import os

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _timing_depth
        if _timing_depth:
            return fn(*args, **kwargs)
        from rescomp.config import DataConfig
        from rescomp.data import cache_root

        path = cache_root(DataConfig()) / "timing.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _timing_depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                _timing_depth -= 1
        finally:
            os.close(fd)  # frees the lock
    return wrapper


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_buffers(model: nn.Module) -> int:
    """Numbers held in buffers (BatchNorm running mean/var and counters): Keras counts the first two as params."""
    return sum(b.numel() for b in model.buffers())


def count_bn_stats(model: nn.Module) -> int:
    """BatchNorm moving means and variances: Keras counts them as (non-trainable) parameters."""
    return sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))


def count_macs(model: nn.Module, image_size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1, as fvcore counts them."""
    model = checkpoint.copy_network(model).cpu().eval()
    x = torch.zeros(1, channels, image_size, image_size)
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # it warns about every op it does not count
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and tracer use APIs torch marks deprecated
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the saved state_dict, as torch.save writes it."""
    return tensor_bytes(model.state_dict())


def tensor_bytes(tensors: dict[str, Any]) -> int:
    """Bytes of named tensors as torch.save writes them: every size column counts this way (a state_dict,
    an int8 ONNX graph's initializers, a PT2E program's tensors), so that sizes compare across backends."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getbuffer().nbytes


@contextmanager
def pinned_threads(n: Optional[int]) -> Iterator[int]:
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def cpu_latency_ms(model: nn.Module, image_size: int, batch: int, *, threads: Optional[int] = None,
                   warmup: int = 3, repeats: int = 10, channels_last: bool = False) -> float:
    """Median wall time of one forward pass on the CPU, in milliseconds, after warm-up."""
    return cpu_latency_stats({"m": (model, channels_last)}, image_size, batch, threads=threads, warmup=warmup,
                             repeats=repeats, max_spread=None)["m"]["median"]


def cpu_latency_stats(models: dict[str, tuple[nn.Module, bool]], image_size: int, batch: int, *,
                      threads: Optional[int] = None, warmup: int = 3, repeats: int = 10,
                      max_spread: Optional[float] = 0.05, max_seconds: float = 20.0) -> dict[str, dict[str, float]]:
    """Forward-pass times of one or more models (name -> (model, channels_last)) on the CPU, in ms.

    The models are timed interleaved, one pass of each per round, so that a slow spell of the machine
    lands on all of them rather than on whichever was timed then. At least `repeats` rounds; then more,
    until every model's interquartile range is at most `max_spread` of its median, or `max_seconds` of
    timing have passed, or 20 x `repeats` rounds. Per model: median, q1, q3 and the number of passes.
    """
    x = torch.randn(batch, 3, image_size, image_size)
    runs = {}
    for name, (model, nhwc) in models.items():
        m = checkpoint.copy_network(model).cpu().eval()
        xi = x
        if nhwc:
            m, xi = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        runs[name] = (m, xi)
    times: dict[str, list[float]] = {name: [] for name in runs}

    def spread_ok() -> bool:
        return all(_iqr(t) <= max_spread * statistics.median(t) for t in times.values())

    with pinned_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for m, xi in runs.values():
                m(xi)
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or (max_spread is not None and not spread_ok() and rounds < 20 * repeats
                                   and time.perf_counter() - start < max_seconds):
            for name, (m, xi) in runs.items():
                t0 = time.perf_counter()
                m(xi)
                times[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    return {name: {"median": statistics.median(t), "q1": _quartiles(t)[0], "q3": _quartiles(t)[2], "n": len(t)}
            for name, t in times.items()}


def _quartiles(t: list[float]) -> list[float]:
    return statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3


def _iqr(t: list[float]) -> float:
    q = _quartiles(t)
    return q[2] - q[0]


@contextmanager
def cudnn_autotuned() -> Iterator[None]:
    """cuDNN autotuning on while the block runs, as it was after: a GPU timing then does not depend on
    whether a training run (make_context) turned it on first."""
    tuned = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = tuned


def gpu_images_per_s(model: nn.Module, image_size: int, batch: int = 256, iters: int = 50) -> Optional[float]:
    """Inference throughput on the current GPU in bf16 and channels_last, cuDNN autotuned, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda", torch.cuda.current_device())
    model = checkpoint.copy_network(model).to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size, device=dev).contiguous(memory_format=torch.channels_last)
    with cudnn_autotuned(), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(10):
            model(x)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        torch.cuda.synchronize(dev)
    return batch * iters / (time.perf_counter() - t0)


@main_only
@timed_alone
def step_times_ms(model: nn.Module, image_size: int, batch: int, device: torch.device, *, runs: int = 100,
                  warmup: int = 10, reference: Optional[nn.Module] = None,
                  threads: Optional[int] = None) -> dict[str, float]:
    """Mean forward and backward time of a training step on `device` (the paper's Table 2: 100 runs), in
    fp32 and the default layout; on the CPU with `threads` pinned (measure.threads, as the latencies beside
    them: one thread count names a row's timings). With a `reference` network, a step of each is timed in
    turn, so that both see the same machine, and its times come back as reference_forward_ms_b<B> /
    reference_backward_ms_b<B>."""
    with pinned_threads(threads if device.type == "cpu" else None):
        return _step_times(model, image_size, batch, device, runs, warmup, reference)


def _step_times(model: nn.Module, image_size: int, batch: int, device: torch.device, runs: int, warmup: int,
                reference: Optional[nn.Module]) -> dict[str, float]:
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    models = {"": checkpoint.copy_network(model).to(device).train()}
    if reference is not None:
        models["reference_"] = checkpoint.copy_network(reference).to(device).train()
    fwd = dict.fromkeys(models, 0.0)
    bwd = dict.fromkeys(models, 0.0)
    for i in range(warmup + runs):
        for name, m in models.items():
            sync()
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            m.zero_grad(set_to_none=True)
            if i >= warmup:
                fwd[name], bwd[name] = fwd[name] + t1 - t0, bwd[name] + t2 - t1
    return {k: v for name in models for k, v in ((f"{name}forward_ms_b{batch}", 1e3 * fwd[name] / runs),
                                                  (f"{name}backward_ms_b{batch}", 1e3 * bwd[name] / runs))}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _storages(obj: Any) -> dict[int, int]:
    """{storage address: bytes} of the tensors in obj; a view shares its base's storage."""
    out: dict[int, int] = {}
    for t in _tensors(obj):
        try:
            ptr = t.untyped_storage().data_ptr()  # a quantized view's too (torch 2.14)
        except (RuntimeError, NotImplementedError):  # a tensor whose storage torch does not expose
            ptr = id(t)
        out[ptr] = max(out.get(ptr, 0), t.numel() * t.element_size())
    return out


def activation_bytes(model: nn.Module, image_size: int, batch: int = 1) -> Optional[dict[str, int]]:
    """Peak activation memory of one forward pass, from the model's torch.fx graph run in order.

    A tensor is live from the node that makes it to its last user; the input counts, weights do not,
    and a view or in-place result shares its base's memory. act_peak_bytes is the largest total live
    at any node (what a runtime's activation arena must hold, as tflite-tools reports it);
    act_max_tensor_bytes is the largest single activation. None if the model cannot be traced.
    """
    import torch.fx as fx

    model = checkpoint.copy_network(model).cpu().eval()
    try:
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception:
        return None
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    made: dict[fx.Node, dict[int, int]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op not in ("get_attr", "output"):
                made[n] = _storages(out)
            return out

    with torch.inference_mode():
        Recorder(gm).run(torch.zeros(batch, 3, image_size, image_size))
    owners: dict[int, set[fx.Node]] = {}
    size: dict[int, int] = {}
    live = peak = biggest = 0
    for i, n in enumerate(nodes):
        for ptr, nbytes in made.get(n, {}).items():
            if not owners.get(ptr):
                owners[ptr], size[ptr] = set(), nbytes
                live += nbytes
            owners[ptr].add(n)
            biggest = max(biggest, nbytes)
        peak = max(peak, live)
        for m in [m for m in made if last_use[m] == i]:  # free what no later node reads
            for ptr in made.pop(m):
                owners[ptr].discard(m)
                if not owners[ptr]:
                    live -= size[ptr]
    return {"act_peak_bytes": peak, "act_max_tensor_bytes": biggest}


def _activation_row(model: nn.Module, image_size: int) -> dict[str, Any]:
    act = activation_bytes(model, image_size) or {}
    return {"act_peak_bytes_b1": act.get("act_peak_bytes"), "act_max_tensor_bytes_b1": act.get("act_max_tensor_bytes")}


class OrtForward(nn.Module):
    """An ONNX Runtime session behind a module's call, so that it is timed beside the eager models (it
    takes and returns CPU tensors; copies of it share the one session)."""

    def __init__(self, session, model: Optional[bytes] = None) -> None:
        super().__init__()
        self.session, self.input, self.model = session, session.get_inputs()[0].name, model

    def threads(self, n: int) -> None:
        """Run with n intra-op threads: a new session of the same graph where it was built with others."""
        if self.model is not None and self.session.get_session_options().intra_op_num_threads != n:
            from rescomp.export import ort_session

            self.session = ort_session(self.model, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])

    def __deepcopy__(self, memo: dict) -> "OrtForward":
        return self


RUNTIME_COLUMN = {"eager": "cpu", "onnxruntime": "ort", "inductor": "ind"}  # latency_ms_<column>_b<N>


class InductorForward(nn.Module):
    """A network compiled by Inductor with weight freezing on first use, once per batch size (copies share
    it); `model` is copied to the CPU for inference, unless `as_is` (a program torch.export captured, which
    has no train or eval mode to set)."""

    def __init__(self, model: nn.Module, as_is: bool = False) -> None:
        super().__init__()
        self.net = model if as_is else checkpoint.copy_network(model).cpu().eval().to(memory_format=torch.contiguous_format)
        # static shapes: a graph per batch size, each timed as compiled for it (torch's default would
        # recompile the second batch size seen as a dynamic-shape graph and time that)
        self.compiled = torch.compile(self.net, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        with inductor.patch(freezing=True), torch.no_grad():
            return self.compiled(x.contiguous())

    def __deepcopy__(self, memo: dict) -> "InductorForward":
        return self


def _latency_row(models: dict[str, tuple[nn.Module, bool]], image_size: int, cfg: MeasureConfig,
                 runtimes: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Per model (timed interleaved): latency_ms_cpu_b<B> (the median), latency_iqr_ms_cpu_b<B> and
    latency_runs_cpu_b<B> for each configured batch size, threads pinned; empty rows if latency is off.
    The models named in `runtimes` are also timed on every other runtime of cfg.runtimes in the same
    rounds (latency_ms_ort_b<B>, ...), and their rows name the fastest."""
    if not cfg.latency:
        return {name: {} for name in models}
    rows: dict[str, dict[str, Any]] = {}
    with pinned_threads(cfg.threads) as n:
        timed_on = {"cpu_threads": n, "latency_device": device_name("cpu", n)}
        timed = dict(models)
        if "onnxruntime" in cfg.runtimes:
            timed.update({f"{name}@onnxruntime": (_ort_forward(m, image_size, n), False)
                          for name, (m, _) in models.items() if name in runtimes})
        if "inductor" in cfg.runtimes:
            timed.update({f"{name}@inductor": (InductorForward(m), False) for name, (m, _) in models.items() if name in runtimes})
        for name, (m, _) in models.items():
            if isinstance(m, OrtForward):
                m.threads(n)  # an int8 graph in ONNX Runtime gets the threads PyTorch has
        for b in cfg.batch_sizes:
            stats = cpu_latency_stats(timed, image_size, b, threads=n, warmup=cfg.warmup, repeats=cfg.repeats,
                                      max_spread=cfg.max_spread, max_seconds=cfg.max_seconds)
            for key, st in stats.items():
                name, _, runtime = key.partition("@")
                col = RUNTIME_COLUMN[runtime or "eager"]
                rows.setdefault(name, dict(timed_on)).update({
                    f"latency_ms_{col}_b{b}": st["median"], f"latency_iqr_ms_{col}_b{b}": st["q3"] - st["q1"],
                    f"latency_runs_{col}_b{b}": st["n"]})
            for name in models:
                if len(cfg.runtimes) > 1 and name in runtimes:
                    row = rows[name]
                    row[f"fastest_runtime_b{b}"] = min(cfg.runtimes, key=lambda r: row[f"latency_ms_{RUNTIME_COLUMN[r]}_b{b}"])
    return rows


def _ort_forward(model: nn.Module, image_size: int, threads: int) -> OrtForward:
    """The model exported to ONNX (checked against PyTorch, rescomp.export) in an ONNX Runtime session
    with `threads` intra-op threads, as the eager models get."""
    import tempfile

    from rescomp.export import export_onnx, ort_session

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        export_onnx(model, image_size, path)
        return OrtForward(ort_session(path, threads))  # the session holds the graph: the file may go


@main_only  # under several processes rank 0 times alone while the others wait: no rank slows another's clock
@timed_alone
def measure(model: nn.Module, image_size: int, cfg: Optional[MeasureConfig] = None,
            reference: Optional[nn.Module] = None) -> dict[str, Any]:
    """Every cost column of a table row, with units in the names. With a `reference` (the network a
    pruned or shortened one came from), the two are timed interleaved and the row gets the speed-up
    over it (speedup_cpu_b<B>, and whether it is within the noise)."""
    cfg = cfg or MeasureConfig()
    models = {"m": (model, cfg.channels_last)} | ({"ref": (reference, cfg.channels_last)} if reference is not None else {})
    lat = _latency_row(models, image_size, cfg, runtimes=models)
    row: dict[str, Any] = {
        "params": count_params(model),
        "buffers": count_buffers(model),
        "params_with_bn_stats": count_params(model) + count_bn_stats(model),
        "macs": count_macs(model, image_size),
        "size_bytes": state_dict_bytes(model),
        "image_size": image_size,
        **_activation_row(model, image_size),
        **lat["m"],
    }
    if reference is not None and cfg.latency:
        row.update(_speedup(lat["ref"], lat["m"], cfg, "reference", same_runtime=True))
    if cfg.gpu_throughput and torch.cuda.is_available():
        row["gpu_images_per_s_b256"] = gpu_images_per_s(model, image_size)
    return row


def fastest_column(row: dict[str, Any], b: int) -> str:
    """The latency column (cpu, ort, ind) of a row's fastest runtime at batch b, or of its only one."""
    if f"fastest_runtime_b{b}" in row:
        return RUNTIME_COLUMN[row[f"fastest_runtime_b{b}"]]
    return next(c for c in RUNTIME_COLUMN.values() if f"latency_ms_{c}_b{b}" in row)


def _speedup(base: dict[str, Any], new: dict[str, Any], cfg: MeasureConfig, prefix: str,
             same_runtime: bool = False) -> dict[str, Any]:
    """The base model's latencies (as <prefix>_latency_*) and the speed-up of `new` over it per batch
    size, each on its fastest runtime measured: never against a slower runtime than the base has. The
    speed-up is within the noise when the two interquartile ranges overlap. With `same_runtime` (a pruned
    network over its unpruned one), both are read on the base's fastest runtime: like with like."""
    row = {f"{prefix}_{k}": v for k, v in base.items() if k.startswith(("latency_", "fastest_"))}
    for b in cfg.batch_sizes:
        bc = fastest_column(base, b)
        nc = bc if same_runtime else fastest_column(new, b)
        f, q = base[f"latency_ms_{bc}_b{b}"], new[f"latency_ms_{nc}_b{b}"]
        row[f"speedup_cpu_b{b}"] = f / q
        row[f"speedup_within_noise_cpu_b{b}"] = within_noise(f, base[f"latency_iqr_ms_{bc}_b{b}"],
                                                             q, new[f"latency_iqr_ms_{nc}_b{b}"])
    return row


def within_noise(a: float, a_iqr: float, b: float, b_iqr: float) -> bool:
    """Whether two latencies differ by no more than their spread: the ranges median ± half the
    interquartile range overlap."""
    return abs(a - b) <= (a_iqr + b_iqr) / 2


@main_only
@timed_alone
def measure_int8(qmodel: nn.Module, image_size: int, cfg: Optional[MeasureConfig] = None,
                 fp32: Optional[nn.Module] = None) -> dict[str, Any]:
    """The cost columns of a quantized network: bytes, activation memory and CPU latency (its packed
    weights hide parameter counts and MACs from fvcore: take those from its fp32 model). Timed with
    contiguous inputs; the int8 kernels choose their own layout. With its `fp32` model, the two are
    timed interleaved, the fp32 model on every runtime of measure.runtimes (and on ONNX Runtime when the
    int8 model runs there), and the speed-up is over the fastest of them. An int8 model running in ONNX
    Runtime has ort latency columns; sizes count tensors on every backend (the file is file_bytes)."""
    cfg = cfg or MeasureConfig()
    runtime = "onnxruntime" if isinstance(qmodel, OrtForward) else "inductor" if isinstance(qmodel, InductorForward) else None
    if runtime and runtime not in cfg.runtimes:  # its fp32 model is timed where it runs too
        cfg = cfg.model_copy(update={"runtimes": [*cfg.runtimes, runtime]})
    models = {"int8": (qmodel, False)} | ({"fp32": (fp32, cfg.channels_last)} if fp32 is not None else {})
    lat = _latency_row(models, image_size, cfg, runtimes=("fp32",))
    col = RUNTIME_COLUMN.get(runtime or "eager")
    int8 = {k.replace("_cpu_", f"_{col}_"): v for k, v in lat["int8"].items()}
    # bytes of the network's tensors, as an FX network's state_dict counts them: an ONNX graph's
    # initializers, a PT2E program's tensors; the file that also holds the graph is file_bytes (a PT2E
    # program's graph is JSON of about 1 kB a node, an ONNX one's protobuf)
    size = qmodel.tensor_bytes if runtime else state_dict_bytes(qmodel)
    row = {"size_bytes": size, **({"file_bytes": len(qmodel.model)} if runtime else {}),
           **({} if runtime else _activation_row(qmodel, image_size)), **int8}
    if fp32 is not None and cfg.latency:
        row.update(_speedup(lat["fp32"], int8, cfg, "fp32"))
    return row
