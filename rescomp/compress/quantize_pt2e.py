"""Int8 through PyTorch 2 export quantization (torchao's PT2E), lowered by Inductor (`quantize.backend: pt2e`).

Every torchao call lives here. The network is captured with torch.export (a dynamic batch
dimension), annotated by `X86InductorQuantizer` with its default config (uint8 activations per tensor,
int8 weights per output channel; `quantize.reduce_range` gives 7-bit activations), calibrated on the
same training images as the other backends, and converted. This replaces torch.ao's deprecated FX
flow. The converted program is stored whole (torch.export.save bytes) in int8.pt, so it reloads
without recalibrating, and runs compiled by Inductor with weight freezing, which fuses the
quantize/dequantize patterns into oneDNN int8 kernels. Inductor compiles once per input shape on
first use; the timing's warm-up passes absorb that. QAT through PT2E is not wired in here yet.
"""

from __future__ import annotations

import io
from typing import Any, Iterable

import torch
import torch.nn as nn

from rescomp.config import QuantizeConfig
from rescomp.errors import ConfigError
from rescomp.measure import InductorForward


def _api() -> tuple[Any, Any, Any, Any]:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as e:
        raise ConfigError(f"quantize.backend pt2e needs torchao ({e.name} is missing): pip install 'torchao==0.18.0'") from None
    return prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config


def describe(cfg: QuantizeConfig) -> dict[str, Any]:
    from rescomp.compress.quantize import reduce_range

    return {"method": "ptq", "backend": "pt2e", "activation_bits": 7 if reduce_range(cfg) else 8,
            "quantizer": "X86InductorQuantizer", "activations": "uint8 per tensor", "weights": "int8 per channel",
            "lowering": "Inductor, freezing"}


class Pt2eForward(InductorForward):
    """A PT2E int8 program (its torch.export.save bytes in `model`), compiled by Inductor with freezing."""

    def __init__(self, program: nn.Module, blob: bytes) -> None:
        super().__init__(program, as_is=True)
        self.model = blob

    def train(self, mode: bool = True) -> "Pt2eForward":
        """An exported program has no train mode (torch.export refuses it); it always runs for inference."""
        self.training = mode
        return self


def ptq(model: nn.Module, cfg: QuantizeConfig, calibration: Iterable[torch.Tensor],
        image_size: int) -> tuple[nn.Module, dict[str, Any], bytes]:
    """(the int8 network compiled by Inductor, what was done, the converted program's bytes)."""
    from rescomp.compress.quantize import reduce_range
    from rescomp.export import dynamic_batch

    prepare_pt2e, convert_pt2e, Quantizer, default_config = _api()
    example = (torch.zeros(2, 3, image_size, image_size),)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    try:
        captured = torch.export.export(model, example, dynamic_shapes=dynamic_batch()).module()
    except Exception as e:
        raise ConfigError(f"torch.export cannot capture this model for PT2E ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); use backend x86 or onnxruntime") from None
    quantizer = Quantizer().set_global(default_config(reduce_range=reduce_range(cfg)))
    try:
        prepared = prepare_pt2e(captured, quantizer)
    except Exception as e:  # torchao's annotation has patterns it cannot take (ResNet50V2's shared pre-activations)
        raise ConfigError(f"torchao's X86InductorQuantizer cannot annotate this network ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); use backend x86 or onnxruntime") from None
    n = 0
    with torch.no_grad():
        for x in calibration:
            prepared(x.cpu().contiguous())
            n += len(x)
    converted = convert_pt2e(prepared)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(converted, example, dynamic_shapes=dynamic_batch()), buf)
    blob = buf.getvalue()
    return load(blob), {**describe(cfg), "calibration_images": n}, blob


def load(blob: bytes) -> Pt2eForward:
    _api()
    return Pt2eForward(torch.export.load(io.BytesIO(blob)).module(), blob)
