"""Observers: collect activation / weight ranges for static scales. Registry by name."""

from quantscale.observers.aciq import ACIQObserver, aciq_alpha
from quantscale.observers.base import (
    OBSERVERS,
    EMAObserver,
    MinMaxObserver,
    Observer,
    get_observer,
    register_observer,
)
from quantscale.observers.kl import (
    KLObserver,
    MaxEntropyObserver,
    entropy_threshold_bin,
    kl_threshold_bin,
)
from quantscale.observers.mse import MSEObserver
from quantscale.observers.percentile import (
    PercentileMSEObserver,
    PercentileObserver,
    row_quantile,
)

__all__ = [
    "OBSERVERS",
    "ACIQObserver",
    "EMAObserver",
    "KLObserver",
    "MSEObserver",
    "MaxEntropyObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileMSEObserver",
    "PercentileObserver",
    "aciq_alpha",
    "entropy_threshold_bin",
    "get_observer",
    "kl_threshold_bin",
    "register_observer",
    "row_quantile",
]
