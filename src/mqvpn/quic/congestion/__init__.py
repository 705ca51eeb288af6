"""Congestion control: the controller interface and registry, NewReno, CUBIC, BBR, and the pacer."""

from .base import (
    CongestionController,
    available,
    create,
    initial_window,
    minimum_window,
    register,
)
from .bbr import Bbr
from .cubic import Cubic
from .newreno import NewReno
from .pacer import Pacer

__all__ = [
    "Bbr",
    "CongestionController",
    "Cubic",
    "NewReno",
    "Pacer",
    "available",
    "create",
    "initial_window",
    "minimum_window",
    "register",
]
