"""Lanes: named durable sandboxes that live in an object store, run detached under a
supervisor process, and start on any host that reaches their store."""

from .definition import LaneDefinition, LaneError, LaneMount, LaneVolume
from .lane import Lane, LaneBusy, LaneStatus

__all__ = [
    "Lane",
    "LaneBusy",
    "LaneDefinition",
    "LaneError",
    "LaneMount",
    "LaneStatus",
    "LaneVolume",
]
