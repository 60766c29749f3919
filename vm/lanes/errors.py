"""The lanes' exceptions and their name rule: what a client of a running lane needs
without loading any of the store's code."""

from __future__ import annotations

from blockstore.layout import check_name

from ..errors import VMError

MAX_NAME = 100


class LaneError(VMError):
    """A lane is missing, exists already, is (not) running, or cannot be reached."""


class LaneNotFound(LaneError):
    """No lane of that name in the store."""


class LaneBusy(LaneError):
    """Another host holds the lane (it won a start at the same moment, or runs it)."""


def check_lane_name(name: str) -> str:
    check_name(name, "lane name")
    if len(name) > MAX_NAME:
        raise LaneError(f"lane name {name!r} is longer than {MAX_NAME} characters")
    return name
