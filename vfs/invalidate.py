"""Drop the kernel's caches of nodes and entries that changed behind a mount.

pyfuse3's ``invalidate_entry`` blocks until the requests related to that entry are
answered, so called from a request handler it deadlocks the mount; ``invalidate_inode``
blocks while dirty pages are written back. Both are therefore sent from one task of the
serving loop, each batch in a worker thread, while the loop goes on answering the kernel.
Whoever submits waits until its batch has reached the kernel: after that, a read through
the mount sees the change.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

log = logging.getLogger(__name__)

Invalidation = tuple[int, bytes | None]
"""``(inode, None)`` drops an inode's attributes and pages; ``(parent, name)`` an entry."""


def _send(work: list[Invalidation]) -> None:
    for inode, name in work:
        try:
            if name is None:
                pyfuse3.invalidate_inode(inode)
            else:
                pyfuse3.invalidate_entry(inode, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.warning("vfs: could not invalidate inode %d %r: %s", inode, name, exc)


class Invalidator:
    def __init__(self) -> None:
        self._pending: list[tuple[list[Invalidation], trio.Event]] = []
        self._wakeup = trio.Event()
        self._closed = False

    async def submit(self, work: list[Invalidation]) -> None:
        """Queue ``work``; returns once the kernel has it (or the mount is gone)."""
        if not work or self._closed:
            return
        done = trio.Event()
        self._pending.append((work, done))
        self._wakeup.set()
        await done.wait()

    async def run(self) -> None:
        """Send queued invalidations until cancelled; whoever waits is released at the end.
        A batch already in a worker thread is finished first (the mount must go on
        answering requests until then)."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._pending = self._pending, []
                try:
                    await trio.to_thread.run_sync(_send, [w for work, _ in batch for w in work])
                finally:
                    for _, done in batch:
                        done.set()
        finally:
            self._closed = True
            for _, done in self._pending:
                done.set()
            self._pending = []
