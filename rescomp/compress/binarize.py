"""SEP-Net pattern binarization (Zhe Li, sep-net-slides.txt, "Pattern Binarization").

"k x k (k > 1) filters serve as spatial pattern extraction; 1 x 1 filters serve as data transformation":
every k x k conv filter is replaced by its sign pattern times one scale per filter (the slides'
GoogLeNet 3x3 example: 9 parameters of 4 bytes become 9 bits), while 1 x 1 convs and linear layers keep
their weights, or (SEP-Net-BQ) are linearly quantized to 8 bits. The scale is the filter's mean |w|,
the least-squares scale of a sign pattern (Rastegari et al. 2016). Training follows BinaryConnect
(Courbariaux et al. 2015): the full-precision weights are kept and updated, the forward pass uses their
binarized form, and the gradient passes straight through (the identity). `freeze_patterns` instead
keeps each binarized filter fixed during fine-tuning, as the slides' "Implementation" says, so only the
other layers learn. A sign of 0 is +1.

Both are torch parametrizations of the layer's weight (torch.nn.utils.parametrize), so the spec key
`binarized` rebuilds them and a checkpoint loads; the forward weight is exactly scale x sign (a custom
autograd function passes the gradient through without adding w - w to it), so the stored file
(rescomp.compress.codec.encode_binary) decodes to the same outputs (codec.network).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from rescomp.models import register_transform


class _Straight(torch.autograd.Function):
    """Forward: the quantized weight `q`; backward: the gradient to the full-precision weight unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sign_pattern(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs as +-1, one scale per output filter: its mean |w|)."""
    scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype), scale


class _Coded(nn.Module):
    """A weight parametrization: forward codes x scale, gradient straight through to the weight."""
    codes: Any  # w -> (codes, scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            codes, scale = self.codes(w)
            q = codes * scale
        return _Straight.apply(w, q)


class SignPattern(_Coded):
    codes = staticmethod(sign_pattern)


def linear8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in -127..127, the layer's scale max|w| / 127): symmetric linear 8-bit quantization."""
    scale = w.abs().max().clamp(min=torch.finfo(w.dtype).tiny) / 127
    return torch.round(w / scale).clamp(-127, 127), scale


class Linear8(_Coded):
    codes = staticmethod(linear8)


def is_pattern(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1


def targets(model: nn.Module, quantize_others: bool) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, layer, 'sign' or 'int8') of every layer binarization changes."""
    for n, m in model.named_modules():
        if is_pattern(m):
            yield n, m, "sign"
        elif quantize_others and isinstance(m, (nn.Conv2d, nn.Linear)):
            yield n, m, "int8"


def binarize(model: nn.Module, quantize_others: bool = False, freeze_patterns: bool = False) -> dict[str, str]:
    """Binarize `model` in place; returns {layer: 'sign' | 'int8'}, the spec's `binarized.layers`."""
    done = {}
    for n, m, kind in list(targets(model, quantize_others)):
        parametrize.register_parametrization(m, "weight", SignPattern() if kind == "sign" else Linear8())
        if freeze_patterns and kind == "sign":
            m.parametrizations.weight.original.requires_grad_(False)
        done[n] = kind
    return done


@register_transform("binarized", order=42)
def _binarized(model: nn.Module, value: dict[str, Any]) -> nn.Module:
    modules = dict(model.named_modules())
    for n, kind in value["layers"].items():
        m = modules[n]
        parametrize.register_parametrization(m, "weight", SignPattern() if kind == "sign" else Linear8())
        if value.get("freeze_patterns") and kind == "sign":
            m.parametrizations.weight.original.requires_grad_(False)
    return model


def stored(model: nn.Module) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]], dict[str, Any]]:
    """What the binarized network stores: {layer.weight: (signs, scales)}, {layer.weight: (int8 codes,
    scale)}, and every other tensor, as numpy arrays."""
    binary, int8, own = {}, {}, set()
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            w = m.parametrizations.weight.original.detach().cpu()
            kind = type(m.parametrizations.weight[0])
            if kind is SignPattern:
                signs, scale = sign_pattern(w)
                binary[_key(n, "weight")] = ((signs > 0).numpy(), scale.reshape(-1).numpy())
            else:
                codes, scale = linear8(w)
                int8[_key(n, "weight")] = (codes.to(torch.int8).numpy(), scale.reshape(1).numpy())
            own.add(_key(n, "parametrizations.weight.original"))
    others = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k not in own}
    return binary, int8, others


def _key(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor
