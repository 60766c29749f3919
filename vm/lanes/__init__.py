"""Lanes: named durable sandboxes that live in an object store, run detached under a
supervisor process, and start on any host that reaches their store."""

from typing import TYPE_CHECKING

from blockstore.lazy import lazy_exports

if TYPE_CHECKING:
    from .definition import LaneDefinition, LaneMount, LaneVolume
    from .errors import LaneBusy, LaneError
    from .lane import Lane, LaneStatus
    from .process import connect_running, running_env
else:  # a client of a running lane (``lane exec``) needs none of the store's code
    __getattr__ = lazy_exports(
        __name__,
        {
            ".definition": "LaneDefinition LaneMount LaneVolume",
            ".errors": "LaneBusy LaneError",
            ".lane": "Lane LaneStatus",
            ".process": "connect_running running_env",
        },
    )

__all__ = [
    "Lane",
    "LaneBusy",
    "LaneDefinition",
    "LaneError",
    "LaneMount",
    "LaneStatus",
    "LaneVolume",
    "connect_running",
    "running_env",
]
