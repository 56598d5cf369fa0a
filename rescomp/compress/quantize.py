"""Int8 post-training quantization and quantization-aware training through torch.ao FX graph mode.

Every call to the FX API (deprecated in current PyTorch, present in 2.14.x) lives in this file.
Weights are int8 per output channel and activations uint8 per tensor, with the x86 backend's
default observers; conv-BN(-ReLU) and linear(-ReLU) are fused by prepare_fx. A quantized network is
stored as {arch spec, backend, method, int8 state_dict} and reloaded by replaying
prepare -> convert on the spec and loading the state_dict (scales, zero points and packed weights
included): nothing is pickled and nothing is recalibrated.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from rescomp import checkpoint
from rescomp.config import QuantizeConfig
from rescomp.errors import CheckpointError, ConfigError

QUANT_FORMAT = "rescomp-int8"


@contextmanager
def _fx_api() -> Iterator[Any]:
    """The FX quantization functions, with their deprecation warnings silenced; or a clear error."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
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
                        prepare=prepare_fx, prepare_qat=prepare_qat_fx, convert=convert_fx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield api


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
            if cfg.method == "qat":
                return fx.prepare_qat(model.train(), fx.qat_qconfig(cfg.backend), example)
            return fx.prepare(model.eval(), fx.qconfig(cfg.backend), example)
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
            q = fx.convert(copy.deepcopy(prepared).cpu().eval())
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
    return convert(prepared, image_size), {"method": "ptq", "backend": cfg.backend, "calibration_images": n}


def skeleton(spec: dict[str, Any], cfg: QuantizeConfig, image_size: int) -> nn.Module:
    """The int8 module structure of a spec, with meaningless values: load a state_dict into it."""
    from rescomp.models import build_model

    prepared = prepare(build_model(spec), cfg.model_copy(update={"method": "ptq"}), image_size)
    calibrate(prepared, [torch.zeros(1, 3, image_size, image_size)])  # observers need one pass to convert
    return convert(prepared, image_size)


def save_int8(path: Path, qmodel: nn.Module, spec: dict[str, Any], cfg: QuantizeConfig, image_size: int,
              metrics: dict[str, Any]) -> None:
    checkpoint.save(path, {"kind": QUANT_FORMAT, "arch": spec, "quantize": cfg.model_dump(), "image_size": image_size,
                           "state_dict": qmodel.state_dict(), "metrics": metrics})


def load_int8(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about TypedStorage when it unpickles quantized tensors
        payload = checkpoint.load(path)
    if payload.get("kind") != QUANT_FORMAT:
        raise CheckpointError(f"'{path}' is not an int8 rescomp model")
    cfg = QuantizeConfig.model_validate(payload["quantize"])
    q = skeleton(payload["arch"], cfg, payload["image_size"])
    try:
        q.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"'{path}': int8 weights do not fit its arch spec ({str(e).splitlines()[0]})") from None
    return q, payload
