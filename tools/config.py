"""Command-line settings and helpers the command modules share: the state directory
(defined by ``vm.state``), sizes, exit codes and the user-facing error."""

from __future__ import annotations

import math

from vm.state import lanekit_home

__all__ = [
    "EXIT_BUSY",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "CLIError",
    "lanekit_home",
    "parse_size",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: try again once the holder is gone


class CLIError(Exception):
    """A user-facing error with an exit code (raised by any command module; mapped in
    ``tools.cli.main``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


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
    if not math.isfinite(value) or value <= 0 or value != int(value):
        raise ValueError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)
