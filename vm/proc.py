"""Child processes: short host tools run to completion, and long-lived children (qemu,
virtiofsd, SeaweedFS, benchmark peers) that must die with this process and never before.

Long-lived children get ``PR_SET_PDEATHSIG``. The kernel fires it when the *thread* that
forked the child exits, not the process: children forked from trio's worker threads were
killed whenever an idle worker retired (after about 10 s), which is how sandboxes died
between two commands. So every long-lived child is forked by one thread that lives as
long as the process (:func:`spawn`), and checks in the child that its parent is still the
process that asked for it (the signal is not sent for a parent that died before the
``prctl``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .errors import VMError

_PR_SET_PDEATHSIG = 1


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


class _Spawner:
    """The one thread that forks long-lived children; it never exits before the process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Looked up before any fork: the child only calls it.
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl

    def _loop(self) -> None:
        while True:
            self._requests.get()()

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="lanekit-spawner", daemon=True
                )
                self._thread.start()
        done = threading.Event()
        outcome: list[Any] = []
        parent = os.getpid()
        prctl = self._prctl
        user_preexec = kwargs.pop("preexec_fn", None)

        def preexec() -> None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # the launcher died before the prctl took hold
            if user_preexec is not None:
                user_preexec()

        def fork() -> None:
            try:
                outcome.append(subprocess.Popen(list(argv), preexec_fn=preexec, **kwargs))
            except BaseException as exc:
                outcome.append(exc)
            finally:
                done.set()

        self._requests.put(fork)
        done.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]


_spawner = _Spawner()


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child that dies (SIGKILL) when this process dies, even by kill -9, and
    lives as long as this process otherwise. Blocks briefly: call from a thread, or
    through :func:`open_child` in trio code."""
    return _spawner.popen(argv, **popen_kwargs)


class Child:
    """A long-lived child for trio code: waits through a pidfd, never blocks the loop."""

    def __init__(self, popen: subprocess.Popen[Any]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        self._watcher: trio.Event | None = None

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        return self.popen.poll()

    async def wait(self) -> int:
        """Until it exits; any number of tasks may wait (one watches the pidfd)."""
        if self._watcher is not None:
            await self._watcher.wait()
        else:
            self._watcher = trio.Event()
            try:
                while self.popen.poll() is None:
                    if self._pidfd is None:
                        await trio.sleep(0.05)
                    else:
                        await trio.lowlevel.wait_readable(self._pidfd)
                self._close()
            finally:
                watcher, self._watcher = self._watcher, None
                watcher.set()
        code = self.popen.poll()
        while code is None:  # the watching task was cancelled before the end
            await self.wait()
            code = self.popen.poll()
        return code

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's process group (it leads one: see :func:`open_child`)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def _close(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


async def open_child(argv: Sequence[str], **popen_kwargs: Any) -> Child:
    """:func:`spawn` for trio code; the child leads its own process group."""
    popen_kwargs.setdefault("start_new_session", True)
    popen = await trio.to_thread.run_sync(lambda: spawn(argv, **popen_kwargs))
    return Child(popen)
