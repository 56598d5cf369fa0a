"""Int8 post-training quantization and quantization-aware training through torch.ao FX graph mode.

Every call to the FX API (deprecated in current PyTorch, present in 2.14.x) lives in this file.
Weights are int8 per output channel (x86, fbgemm; qnnpack's default is per tensor) and activations
uint8 per tensor, with the backend's default observers. The classifier, and for PTQ the residual sums
no ReLU follows and the batch norms that read them, stay fp32 (`qconfig_mapping` says why, with the
figures); conv-BN(-ReLU) and linear(-ReLU) are fused
by prepare_fx. torch lowers no pad op to int8: it leaves ResNet50V2's stem ZeroPad2d between a
dequantize and a quantize, which `backend_config` makes lossless by giving the pad its input's scale
and zero point (a real 0 is exactly the zero point).

Activation range (`quantize.reduce_range`). Kastanos 2020 converts with TFLite: 8-bit activations.
torch's x86 and fbgemm backends default to 7 (0..127) because their int8 kernels on a CPU without
VNNI multiply u8 x s8 with VPMADDUBSW, which adds each pair of products into a saturating int16:
2 x 255 x 127 = 64,770 > 32,767, while 2 x 127 x 128 = 32,512 fits. `auto` keeps the backend's
default; `false` gives 8 bits (finer steps), exact on qnnpack (int32 sums) and, not measured here,
on a VNNI CPU (VPDPBUSD sums into int32). On an AVX2 CPU without VNNI the x86/fbgemm convs then
saturate: measured on an AMD EPYC with AVX2 only, an all-255 x all-127 1x1 conv over 64 channels
returns half the exact sum, and random u8 x s8 3x3 convs are off by up to 13 output steps (0.5 with
7-bit inputs). Even 7 bits only protect values inside the calibrated range: int8 tensors stay
quint8, so a test activation up to twice the calibrated maximum reaches the kernel as 128..255.
The summary records the resolved choice as `activation_bits`; qnnpack cannot run ResNet50V2 (its
1x1 max-pool shortcuts), so it offers that network no exact 8-bit path.

A quantized network is stored as {arch spec, backend, method, int8 state_dict} and reloaded by
replaying prepare -> convert on the spec and loading the state_dict (scales, zero points and packed
weights included): nothing is pickled and nothing is recalibrated.
"""

from __future__ import annotations

import copy
import importlib
import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx
import torch.nn as nn

from rescomp import checkpoint
from rescomp.config_sections import QuantizeConfig
from rescomp.errors import CheckpointError, ConfigError
from rescomp.registry import Registry

QUANT_FORMAT = checkpoint.INT8


@dataclass(frozen=True)
class Backend:
    """One int8 backend as the quantize stage, int8.pt and its reload see it. Each backend's module
    registers it (torch.ao FX here, quantize_ort.py, quantize_pt2e.py) and imports its runtime only
    when called, so a runtime that is not installed is named when it is asked for, in one line."""
    label: str  # as a table row names it
    ptq: Callable[..., tuple[nn.Module, dict[str, Any], Optional[bytes]]]  # (model, cfg, batches, image_size)
    describe: Callable[[QuantizeConfig], dict[str, Any]]  # what a row must say about how it was quantized
    load: Callable[[dict[str, Any]], nn.Module]  # an int8.pt payload -> the network, nothing recalibrated
    layers: Callable[[nn.Module], tuple[int, int]]  # its int8 network -> (conv / linear layers in int8, all of them)
    blob_key: Optional[str] = None  # the payload key of its serialized int8 program; None: a state_dict
    prepare_qat: Optional[Callable[..., nn.Module]] = None  # (model, cfg, image_size) -> a network to fine-tune
    convert_qat: Optional[Callable[..., tuple[nn.Module, Optional[bytes]]]] = None  # (fine-tuned, image_size)


BACKENDS: Registry[Backend] = Registry("int8 backend")


def backend(name: str) -> Backend:
    """The registered backend `name`; the modules of the other backends register theirs when first asked."""
    for module in ("quantize_ort", "quantize_pt2e"):
        importlib.import_module(f"rescomp.compress.{module}")
    return BACKENDS.get(name)


def layer_counts(b: Backend, qmodel: nn.Module) -> dict[str, int]:
    """{"int8_layers": the conv and linear layers that compute in int8, "weight_layers": all of them}, as
    backend `b`'s int8 network holds them (a run's summary, `rescomp measure` of an int8.pt)."""
    int8, total = b.layers(qmodel)
    return {"int8_layers": int8, "weight_layers": total}


def counted_layers(b: Backend, qmodel: nn.Module) -> dict[str, int]:
    """layer_counts, or ConfigError where none is int8: the fp32 network would be stored, measured and
    reported as int8 (PT2E under torch 2.11 with a non-strict capture did this)."""
    counts = layer_counts(b, qmodel)
    int8, total = counts["int8_layers"], counts["weight_layers"]
    if not total:
        raise ConfigError("this network has no conv or linear layer, so int8 has nothing to quantize")
    if not int8:
        raise ConfigError(f"{b.label} left all {total} conv and linear layers of this network in fp32, so its "
                          f"'int8' network would be the fp32 one; use another quantize.backend")
    return counts


@contextmanager
def _fx_api() -> Iterator[Any]:
    """The FX quantization functions, with their deprecation warnings silenced; or a clear error."""
    try:
        from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
        from torch.ao.nn.intrinsic import BNReLU2d
        from torch.ao.quantization.fx.tracer import QuantizationTracer
        from torch.ao.quantization.backend_config import BackendPatternConfig, get_native_backend_config
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
    except ImportError as e:
        raise ConfigError(
            f"torch {torch.__version__} lacks the torch.ao FX quantization API ({e}); int8 needs torch>=2.4,<2.15: "
            f"pip install 'torch>=2.4,<2.15'"
        ) from None

    class API:
        pass

    api = API()
    api.__dict__.update(qconfig=get_default_qconfig_mapping, qat_qconfig=get_default_qat_qconfig_mapping,
                        prepare=prepare_fx, prepare_qat=prepare_qat_fx, convert=convert_fx, QConfig=QConfig,
                        native=get_native_backend_config, Pattern=BackendPatternConfig, BNReLU2d=BNReLU2d,
                        Tracer=QuantizationTracer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield api


# torch.ao.quantization.get_default_qconfig: the activation observers' reduce_range per backend.
DEFAULT_REDUCE_RANGE = {"x86": True, "fbgemm": True, "qnnpack": False, "onnxruntime": False}
# Backends whose x86 int8 kernels multiply u8 x s8 into saturating int16 pairs where the CPU has no VNNI.
# pt2e's (oneDNN, through Inductor) do too: measured on an AVX2-only AMD EPYC, an all-255 x all-127
# 1x1 conv over 64 channels returned 31.6 for an exact 64 with 8-bit activations, 63.0 with 7.
SATURATING = ("x86", "fbgemm", "pt2e")


def reduce_range(cfg: QuantizeConfig) -> bool:
    """Whether activations get 7 bits (True) or 8: the config's choice, else its backend's default (for
    pt2e, whose X86InductorQuantizer defaults to 8 bits: 7 where the CPU has no VNNI, 8 where it has)."""
    from rescomp.hardware import has_vnni

    if cfg.reduce_range != "auto":
        return cfg.reduce_range
    return not has_vnni(onednn=True) if cfg.backend == "pt2e" else DEFAULT_REDUCE_RANGE[cfg.backend]


def may_saturate(cfg: QuantizeConfig) -> bool:
    """8-bit activations on an x86/fbgemm/oneDNN kernel without VNNI: int16 pair sums can saturate."""
    from rescomp.hardware import has_vnni

    # x86 and pt2e run oneDNN kernels (x86 some, FBGEMM the rest), which ONEDNN_MAX_CPU_ISA can keep off VNNI
    return not reduce_range(cfg) and cfg.backend in SATURATING and not has_vnni(onednn=cfg.backend != "fbgemm")


def qconfig_mapping(fx: Any, cfg: QuantizeConfig, model: nn.Module) -> Any:
    """The backend's default mapping (ptq or qat), its activation observers set to reduce_range(cfg), with
    the network's classifier in fp32; for ptq, residual sums and the batch norms that read them in fp32.

    Two places where torch's int8 graph loses what decides the answer (measured on the trained cpu-long
    ResNet50V2 of results/table-int8, 10,000 test images; fp32 63.40 %, torch's own x86 flow 26.20 %):
    - The classifier's output. On one 7-bit grid of logits the top two classes often round to the
      same step and argmax takes the lower index; torch's HistogramObserver also clips the grid's top,
      where the winning logit lies. With the residual stream below in fp32: 62.52 % with logits on a
      min/max 7-bit grid, 62.51 on the histogram's, 63.06 on 8 bits, 62.98 (92.81 % of images keep
      their fp32 class) with the classifier in fp32. So the classifier (`classifier`) runs in fp32,
      as PT2E's X86InductorQuantizer leaves a linear's output (it is 0.1 % of ResNet50V2's weights).
    - A pre-activation residual stream (an addition with no ReLU after it). It carries a few large
      values that the identity shortcuts pass unchanged to the classifier (-1,945 .. 1,534 before
      ResNet50V2's classifier) and a bulk near zero. The histogram observer clipped it (26.20 %);
      min/max keeps the range, but its steps of 27 are coarse for the bulk (62.01 %, and 61.92 with
      the classifier in fp32). So for ptq, additions with no ReLU fused after them run in fp32, and so
      do the batch norms that are not folded into a conv (BN and BN-ReLU: the stream's readers in a
      pre-activation network; quantized, they would put the stream on a histogram's grid again:
      26.21 %), as PT2E leaves both. The stream is quantized only where a conv or max-pool takes it
      in. ResNet-56's additions are fused with their ReLU and stay int8.
    QAT keeps torch's default elsewhere: its fake quantization trains the network to the int8 grid."""
    mapping = (fx.qat_qconfig if cfg.method == "qat" else fx.qconfig)(cfg.backend)
    default = mapping.global_qconfig.activation
    act = default.with_args(reduce_range=reduce_range(cfg))

    def swap(qc: Any) -> Any:  # only the qconfigs built on the default activation observer
        return fx.QConfig(activation=act, weight=qc.weight) if qc is not None and qc.activation is default else qc

    mapping.set_global(swap(mapping.global_qconfig))
    for pattern, qc in list(mapping.object_type_qconfigs.items()):
        mapping.set_object_type(pattern, swap(qc))
    try:
        tracer = fx.Tracer([], [])  # prepare_fx's own tracer, so that its scopes and call order are ours
        graph = tracer.trace(model)
    except Exception:
        return mapping  # prepare_fx traces it again, and says why it cannot
    if cfg.method == "ptq":
        for op in (nn.BatchNorm2d, fx.BNReLU2d):
            mapping.set_object_type(op, None)
        for scope, op, index in residual_sums(graph, tracer.node_name_to_scope, model):
            mapping.set_module_name_object_type_order(scope, op, index, None)
    for name in classifier(graph, model):
        mapping.set_module_name(name, None)
    return mapping


def _is_relu(n: torch.fx.Node, model: nn.Module) -> bool:
    return ((n.op == "call_function" and n.target in (torch.relu, torch.nn.functional.relu))
            or (n.op == "call_method" and n.target == "relu")
            or (n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.ReLU)))


def residual_sums(graph: torch.fx.Graph, scopes: dict[str, Any], model: nn.Module) -> list[tuple[str, Any, int]]:
    """(module path, add op, its call index within that module) of each addition with no ReLU after it:
    the keys of QConfigMapping.set_module_name_object_type_order, counted as prepare_fx counts them."""
    calls: dict[tuple[str, Any], int] = {}
    sums = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in (operator.add, torch.add):
            continue
        key = (scopes[n.name][0], n.target)  # scopes: node name -> (module path, module type)
        index = calls[key] = calls.get(key, -1) + 1
        if not (len(n.users) == 1 and _is_relu(next(iter(n.users)), model)):
            sums.append((*key, index))
    return sums


def classifier(graph: torch.fx.Graph, model: nn.Module) -> list[str]:
    """The names of the modules from the network's output back to its last conv or linear layer (that
    layer included), through modules and functions of one input (flatten, pooling, ReLU); [] if the
    output is not reached that way."""
    node, names = next(n for n in graph.nodes if n.op == "output").args[0], []
    while isinstance(node, torch.fx.Node) and node.op in ("call_module", "call_function", "call_method"):
        if node.op == "call_module":
            names.append(node.target)
            if isinstance(model.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
                return names
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return []


def backend_config(fx: Any) -> Any:
    """torch's native patterns plus nn.ZeroPad2d as an op that keeps its input's scale and zero point,
    as MaxPool2d does (ResNet50V2's stem pads with zeros before its pool, as Keras' ZeroPadding2D):
    without it the pad gets an observer of its own, and the int8 stem an extra rounding."""
    bc = fx.native()
    pool = next(c for c in bc.configs if c.pattern is nn.MaxPool2d)
    return bc.set_backend_pattern_config(
        fx.Pattern(nn.ZeroPad2d).set_observation_type(pool.observation_type).set_dtype_configs(pool.dtype_configs))


def set_engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"quantization backend '{backend}' is not built into this torch; "
                          f"available: {', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = backend


def prepare(model: nn.Module, cfg: QuantizeConfig, image_size: int) -> nn.Module:
    """A copy of `model` with observers (ptq, eval mode) or fake-quant modules (qat, train mode)."""
    set_engine(cfg.backend)
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    example = (torch.zeros(1, 3, image_size, image_size),)
    try:
        with _fx_api() as fx:
            mapping, bc = qconfig_mapping(fx, cfg, model), backend_config(fx)
            if cfg.method == "qat":
                return fx.prepare_qat(model.train(), mapping, example, backend_config=bc)
            return fx.prepare(model.eval(), mapping, example, backend_config=bc)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"torch.fx cannot trace this model for quantization ({type(e).__name__}: {e}); "
                          f"int8 needs a model without data-dependent control flow") from None


@torch.inference_mode()
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    prepared.eval()
    n = 0
    for x in batches:
        prepared(x.cpu().contiguous())
        n += len(x)
    return n


def convert(prepared: nn.Module, image_size: int) -> nn.Module:
    try:
        with _fx_api() as fx:
            q = fx.convert(copy.deepcopy(prepared).cpu().eval(), backend_config=backend_config(fx))
            q(torch.zeros(1, 3, image_size, image_size))  # fail here, with a clear message, not later
            return q
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"this model uses an operation the {torch.backends.quantized.engine} int8 backend cannot "
                          f"run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def ptq(model: nn.Module, cfg: QuantizeConfig, calibration: Iterable[torch.Tensor], image_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training int8: prepare, calibrate on `calibration` batches, convert."""
    prepared = prepare(model, cfg, image_size)
    n = calibrate(prepared, calibration)
    return convert(prepared, image_size), {**describe(cfg), "calibration_images": n}


def describe(cfg: QuantizeConfig) -> dict[str, Any]:
    """What a row must say about how it was quantized."""
    return {"method": cfg.method, "backend": cfg.backend, "activation_bits": 7 if reduce_range(cfg) else 8}


def skeleton(spec: dict[str, Any], cfg: QuantizeConfig, image_size: int) -> nn.Module:
    """The int8 module structure of a spec, with meaningless values: load a state_dict into it."""
    from rescomp.models import build_model

    prepared = prepare(build_model(spec), cfg, image_size)  # as it was made: QAT quantizes other ops than PTQ
    calibrate(prepared, [torch.zeros(1, 3, image_size, image_size)])  # observers need one pass to convert
    return convert(prepared, image_size)


def save_int8(path: Path, qmodel: nn.Module, spec: dict[str, Any], cfg: QuantizeConfig, image_size: int,
              metrics: dict[str, Any], blob: bytes | None = None) -> None:
    """An FX int8 network as its state_dict; an onnxruntime one as its int8 ONNX graph's bytes, a pt2e
    one as its converted program's (torch.export.save) bytes (`blob`, under the backend's blob_key)."""
    key = backend(cfg.backend).blob_key
    weights = {key: blob} if key is not None else {"state_dict": qmodel.state_dict()}
    checkpoint.save(path, {"kind": QUANT_FORMAT, "arch": spec, "quantize": cfg.model_dump(), "image_size": image_size,
                           **weights, "metrics": metrics})


def load_int8(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about TypedStorage when it unpickles quantized tensors
        payload = checkpoint.load(path)
    if payload.get("kind") != QUANT_FORMAT:
        raise CheckpointError(f"'{path}' is not an int8 rescomp model")
    cfg = QuantizeConfig.model_validate(payload["quantize"])
    try:
        return backend(cfg.backend).load(payload), payload
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None


def _load_fx(payload: dict[str, Any]) -> nn.Module:
    """Replay prepare -> convert on the spec, then load the int8 state_dict (scales and zero points included)."""
    q = skeleton(payload["arch"], QuantizeConfig.model_validate(payload["quantize"]), payload["image_size"])
    try:
        q.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"int8 weights do not fit the int8 graph of its arch spec ({str(e).splitlines()[0]}); "
                              f"if an earlier rescomp made it, quantize again: rescomp quantize CONFIG --fresh") from None
    return q


def _fx_layers(q: nn.Module) -> tuple[int, int]:
    """(quantized conv and linear modules, those and the float ones) of an FX int8 network: the classifier,
    which stays fp32 (`qconfig_mapping`), is a float one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq
        from torch.ao.nn.quantized.modules.conv import _ConvNd as QuantizedConv

    int8 = sum(isinstance(m, (QuantizedConv, nnq.Linear)) for m in q.modules())
    fp32 = sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in q.modules())
    return int8, int8 + fp32


for _engine in ("x86", "fbgemm", "qnnpack"):
    BACKENDS.register(_engine)(Backend(
        f"FX {_engine}", ptq=lambda *a: (*ptq(*a), None), describe=describe, load=_load_fx, layers=_fx_layers,
        prepare_qat=prepare, convert_qat=lambda prepared, image_size: (convert(prepared, image_size), None)))
del _engine
