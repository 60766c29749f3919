"""The zygote itself (see :mod:`.zygote` for what it is and for its clients).

It never runs a thread (a fork copies only the forking thread: it checks before each one,
and ends at once if its warm-up started any) and ends by itself: ``IDLE`` seconds after
its last request, when a request comes with another fingerprint (it is replaced by one of
the client's kind), when its socket is no longer its own, or when asked. One runs per home
(a lock file holding its pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .zygote import (
    LOCK,
    MAX_REQUEST,
    SIGNALS,
    SOCKET,
    fingerprint,
    idle_seconds,
    lanes_dir,
    peer_uid,
    take_lock,
)

RECEIVE_TIMEOUT = 2.0
"""A client writes its whole request at once; one that dawdles is dropped."""
_PR_SET_NAME = 15


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m vm.lanes.zygote HOME READY_FD", file=sys.stderr)
        return 2
    if os.fork():  # the launcher exits at once: the zygote is nobody's child to reap
        os._exit(0)
    return _serve(Path(argv[0]), int(argv[1]))


def _warm() -> None:
    """Import and load now what every supervisor needs, so its forks need not."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS starts no threads
    from blockstore import objectstore

    from . import supervisor  # noqa: F401

    objectstore.warm_s3_client()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve(home: Path, ready_fd: int) -> int:
    lanes = lanes_dir(home)
    path = lanes / SOCKET
    lock = os.open(lanes / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    # A moment's holder (zygote.running) or an ending zygote lets go within the second.
    if not take_lock(lock, 1.0):
        os.close(ready_fd)  # EOF: the one that holds the lock answers
        os.close(lock)
        return 0
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # see zygote.running()
    _warm()
    if _threads() != 1:
        print(f"zygote {os.getpid()}: its warm-up started threads; it cannot fork safely",
              file=sys.stderr, flush=True)  # fmt: skip
        os.close(ready_fd)
        return 1
    own = fingerprint()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(16)
    inode = path.stat().st_ino
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    _log(f"zygote {os.getpid()} warm for {home}")

    def retire() -> None:
        """Let go of the socket before answering: the client's next try starts a zygote
        of its own kind instead of finding this one again."""
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                path.unlink()
        listener.close()

    idle = idle_seconds()
    last = time.monotonic()
    listener.settimeout(1.0)
    try:
        while time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                try:
                    if path.stat().st_ino != inode:
                        return 0  # another zygote's socket
                except FileNotFoundError:
                    return 0
                continue
            last = time.monotonic()
            with conn:
                if not _handle(conn, own, (listener.fileno(), lock, conn.fileno()), retire):
                    return 0
        return 0
    finally:
        retire()
        os.close(lock)


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request (a JSON object on a line) and the descriptors passed with it."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    conn.settimeout(RECEIVE_TIMEOUT)
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 2)
    try:
        while not data.endswith(b"\n"):
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            more = conn.recv(MAX_REQUEST)
            if not more or len(data) > MAX_REQUEST:
                raise ValueError("a request is one JSON line of at most 1 MiB")
            data += more
        request = json.loads(data)
        if not isinstance(request, dict):
            raise TypeError("a request is a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _handle(
    conn: socket.socket, own: str, own_fds: tuple[int, ...], retire: Callable[[], None]
) -> bool:
    """Answer one request; False: the zygote ends."""
    fds: list[int] = []
    try:
        if peer_uid(conn) != os.getuid():
            raise ValueError("requests come from this zygote's user only")
        request, fds = _receive(conn)
        if request.get("op") == "stop":
            retire()
            conn.sendall(b'{"stopped": true}\n')
            return False
        if not isinstance(request.get("fingerprint"), str):
            raise TypeError("a request carries the client's fingerprint")
        if request["fingerprint"] != own:
            retire()
            conn.sendall(b'{"stale": true}\n')
            return False
        if len(fds) != 2:
            raise ValueError("a start request passes the log and the ready pipe")
        if _hung_up(conn):
            return True  # it gave up waiting: it does not want this supervisor any more
        pid = _fork(request, fds, own_fds)
        _log(f"forked supervisor {pid}: {' '.join(map(str, request['args']))}")
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return True
    except Exception as exc:  # a bad request: refused, the zygote goes on
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)
    return bool(poller.poll(0))


def _fork(request: dict[str, Any], fds: list[int], own_fds: tuple[int, ...]) -> int:
    """Fork the supervisor out of this process tree; its pid."""
    if _threads() != 1:
        raise OSError("the zygote runs threads and cannot fork safely")
    args = [str(a) for a in request["args"]]
    env = {str(k): str(v) for k, v in dict(request["env"]).items()}
    setup = _Setup(request)
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid:
                os.write(write_end, str(pid).encode())
            else:
                os.close(write_end)
                os.setsid()  # leads its session and group, as start_new_session makes it
                _become_supervisor(args, env, setup, fds, own_fds)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        os.waitpid(middle, 0)
        pid_text = os.read(read_end, 32)
    finally:
        os.close(read_end)
    if not pid_text:
        raise OSError("the supervisor could not be forked")
    return int(pid_text)


class _Setup:
    """What the child takes from its client besides the environment, checked before the
    fork so that a bad request is refused, not a dead child."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.cwd = str(request["cwd"])
        self.umask = int(request["umask"])
        self.rlimits = {int(k): (int(v[0]), int(v[1])) for k, v in request["rlimits"].items()}
        self.ignored = {int(s) for s in request["ignored"]}
        for which, (_, hard) in self.rlimits.items():
            if os.geteuid() != 0 and _above(hard, resource.getrlimit(which)[1]):
                raise ValueError("the client's resource limits are above the zygote's")

    def apply(self) -> None:
        os.chdir(self.cwd)
        os.umask(self.umask)
        for which, limits in self.rlimits.items():
            resource.setrlimit(which, limits)
        for sig in SIGNALS:
            if sig in self.ignored:
                signal.signal(sig, signal.SIG_IGN)
            elif sig == signal.SIGINT:
                signal.signal(sig, signal.default_int_handler)
            else:
                signal.signal(sig, signal.SIG_DFL)


def _above(limit: int, than: int) -> bool:
    infinity = resource.RLIM_INFINITY
    return than != infinity and (limit == infinity or limit > than)


def _become_supervisor(
    args: list[str], env: dict[str, str], setup: _Setup, fds: list[int],
    own_fds: tuple[int, ...],
) -> None:  # fmt: skip
    """In the forked child: be ``python -m vm.lanes.supervisor ARGS``; never returns."""
    code = 1
    try:
        for fd in own_fds:  # the lock must not outlive the zygote in its supervisors
            os.close(fd)
        log_fd, ready_fd = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(env)
        time.tzset()
        tempfile.tempdir = None  # found again from this environment
        setup.apply()
        sys.argv = ["vm.lanes.supervisor", *args]
        _name_process(f"lane {args[0]}" if args else "lane")
        from .supervisor import main

        code = main([*args, "--ready-fd", str(ready_fd)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _name_process(name: str) -> None:
    """The name ps -o comm and top show (the command line stays the zygote's: changing it
    takes a capability a container may lack)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
