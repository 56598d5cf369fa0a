"""rescomp: reproduce and extend CNN-compression papers on CIFAR.

Nothing happens at import time (DESIGN.md, habit 3): import the submodule you need.
"""

__version__ = "0.1.0"
