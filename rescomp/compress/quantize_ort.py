"""Int8 post-training quantization in ONNX Runtime (`quantize.backend: onnxruntime`).

Every ONNX Runtime quantization call lives here. The fp32 network goes through `rescomp export`'s
checked path, then `quant_pre_process` (shape inference, graph optimisation), then `quantize_static`:
QDQ format, signed int8 activations and weights (S8S8, ONNX Runtime's x86 default), weights per
output channel, and activation ranges from `quantize.calibration_method` over the same training
images the FX backends calibrate on.

Saturation. On an x86 CPU without VNNI, ONNX Runtime's int8 convs add pairs of products in a
saturating int16, as the FX backends' do, for S8S8 as well as U8S8: measured on an AVX2-only EPYC, a
3x3 conv of +-1 weights over an all-ones input came out up to 19.8 off on outputs of 21. ONNX
Runtime's remedy is `reduce_range`: 7-bit weights (not activations, as in FX), which keeps every pair
sum within int16. `quantize.reduce_range: auto` therefore gives 7-bit weights on a CPU without VNNI
and 8-bit ones where VNNI sums into int32; the summary records `weight_bits`. The int8 graph is stored whole (its bytes) in int8.pt, so it
reloads and runs without recalibrating. ONNX Runtime has no quantization-aware training.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from rescomp.compress.quantize import BACKENDS, Backend
from rescomp.config_sections import QuantizeConfig

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def seven_bit_weights(cfg: QuantizeConfig) -> bool:
    """Whether weights get 7 bits: the config's choice, or (auto) where the CPU has no VNNI."""
    from rescomp.hardware import has_vnni

    return cfg.reduce_range if cfg.reduce_range != "auto" else not has_vnni()


def describe(cfg: QuantizeConfig) -> dict[str, Any]:
    return {"method": "ptq", "backend": "onnxruntime", "activation_bits": 8,
            "weight_bits": 7 if seven_bit_weights(cfg) else 8, "format": "QDQ",
            "activations": "int8 per tensor", "weights": "int8 per channel",
            "calibration_method": cfg.calibration_method}


def ptq(model: nn.Module, cfg: QuantizeConfig, calibration: Iterable[torch.Tensor],
        image_size: int) -> tuple[nn.Module, dict[str, Any], bytes]:
    """(the int8 network as a module running in ONNX Runtime, what was done, the int8 ONNX bytes)."""
    from rescomp.export import export_onnx, onnx_modules

    onnx, _ = onnx_modules()
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [x.cpu().contiguous().numpy() for x in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.items = iter({name: b} for b in batches)

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        fp32, pre, int8 = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        export_onnx(model, image_size, fp32)
        quant_pre_process(str(fp32), str(pre))
        name = onnx.load(str(pre)).graph.input[0].name
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its per-tensor notes (a BN weight kept per tensor) are not for users
        try:
            quantize_static(str(pre), str(int8), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            reduce_range=seven_bit_weights(cfg),
                            calibrate_method=getattr(CalibrationMethod, METHODS[cfg.calibration_method]))
        finally:
            root.level = level
        blob = int8.read_bytes()
    return load(blob), {**describe(cfg), "calibration_images": sum(len(b) for b in batches)}, blob


def load(blob: bytes, threads: int | None = None) -> nn.Module:
    """The int8 graph in an ONNX Runtime session, behind a module's call; its `tensor_bytes` are its
    initializers' (int8 weights, int32 or fp32 biases, scales and zero points), the graph's nodes left out."""
    from onnx import load_model_from_string, numpy_helper

    from rescomp.export import ort_session
    from rescomp.measure import OrtForward, tensor_bytes

    forward = OrtForward(ort_session(blob, threads), blob)
    forward.tensor_bytes = tensor_bytes({t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
                                         for t in load_model_from_string(blob).graph.initializer})
    return forward


def layers(q: nn.Module) -> tuple[int, int]:
    """(convs, Gemms and MatMuls whose weight comes from a DequantizeLinear, all of them) in the QDQ graph
    of an int8 network in ONNX Runtime: in QDQ form an int8 layer is the float op fed dequantized inputs,
    and ONNX Runtime runs it in int8 where its weight and input are."""
    from onnx import load_model_from_string

    graph = load_model_from_string(q.model).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    weighted = [node for node in graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    return sum(made_by.get(node.input[1]) == "DequantizeLinear" for node in weighted), len(weighted)


BACKENDS.register("onnxruntime")(Backend(
    "ONNX Runtime", ptq=ptq, describe=describe, load=lambda payload: load(payload["onnx"]), layers=layers,
    blob_key="onnx"))
