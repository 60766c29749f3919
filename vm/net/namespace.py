"""Network namespaces: the sandbox's own, and the one upstream connections are made from.

The sandbox's namespace is made by a thread that unshares into it and stays there (so
sockets it makes, and tools it runs, are in it), and is held by a file descriptor of this
process; qemu joins it when it starts. It has no name in ``/run/netns``: once this process
and qemu are gone (kill -9 included: qemu dies with us), nothing holds it and the kernel
frees it with its nftables rules.

Python 3.11 has no ``os.setns``; ``setns`` and ``unshare`` come from libc through ctypes.
They act on the calling thread only, which is why each namespace gets a thread of its own.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .errors import NetworkSetupError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _unshare() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


class NamespaceThread:
    """A thread that lives in one network namespace and runs calls there."""

    def __init__(self, enter: Callable[[], None], name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                enter()
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            while (call := self._calls.get()) is not None:
                call()

        self._thread = threading.Thread(target=main, name=name, daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread, blocking the caller until it is done."""
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, fn(*args)))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        if not self._thread.is_alive():
            raise NetworkSetupError("the namespace thread has exited")
        self._calls.put(run)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(self.call, fn, *args)

    def close(self) -> None:
        self._calls.put(None)


class SandboxNamespace:
    """A new, empty network namespace for one sandbox; :meth:`close` lets it go."""

    def __init__(self) -> None:
        holder: list[int] = []

        def enter() -> None:
            _unshare()
            holder.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))

        try:
            self.thread = NamespaceThread(enter, "lanekit-netns")
        except OSError as exc:
            raise NetworkSetupError(
                f"cannot make a network namespace for the sandbox ({exc}); networking "
                "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            ) from None
        self.fd = holder[0]

    @property
    def inode(self) -> int:
        return os.fstat(self.fd).st_ino

    def join_hook(self) -> Callable[[], None]:
        """For a child's ``preexec_fn``: start the child in this namespace."""
        fd = self.fd
        return lambda: setns(fd)

    async def run_tool(self, argv: list[str], stdin: str | None = None) -> str:
        """Run a short tool inside the namespace (forked from its thread, so it starts
        there); its failure is a :class:`NetworkSetupError` with its message."""

        def run() -> str:
            try:
                proc = subprocess.run(
                    argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NetworkSetupError(f"{argv[0]} failed: {exc}") from None
            if proc.returncode != 0:
                detail = (proc.stderr.strip() or proc.stdout.strip())[-800:]
                raise NetworkSetupError(f"{' '.join(argv)} failed: {detail}")
            return proc.stdout

        return await self.thread.run(run)

    async def socket(
        self, kind: int, bind: tuple[str, int] | None = None, mark: int | None = None
    ) -> trio.socket.SocketType:
        """A socket of this namespace (bound, if ``bind``), for trio."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
            try:
                if mark is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                if bind is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(bind)
            except BaseException:
                sock.close()
                raise
            return sock

        return trio.socket.from_stdlib_socket(await self.thread.run(make))

    def close(self) -> None:
        self.thread.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1  # a second close must not close a reused number
            os.close(fd)


class Egress:
    """Where upstream connections and DNS queries are made from: this process's namespace,
    or the one at ``netns_path`` (a thread that setns'es there makes the sockets)."""

    def __init__(self, netns_path: str | None) -> None:
        self.netns_path = netns_path
        self._thread: NamespaceThread | None = None
        if netns_path is not None:

            def enter() -> None:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd)
                finally:
                    os.close(fd)

            try:
                self._thread = NamespaceThread(enter, "lanekit-egress")
            except OSError as exc:
                raise NetworkSetupError(
                    f"egress network namespace {netns_path}: {exc.strerror or exc}"
                ) from None

    async def socket(self, kind: int) -> trio.socket.SocketType:
        if self._thread is None:
            return trio.socket.socket(socket.AF_INET, kind)

        def make() -> socket.socket:
            return socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)

        return trio.socket.from_stdlib_socket(await self._thread.run(make))

    async def connect(self, ip: str, port: int, timeout: float) -> trio.SocketStream:
        """A TCP connection to ``ip:port``; OSError (or TooSlowError) if it fails."""
        sock = await self.socket(socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with trio.fail_after(timeout):
                await sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
