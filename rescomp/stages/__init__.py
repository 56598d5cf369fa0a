"""The stages, one file per technique; importing this package registers each in rescomp.runner.STAGES.

train starts a chain; prune, layer_drop, magnitude_prune, weight_share, binarize and quantize take the
network the stage before them left.
A new technique is a new file here that registers a `runner.Stage` and is imported below.
"""

from rescomp.stages import binarize, deep_compression, layer_drop, prune, quantize, train  # noqa: F401
