"""Weight algorithms behind one contract (`algorithms.base`): RTN, GPTQ, AWQ, AutoRound; and
the layer transforms that prepare a layer for them (smoothing).

Importing the package registers every weight algorithm: the modules are imported here by
name, so a broken one raises its own error.
"""

from quantscale.algorithms import autoround, awq, gptq, rtn
from quantscale.algorithms.base import ALGORITHMS, get_algorithm, register_algorithm

__all__ = ["ALGORITHMS", "autoround", "awq", "get_algorithm", "gptq", "register_algorithm", "rtn"]
