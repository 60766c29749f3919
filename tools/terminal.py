"""The host's terminal and standard streams for ``lanekit vm run``: raw mode for a PTY
session (always restored), and stdin and stdout moved without blocking the trio loop
(the root disk's NBD server runs on the same loop)."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator

import trio


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Raw mode on ``fd`` if it is a terminal (yields whether it is), restored on every
    way out, an exception included."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, or 24x80."""
    try:
        size = os.get_terminal_size(fd)
        return size.lines, size.columns
    except OSError:
        return 24, 80


async def write_all(fd: int, data: bytes) -> None:
    """Write in a worker thread: a slow reader of our stdout must not stall the loop."""

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    await trio.to_thread.run_sync(write)


async def read_some(fd: int, size: int = 1 << 16) -> bytes:
    """One read of stdin in a worker thread (abandoned, not waited for, on cancellation:
    a read of a terminal cannot be interrupted)."""
    return await trio.to_thread.run_sync(os.read, fd, size, abandon_on_cancel=True)


def stdin_fd() -> int:
    return sys.stdin.fileno()
