"""One supervisor per lane per host: an flock on ``RUN/supervisor.lock``, held for the
supervisor's whole life.

A supervisor takes it before it writes anything into the run directory (its identity, its
sockets), so a second start of the same lane on this host learns it lost before it can
overwrite the winner's files. A client that finds a dead supervisor's leftovers removes
them only while it holds the lock itself, so it never removes a starting supervisor's.
The kernel drops the lock when its holder dies, kill -9 included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = "supervisor.lock"
TAKE_WAIT = 3.0
"""Seconds a supervisor retries: a client holds the lock for a moment while it cleans up."""


def _open(run: Path) -> int:
    return os.open(run / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take(run: Path, wait: float = TAKE_WAIT) -> int | None:
    """The supervisor's lock (an fd to keep open while it runs), or None if another
    supervisor of the lane holds it."""
    fd = _open(run)
    deadline = time.monotonic() + wait
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            return None
        time.sleep(0.02)
    return fd


@contextlib.contextmanager
def if_free(run: Path) -> Iterator[bool]:
    """Hold the lock for the ``with`` block if no supervisor holds it (yields True), else
    yield False at once."""
    try:
        fd = _open(run)
    except FileNotFoundError:  # no run directory: nothing runs, nothing to clean
        yield True
        return
    try:
        yield _try_lock(fd)
    finally:
        os.close(fd)
