"""Accept loops that nothing a peer does can end: a guest that opens connections until
this process runs out of descriptors, or one whose connection breaks mid-accept, pauses
accepting for a moment instead of tearing the sandbox's network down; one connection's
handler failing (a fault of ours met by strange input) ends that connection only."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

log = logging.getLogger(__name__)

ACCEPT_PAUSE = 0.1
"""Seconds to wait after an accept failed for want of resources (they free as others end)."""
_TRANSIENT = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO)
)

T = TypeVar("T", covariant=True)


class Acceptor(Protocol[T]):
    async def accept(self) -> T: ...


async def accept(listener: Acceptor[T]) -> T:
    """The next connection, waiting out transient failures (logged, never raised)."""
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                raise
            log.warning("accept failed (%s): pausing %g s", exc.strerror, ACCEPT_PAUSE)
            await trio.sleep(ACCEPT_PAUSE)


async def guarded(
    what: str, handler: Callable[..., Awaitable[None]], *args: Any,
    on_failure: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Run one connection's ``handler``; an exception ends that connection only."""
    try:
        await handler(*args)
    except Exception:
        log.exception("%s dropped by an internal error; the others go on", what)
        if on_failure is not None:
            on_failure()
