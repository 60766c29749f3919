"""Running the host tools the builder and kernel cache rely on, with errors that say what failed."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

from .errors import VMError


def run_tool(
    argv: Sequence[str],
    what: str,
    *,
    error: type[VMError] = VMError,
    timeout: float = 1800,
    **kwargs: Any,
) -> str:
    """stdout of ``argv``; raises ``error`` naming ``what`` with the tool's own message."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise error(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout
