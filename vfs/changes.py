"""Changes a filesystem makes behind the kernel's back, and the observers told of them.

The kernel caches what a mount showed it (names, attributes, file pages). A change that
does not come through the mount — host code editing a mounted :class:`~vfs.MemoryFS`
through its path API — must reach whoever serves the filesystem, so that it drops those
caches: the FUSE adapter subscribes to its filesystem (through wrappers and hubs) and
invalidates the kernel's inodes and entries. Each observer is registered from a trio loop
(the one serving the mount); that loop is also where plain threads are sent to make
changes (:class:`~vfs.paths.BlockingPaths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Hashable, Sequence

import trio


@dataclasses.dataclass(frozen=True)
class NodeChanged:
    """The data or attributes of node ``key`` changed."""

    key: Hashable


@dataclasses.dataclass(frozen=True)
class EntryChanged:
    """``name`` in directory ``parent`` appeared, went away or now names another node."""

    parent: Hashable
    name: bytes


Change = NodeChanged | EntryChanged
Observer = Callable[[Sequence[Change]], Awaitable[None]]


class Observers:
    """The observers of one filesystem, each with the trio loop it was registered from."""

    def __init__(self) -> None:
        self._entries: list[tuple[Observer, trio.lowlevel.TrioToken | None]] = []

    def add(self, observer: Observer) -> Callable[[], None]:
        """Register ``observer``; returns the function that unregisters it."""
        try:
            token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
        entry = (observer, token)
        self._entries.append(entry)

        def remove() -> None:
            if entry in self._entries:
                self._entries.remove(entry)

        return remove

    @property
    def loop(self) -> trio.lowlevel.TrioToken | None:
        """The loop of the first observer registered from one: the loop serving the mount."""
        return next((token for _, token in self._entries if token is not None), None)

    async def notify(self, changes: Sequence[Change]) -> None:
        """Tell every observer; returns once each has acted on the changes."""
        for observer, _ in list(self._entries):
            await observer(changes)
