"""Int8 through PyTorch 2 export quantization (torchao's PT2E), lowered by Inductor (`quantize.backend: pt2e`).

Every torchao call lives here. The network is captured with torch.export (a dynamic batch
dimension), annotated by `X86InductorQuantizer` with its default config (uint8 activations per tensor,
int8 weights per output channel), calibrated on the
same training images as the other backends, and converted. This replaces torch.ao's deprecated FX
flow. The converted program is stored whole (torch.export.save bytes) in int8.pt, so it reloads
without recalibrating, and runs compiled by Inductor with weight freezing, which fuses the
quantize/dequantize patterns into oneDNN int8 kernels. Inductor compiles once per input shape on
first use; the timing's warm-up passes absorb that.

Activations get 8 bits where the CPU has VNNI and 7 where it has not (`quantize.reduce_range: auto`):
oneDNN's int8 convs on an AVX2 CPU without VNNI add u8 x s8 products in saturating int16 pairs, as
FBGEMM's do (rescomp.compress.quantize), and with torchao's default of 8 bits a conv's sums come out
wrong; measured on an AVX2-only AMD EPYC, an all-255 x all-127 1x1 conv over 64 channels gave half
the exact sum, and a QAT ResNet-8's int8 outputs were 7x further from its fake-quantized ones.

QAT (`method: qat`) captures the network in train mode, so its batch norms keep learning, and
torchao's prepare_qat_pt2e folds each conv-BN pair into a fake-quantized conv; the Trainer fine-tunes
it like any network (QatProgram switches train and eval the way torchao does for exported graphs),
and the result is converted and stored as the PTQ program is.

The capture is strict (through Dynamo), which records each node's source module in `source_fn_stack`;
X86InductorQuantizer finds convs and linears by it (torch's get_source_partitions). A non-strict
capture, torch.export's default, records none, and torch 2.11's get_source_partitions has no other way
to match a module type (later versions fall back to `nn_module_stack`): nothing was quantized, and
convert returned the fp32 network, stored and exported as int8. A network in which the quantizer finds
nothing is refused.
"""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace
from typing import Any, Iterable
from unittest import mock

import torch
import torch.nn as nn

from rescomp.compress.quantize import BACKENDS, Backend
from rescomp.config_sections import QuantizeConfig
from rescomp.errors import ConfigError
from rescomp.measure import InductorForward


def _api() -> Any:
    try:
        from torchao.quantization.pt2e import (FakeQuantizeBase, ObserverBase, move_exported_model_to_eval,
                                               move_exported_model_to_train)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as e:
        raise ConfigError(f"quantize.backend pt2e needs torchao ({e.name} is missing): pip install 'torchao==0.18.0'") from None
    return SimpleNamespace(prepare=prepare_pt2e, prepare_qat=prepare_qat_pt2e, convert=convert_pt2e,
                           to_train=move_exported_model_to_train, to_eval=move_exported_model_to_eval,
                           Quantizer=X86InductorQuantizer, config=get_default_x86_inductor_quantization_config,
                           Observer=ObserverBase, FakeQuantize=FakeQuantizeBase)


def describe(cfg: QuantizeConfig) -> dict[str, Any]:
    from rescomp.compress.quantize import reduce_range

    return {"method": cfg.method, "backend": "pt2e", "activation_bits": 7 if reduce_range(cfg) else 8,
            "quantizer": "X86InductorQuantizer", "activations": "uint8 per tensor", "weights": "int8 per channel",
            "lowering": "Inductor, freezing"}


class Pt2eForward(InductorForward):
    """A PT2E int8 program (its torch.export.save bytes in `model`), compiled by Inductor with freezing.
    `tensor_bytes` is what its tensors take (int8 weights, fp32 biases, scales and zero points): its
    size as the FX backends' state_dict bytes count it, without the serialized graph around it."""

    def __init__(self, program: nn.Module, blob: bytes, tensor_bytes: int) -> None:
        super().__init__(program, as_is=True)
        self.model, self.tensor_bytes = blob, tensor_bytes

    def train(self, mode: bool = True) -> "Pt2eForward":
        """An exported program has no train mode (torch.export refuses it); it always runs for inference."""
        self.training = mode
        return self


class QatProgram(nn.Module):
    """A captured network with fake quantization, fine-tuned by the Trainer: train() and eval() switch its
    batch norms (batch or running statistics) as torchao does for exported graphs, which refuse .train()."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> "QatProgram":
        api = _api()
        (api.to_train if mode else api.to_eval)(self.program)
        self.training = mode
        return self


def _annotated(model: nn.Module, cfg: QuantizeConfig, image_size: int, qat: bool) -> nn.Module:
    """A copy of `model` captured by torch.export (in train mode for QAT: batch norms that learn) and
    annotated with X86InductorQuantizer's observers (ptq) or fake quantization (qat)."""
    from rescomp.compress.quantize import reduce_range
    from rescomp.export import dynamic_batch

    api = _api()
    model = copy.deepcopy(model).cpu().train(qat).to(memory_format=torch.contiguous_format)
    example = (torch.zeros(2, 3, image_size, image_size),)
    try:  # strict: see the module's docstring
        captured = torch.export.export(model, example, dynamic_shapes=dynamic_batch(), strict=True).module()
    except Exception as e:
        raise ConfigError(f"torch.export cannot capture this model for PT2E ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); use backend x86 or onnxruntime") from None
    quantizer = api.Quantizer().set_global(api.config(is_qat=qat, reduce_range=reduce_range(cfg)))
    try:
        prepared = (api.prepare_qat if qat else api.prepare)(captured, quantizer)
    except Exception as e:  # torchao's annotation has patterns it cannot take (one module called twice, for one)
        raise ConfigError(f"torchao's X86InductorQuantizer cannot annotate this network ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); use backend x86 or onnxruntime") from None
    if not any(isinstance(m, (api.Observer, api.FakeQuantize)) for m in prepared.modules()):
        # nothing annotated: convert would return the fp32 network, stored and reported as int8
        raise ConfigError("torchao's X86InductorQuantizer found no conv or linear to quantize in this network; "
                          "use backend x86 or onnxruntime")
    return prepared


def _op(node: torch.fx.Node) -> str:
    """The op a graph node calls, without namespace or overload (aten.conv2d.default: conv2d); "" for a
    node that calls no torch op (a placeholder, operator.getitem)."""
    return str(node.target).split(".")[1] if isinstance(node.target, torch._ops.OpOverload) else ""


def _convert(prepared: nn.Module, qat: bool) -> nn.Module:
    """convert_pt2e, with its fold of QAT's fake-quantized conv-BN pairs run only where it can match.
    That pass runs wherever a batch norm is left in the graph, for four conv types (conv1d, conv2d and
    their transposes; each twice where CUDA is available), and captures 24 pattern graphs with
    torch.export for each: about 36 s on 2 cores on every call. Skipped, with the same converted graph:
      - a conv type the graph does not call, whose patterns (which call it) cannot match;
      - the whole pass for PTQ: every pattern holds conv_weight * (bn_weight / sqrt(running_var + eps)),
        which only prepare_qat_pt2e puts in a graph, and the BN-tracking increments the pass erases exist
        only in a train-mode capture (checked: the same graph, weights and outputs for the ResNet50V2 of
        test_resnet50v2_quantizes_through_pt2e, whose pre-activation BNs stay, 0.1 s instead of 36 s).
    For QAT on a network of conv2d layers (every network here), the same check on a fine-tuned ResNet-8:
    11 s instead of 39 s."""
    api = _api()
    import torchao.quantization.pt2e.qat_utils as qu
    import torchao.quantization.pt2e.quantize_pt2e as qp

    if not (hasattr(qp, "_fold_conv_bn_qat") and hasattr(qu, "_fold_conv_bn_qat_helper")):
        return api.convert(prepared)  # another torchao than 0.18: its own passes, at their own cost
    if not qat:
        with mock.patch.object(qp, "_fold_conv_bn_qat", lambda m: m):
            return api.convert(prepared)
    called = {_op(n) for n in prepared.graph.nodes}
    fold = qu._fold_conv_bn_qat_helper

    def only_present(m: nn.Module, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> nn.Module:
        return fold(m, conv_fn, example_inputs, is_cuda=is_cuda) if conv_fn.__name__ in called else m

    with mock.patch.object(qu, "_fold_conv_bn_qat_helper", only_present):
        return api.convert(prepared)


def _converted(prepared: nn.Module, image_size: int, qat: bool) -> tuple[Pt2eForward, bytes]:
    """Convert, drop what the int8 graph no longer reads, and store the program (torch.export.save).
    convert_pt2e folds each weight's quantization into an int8 constant but keeps the fp32 weight as an
    unused parameter, which torch.export would save too (ResNet-56: 5.26 MB instead of 1.80 MB); and
    each node's record of the source line and module it came from is dropped (depthwise ResNet-56:
    1.76 MB instead of 1.08 MB, of which 0.31 MB are its tensors)."""
    from rescomp.export import dynamic_batch

    converted = _convert(prepared, qat)
    converted.graph.eliminate_dead_code()
    read = {n.target for n in converted.graph.nodes if n.op == "get_attr"}
    for name, _ in [*converted.named_parameters(), *converted.named_buffers()]:
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(converted.get_submodule(owner), attr)
    converted.recompile()
    buf = io.BytesIO()
    example = (torch.zeros(2, 3, image_size, image_size),)
    program = torch.export.export(converted, example, dynamic_shapes=dynamic_batch())
    for node in program.graph.nodes:  # where each node came from: source paths of this machine, and 40 % of the file
        for key in ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn"):
            node.meta.pop(key, None)
    torch.export.save(program, buf)
    blob = buf.getvalue()
    return load(blob), blob


def ptq(model: nn.Module, cfg: QuantizeConfig, calibration: Iterable[torch.Tensor],
        image_size: int) -> tuple[nn.Module, dict[str, Any], bytes]:
    """(the int8 network compiled by Inductor, what was done, the converted program's bytes)."""
    prepared = _annotated(model, cfg, image_size, qat=False)
    n = 0
    with torch.no_grad():
        for x in calibration:
            prepared(x.cpu().contiguous())
            n += len(x)
    qmodel, blob = _converted(prepared, image_size, qat=False)
    return qmodel, {**describe(cfg), "calibration_images": n}, blob


def prepare_qat(model: nn.Module, cfg: QuantizeConfig, image_size: int) -> QatProgram:
    """A copy of `model` with fake quantization, in train mode, for the Trainer to fine-tune."""
    return QatProgram(_annotated(model, cfg, image_size, qat=True)).train()


def convert_qat(prepared: QatProgram, image_size: int) -> tuple[Pt2eForward, bytes]:
    """The int8 network of a fine-tuned QatProgram (batch norms folded with their running statistics)."""
    prepared.eval()
    return _converted(prepared.program, image_size, qat=True)


def load(blob: bytes) -> Pt2eForward:
    _api()  # registers torchao's quantized_decomposed ops, which the program calls
    from rescomp.measure import tensor_bytes

    program = torch.export.load(io.BytesIO(blob))
    tensors = {k: t for k, t in [*program.state_dict.items(), *program.constants.items()] if isinstance(t, torch.Tensor)}
    return Pt2eForward(program.module(), blob, tensor_bytes(tensors))


WEIGHTED = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear")


def layers(q: nn.Module) -> tuple[int, int]:
    """(conv and linear calls whose weight is dequantized from int8, all of them) in a PT2E program: a
    converted program computes a layer in int8 where Inductor fuses dequantize -> conv -> quantize."""
    weighted = [n for n in q.net.graph.nodes if _op(n) in WEIGHTED]
    return sum(isinstance(n.args[1], torch.fx.Node) and _op(n.args[1]).startswith("dequantize") for n in weighted), len(weighted)


BACKENDS.register("pt2e")(Backend(
    "PT2E", ptq=ptq, describe=describe, load=lambda payload: load(payload["pt2"]), layers=layers, blob_key="pt2",
    prepare_qat=prepare_qat, convert_qat=convert_qat))
