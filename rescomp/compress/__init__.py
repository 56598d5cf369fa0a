"""Compression techniques, one file each. A technique is `(model, cfg, ctx) -> (model, info)`: it works
on a copy of its input, never trains by itself, and returns what it did (DESIGN.md, habit 1).

Importing this package registers the spec transforms the techniques own (rescomp.models.TRANSFORMS),
so that build_model can rebuild what they made without importing them.
"""

from rescomp.compress import binarize, deep_compression, layer_drop, prune, separable  # noqa: F401  (they register their transforms)
