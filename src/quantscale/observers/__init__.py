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
from quantscale.observers.kl import KLObserver, kl_threshold_bin
from quantscale.observers.mse import MSEObserver
from quantscale.observers.percentile import PercentileObserver, row_quantile

__all__ = [
    "OBSERVERS",
    "ACIQObserver",
    "EMAObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "aciq_alpha",
    "get_observer",
    "kl_threshold_bin",
    "register_observer",
    "row_quantile",
]
