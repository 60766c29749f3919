"""Kernel plumbing for tests (loop devices, mounts), always torn down, even on failure."""

from __future__ import annotations

import contextlib
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def sh(*argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


@contextlib.contextmanager
def loop_device(path: Path, *, direct_io: bool = False) -> Iterator[str]:
    args = ["losetup", "-f", "--show"]
    if direct_io:
        args.append("--direct-io=on")
    dev = sh(*args, str(path)).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(20):
            if sh("losetup", "-d", dev, check=False).returncode == 0:
                break
            time.sleep(0.25)


@contextlib.contextmanager
def mounted(dev: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    argv = ["mount"]
    if options:
        argv += ["-o", ",".join(options)]
    sh(*argv, dev, str(where))
    try:
        yield where
    finally:
        if sh("umount", str(where), check=False).returncode != 0:
            sh("umount", "-l", str(where), check=False)


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def readable(source: int | IO[bytes], timeout: float) -> bool:
    """Whether ``source`` has input within ``timeout`` seconds. poll, not select: a pytest
    worker may hold more than 1,024 descriptors, which select() refuses."""
    poller = select.poll()
    poller.register(source, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(timeout * 1000))
