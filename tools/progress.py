"""Progress on stderr for long work (image builds, imports, exports, pushes, pulls): shown
only when stderr is a terminal and ``--quiet`` is not given, so scripts and logs get none.
tqdm draws the bars: small, dependency-free, and it computes rates and ETAs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

_quiet = [False]


def set_quiet(quiet: bool) -> None:
    _quiet[0] = quiet


def enabled() -> bool:
    return not _quiet[0] and sys.stderr.isatty()


def _width() -> dict[str, Any]:
    """Follow the terminal's size."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        columns = 0
    # A terminal whose encoding is not UTF-8 gets an ASCII bar (tqdm would otherwise fail
    # to encode its block characters and silently switch itself off).
    ascii_only = not (getattr(sys.stderr, "encoding", "") or "").lower().startswith("utf")
    # One that reports no size (0x0) gets 80x24: tqdm would draw nothing at 0 rows.
    size: dict[str, Any] = {"dynamic_ncols": True} if columns else {"ncols": 80, "nrows": 24}
    return {**size, "ascii": ascii_only}


def phase(text: str) -> None:
    """One line saying what starts now (a phase of a build, say)."""
    if enabled():
        print(f"lanekit: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def byte_bar(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A bar for a transfer; yields ``update(done, total)``, cheap when nothing is shown."""
    if not enabled():
        yield lambda done, total: None
        return
    from tqdm import tqdm  # 40 ms (importlib.metadata): only when a bar is drawn

    bar = tqdm(
        total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, leave=False, **_width(),
    )  # fmt: skip

    def update(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def count_bar(description: str, unit: str) -> Iterator[Callable[[int], None]]:
    """A counter without a known end (objects looked at, say)."""
    if not enabled():
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit=unit, file=sys.stderr, leave=False, **_width())
    try:
        yield lambda n: bar.update(n - bar.n)
    finally:
        bar.close()
