"""Deep Compression (Han et al. 2015, 2016): magnitude pruning with masks, and trained weight sharing.

survey-cnn-compression.txt ("Putting it all together") and sep-net-slides.txt ("Weight Pruning"):
- Magnitude pruning: the connections whose |w| is smallest are set to zero, per layer (each layer
  keeps the same share), globally (one threshold over every layer), or as Han et al. 2015 do (`std`:
  a layer's threshold is one quality parameter times the std of its weights; the quality parameter is
  the one that reaches the step's share of all coded weights), iteratively with retraining
  between steps. Kept as a mask (torch.nn.utils.prune: the layer computes weight_orig * weight_mask),
  so a pruned weight stays exactly zero through fine-tuning; the spec key `masked` lists the layers,
  so a masked network rebuilds from its checkpoint.
- Weight sharing: per layer, k-means on the kept weights with linear initialisation (centroids evenly
  spaced between the smallest and largest weight: Han et al. found it best, because it keeps the rare
  large weights), 2**bits codes per layer (8 bits for conv layers, 5 for fully connected: 256 and 32),
  of which code 0 is the exact zero of the pruned weights and the other 2**bits - 1 are centroids. The
  layer then computes weight = [0, centroids][index], so in fine-tuning each centroid's gradient is the
  sum of its members' gradients ("the loss with respect to the centroid ... is simply given by the
  additive loss of the weights that belong to it"). The spec key `shared` lists each layer's code width.
Storage as the papers count it is rescomp.compress.codec.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from rescomp.models import register_transform

CODED = (nn.Conv2d, nn.Linear)  # the layers whose weights are pruned, shared and coded


def coded_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, CODED))


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with (masked, or shared, or plain)."""
    if hasattr(module, "weight_orig"):
        return module.weight_orig * module.weight_mask
    if hasattr(module, "centroids"):
        return shared_weight(module)
    return module.weight


def magnitude_masks(model: nn.Module, share: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero `share` of every coded layer's weights (scope `layer`), or of all of
    them together under one threshold (`global`), or under one threshold of |w| / the layer's std
    (`std`: Han et al. 2015's quality parameter times each layer's standard deviation, so layers of
    small weights are not emptied), smallest first. Weights already zero count among
    the pruned, so iterative steps reach `share` of the original weights in all."""
    signed = {n: weight_of(m).detach() for n, m in coded_layers(model)}
    weights = {n: w.abs() for n, w in signed.items()}
    if scope == "std":  # Han et al. 2015: |w| < q x the layer's std, one quality parameter q for every layer
        weights = {n: weights[n] / _kept_std(w) for n, w in signed.items()}
    groups = [weights] if scope in ("global", "std") else [{n: w} for n, w in weights.items()]
    masks = {}
    for group in groups:
        flat = torch.cat([w.reshape(-1) for w in group.values()])
        keep = torch.ones_like(flat, dtype=torch.bool)
        cut = int(round(share * flat.numel()))
        if cut:
            keep[flat.argsort(stable=True)[:cut]] = False  # ties broken by position, so exactly `cut`
        at = 0
        for n, w in group.items():
            masks[n] = keep[at:at + w.numel()].reshape(w.shape)
            at += w.numel()
    return masks


def _kept_std(w: torch.Tensor) -> torch.Tensor:
    """The population std of a layer's kept (nonzero) weights; a layer with one or none left gets 1."""
    kept = w[w != 0].double()
    std = kept.std(unbiased=False) if kept.numel() > 1 else kept.new_ones(())
    return (std if std > 0 else std.new_ones(())).to(w.dtype)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Mask every coded layer named in `masks` (replacing an earlier mask of that layer)."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        m = modules[name]
        if hasattr(m, "weight_orig"):
            torch_prune.remove(m, "weight")
        torch_prune.custom_from_mask(m, "weight", keep.to(m.weight.device))
    return model


def bake(model: nn.Module) -> nn.Module:
    """Make every mask permanent: plain layers whose pruned weights are exact zeros."""
    for _, m in coded_layers(model):
        if hasattr(m, "weight_orig"):
            torch_prune.remove(m, "weight")
    return model


@register_transform("masked", order=40)
def _masked(model: nn.Module, names: list[str]) -> nn.Module:
    """A masked network's structure (weight_orig, weight_mask), so its checkpoint loads."""
    modules = dict(model.named_modules())
    for n in names:
        torch_prune.identity(modules[n], "weight")
    return model


# -- weight sharing ----------------------------------------------------------------------------------

def linear_kmeans(values: torch.Tensor, k: int, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of `values` with k centroids initialised evenly between their min and max (Han et al.
    2016, section 3.2); returns (centroids, the index of each value's centroid). A centroid that loses all
    its members keeps its place."""
    lo, hi = values.min(), values.max()
    centroids = torch.linspace(float(lo), float(hi), k, dtype=values.dtype, device=values.device) if k > 1 else values.mean().reshape(1)
    for _ in range(iterations):
        index = _nearest(values, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, index, values)
        counts = torch.zeros_like(centroids).index_add_(0, index, torch.ones_like(values))
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids, _nearest(values, centroids)


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each value (centroids ascending), by binary search."""
    order = centroids.argsort()
    c = centroids[order]
    mid = (c[1:] + c[:-1]) / 2
    return order[torch.bucketize(values, mid)]


def shared_weight(module: nn.Module) -> torch.Tensor:
    book = torch.cat([module.centroids.new_zeros(1), module.centroids])
    return book[module.weight_index]


def _use_shared(module: nn.Module, *_: Any) -> None:
    module.weight = shared_weight(module)


def share(module: nn.Module, bits: int, iterations: int = 30) -> None:
    """Replace the layer's weight by `bits`-bit shared codes: code 0 the exact zero, 2**bits - 1 centroids
    from linear k-means of its nonzero weights."""
    w = weight_of(module).detach()
    if hasattr(module, "weight_orig"):
        torch_prune.remove(module, "weight")
    k = (1 << bits) - 1
    nonzero = w != 0
    centroids, index = linear_kmeans(w[nonzero].float(), k, iterations) if nonzero.any() else (w.new_zeros(k), None)
    full = torch.zeros(w.shape, dtype=torch.long, device=w.device)
    if index is not None:
        full[nonzero] = index + 1
    _shared_structure(module, k, w.shape)
    with torch.no_grad():
        module.centroids.copy_(centroids.to(w.dtype))
        module.weight_index.copy_(full)
    _use_shared(module)


def _shared_structure(module: nn.Module, k: int, shape: torch.Size) -> None:
    dev, dtype = module.weight.device, module.weight.dtype
    del module._parameters["weight"]
    module.register_parameter("centroids", nn.Parameter(torch.zeros(k, device=dev, dtype=dtype)))
    module.register_buffer("weight_index", torch.zeros(shape, dtype=torch.long, device=dev))
    module.register_forward_pre_hook(_use_shared)


@register_transform("shared", order=41)
def _shared(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    """A weight-shared network's structure (centroids, weight_index), so its checkpoint loads."""
    modules = dict(model.named_modules())
    for n, b in bits.items():
        m = modules[n]
        shape = m.weight.shape
        _shared_structure(m, (1 << b) - 1, shape)
        _use_shared(m)
    return model


def bits_for(module: nn.Module, conv_bits: int, fc_bits: int) -> int:
    return fc_bits if isinstance(module, nn.Linear) else conv_bits


def kept_share(model: nn.Module) -> dict[str, float]:
    """Each coded layer's share of nonzero weights (Han et al. report it per layer)."""
    return {n: float((weight_of(m) != 0).float().mean()) for n, m in coded_layers(model)}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# -- storage -----------------------------------------------------------------------------------------

def encodings(model: nn.Module, gap_bits_conv: int = 8, gap_bits_fc: int = 5) -> dict[str, bytes]:
    """The network as each stage of Deep Compression stores it, as real files (rescomp.compress.codec):
    `dense` (every tensor as float32), `sparse` (coded layers as relative-index entries of float32), and
    for a weight-shared network also `shared` (entries of codebook indices, plus the codebooks) and
    `huffman` (both streams Huffman-coded). Every other tensor (biases, batch norms) is stored as it is."""
    from rescomp.compress import codec

    model = model.cpu()
    coded = dict(coded_layers(model))
    own = {f"{n}.{k}" for n in coded for k in ("weight", "weight_orig", "weight_mask", "centroids", "weight_index")}
    others = {k: as_numpy(v) for k, v in model.state_dict().items() if k not in own}
    weights = {f"{n}.weight": as_numpy(weight_of(m)) for n, m in coded.items()}
    gap = {f"{n}.weight": gap_bits_fc if isinstance(m, nn.Linear) else gap_bits_conv for n, m in coded.items()}
    out = {"dense": codec.encode_model({}, {**weights, **others}),
           "sparse": codec.encode_model({k: codec.Layer.sparse(w, gap[k]) for k, w in weights.items()}, others)}
    if all(hasattr(m, "centroids") for m in coded.values()):
        shared = {f"{n}.weight": codec.Layer.shared(as_numpy(m.weight_index), np.concatenate([[0.0], as_numpy(m.centroids)]),
                                                    gap[f"{n}.weight"], int(np.log2(len(m.centroids) + 1)))
                  for n, m in coded.items()}
        out["shared"] = codec.encode_model(shared, others)
        out["huffman"] = codec.encode_model(shared, others, huffman=True)
    return out

