"""Command-line settings and helpers the command modules share: the state directory
(defined by ``vm.state``), sizes, and running a service until a signal."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vm.state import lanekit_home

__all__ = ["lanekit_home", "parse_size", "serve_until_signalled"]


async def serve_until_signalled(
    start: Callable[..., Awaitable[None]], ready: Callable[[Any], None]
) -> None:
    """Run ``start(task_status=...)`` until SIGTERM or SIGINT, or until it ends on its own
    (a mount taken away from outside); ``ready`` gets what it reports once started."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def service(task_status: trio.TaskStatus[Any]) -> None:
                await start(task_status=task_status)
                nursery.cancel_scope.cancel()

            ready(await nursery.start(service))
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def parse_size(text: str) -> int:
    """'512', '64K', '10M', '2G', '1T' (binary units) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in units and t[-1:] else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = float(number) * units[suffix]
    except ValueError:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional K, M, G or T"
        ) from None
    if value <= 0 or value != int(value):
        raise ValueError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)
