"""Weight algorithms behind one contract (`algorithms.base`): RTN, GPTQ, AWQ, AutoRound; the
layer transforms that prepare a layer for them (smoothing); and the learned static activation
scales run after a layer is calibrated (`lsq`, `Recipe.learn_scales`).

Importing the package registers every weight algorithm: the modules are imported here by
name, so a broken one raises its own error.
"""

from quantscale.algorithms import autoround, awq, gptq, rtn
from quantscale.algorithms.base import ALGORITHMS, get_algorithm, register_algorithm

__all__ = ["ALGORITHMS", "autoround", "awq", "get_algorithm", "gptq", "register_algorithm", "rtn"]
