"""A warm supervisor: ``python -m vm.lanes.zygote HOME`` imports what a lane's supervisor
needs once (trio, the block store, the launcher, boto3 and its S3 model: more than half a
second, most of a resume's start) and forks a supervisor for every lane start on this host
that asks it through ``HOME/lanes/zygote.sock``.

A forked supervisor is the program ``python -m vm.lanes.supervisor`` would be: its own
session, outside the zygote's process tree (forked twice), with the client's environment,
working directory and umask, stdout and stderr on the log the client passed, the client's
ready pipe for its answer. Only its command line (what ps shows) is the zygote's.

The zygote never starts a thread (a fork copies only the forking thread) and ends by
itself: ``IDLE`` seconds after its last request, when a request comes from other code than
its own (the client's :func:`code_fingerprint` differs: lanekit was upgraded, or another
checkout shares the home), or when its socket is no longer its own. One runs per home (a
lock file); ``stop(home)`` ends it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IDLE = 600.0
"""Seconds without a request after which the zygote ends."""
IDLE_ENV = "LANEKIT_ZYGOTE_IDLE"
"""Overrides IDLE (seconds); ``0`` disables the zygote: every start spawns a supervisor."""
SOCKET = "zygote.sock"
LOCK = "zygote.lock"
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 10.0
_ROOTS = ("blockstore", "vm", "vfs", "tools")
_PR_SET_NAME = 15


class ZygoteUnavailable(Exception):
    """No zygote took the request: start the supervisor directly."""


def idle_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(IDLE_ENV, IDLE)))
    except ValueError:
        return IDLE


def code_fingerprint() -> str:
    """The code a process of this interpreter would run: the interpreter, and the path,
    size and modification time of every Python file of lanekit's packages."""
    base = Path(__file__).resolve().parent.parent.parent
    digest = hashlib.sha256(f"{sys.executable}\0{sys.version}\0{base}".encode())
    for root in _ROOTS:
        for path in sorted((base / root).rglob("*.py")):
            with contextlib.suppress(OSError):
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _lanes(home: Path) -> Path:
    path = home / "lanes"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# ---------------------------------------------------------------- the client side


def fork_supervisor(
    home: Path, args: Sequence[str], env: dict[str, str], log_fd: int, ready_fd: int
) -> int:
    """Have this home's zygote fork a supervisor with ``args`` (``--ready-fd`` added) and
    ``env``, its output on ``log_fd`` and its answer on ``ready_fd``; its pid. Starts a
    zygote if none answers. ZygoteUnavailable: none takes it (disabled, or it failed)."""
    if idle_seconds() <= 0:
        raise ZygoteUnavailable("disabled")
    request = {
        "args": list(args),
        "env": env,
        "cwd": os.getcwd(),
        "umask": _umask(),
        "fingerprint": code_fingerprint(),
    }
    for _attempt in range(3):
        try:
            return _ask(home, request, log_fd, ready_fd)
        except _Stale:
            continue  # it has let go of its socket: the next attempt starts one of this code
        except (FileNotFoundError, ConnectionRefusedError):
            _start(home)
        except OSError as exc:  # a zygote ending as we asked
            raise ZygoteUnavailable(str(exc)) from None
    raise ZygoteUnavailable("no zygote answered")


class _Stale(Exception):
    pass


def _umask() -> int:
    """This process's umask, read without setting it (another thread may create files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise ZygoteUnavailable("no Umask in /proc/self/status")


def _ask(home: Path, request: dict[str, Any], log_fd: int, ready_fd: int) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(str(home / "lanes" / SOCKET))
        socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [log_fd, ready_fd])
        reply = sock.makefile("rb").readline()
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ZygoteUnavailable(f"the zygote answered {reply[:200]!r}") from None
    if answer.get("stale"):
        raise _Stale()
    if not isinstance(answer.get("pid"), int):
        raise ZygoteUnavailable(f"the zygote answered {answer!r}")
    return int(answer["pid"])


def _start(home: Path) -> None:
    """Start a zygote for ``home`` and wait until it listens (or another one does)."""
    lanes = _lanes(home)
    read_end, write_end = os.pipe()
    try:
        with open(lanes / "zygote.log", "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "vm.lanes.zygote", str(home), str(write_end)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
                start_new_session=True, env={**os.environ, "LANEKIT_HOME": str(home)},
            )  # fmt: skip
        os.close(write_end)
        write_end = -1
        # "ready", or nothing: it ended (another zygote holds the lock and answers instead)
        answer = read_line(read_end, READY_TIMEOUT)
        if answer.startswith("no answer"):
            raise ZygoteUnavailable(f"the zygote started gave {answer}")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def read_line(fd: int, timeout: float) -> str:
    """A line from a pipe (what a started process answers), or why there was none."""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): a test worker may hold over 1,024 descriptors
    poller.register(fd, select.POLLIN)
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return f"no answer within {timeout:.0f} s"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def running(home: Path) -> int | None:
    """The pid of this home's zygote, if one runs (it holds the lock). Its forks share
    its command line: this, not ps, tells the zygote."""
    try:
        fd = os.open(home / "lanes" / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # free: none runs
        except BlockingIOError:
            pid = os.read(fd, 32).strip()
            return int(pid) if pid.isdigit() else None
    finally:
        os.close(fd)


def stop(home: Path, timeout: float = 30.0) -> bool:
    """End this home's zygote, if one runs (the supervisors it forked go on); whether
    none runs any more (its lock is free) within ``timeout``."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(str(home / "lanes" / SOCKET))
        sock.sendall(b'{"op": "stop"}\n')
        sock.makefile("rb").readline()
    try:
        fd = os.open(home / "lanes" / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:  # held until the process is gone
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the zygote


def _warm() -> None:
    """Import and load now what every supervisor needs, so its forks need not."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS starts no threads
    from blockstore import objectstore

    from . import supervisor  # noqa: F401

    objectstore.warm_s3_client()


def _serve(home: Path, ready_fd: int) -> int:
    lanes = _lanes(home)
    lock = os.open(lanes / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    if not _take_lock(lock, lanes / SOCKET):
        os.close(ready_fd)  # EOF: the one that holds the lock answers
        os.close(lock)
        return 0
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # see running()
    _warm()
    fingerprint = code_fingerprint()
    path = lanes / SOCKET
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
    print(f"zygote {os.getpid()} warm for {home}", file=sys.stderr, flush=True)
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

            def retire() -> None:
                """Let go of the socket before answering: the client's next try starts
                a zygote of its own code instead of finding this one again."""
                with contextlib.suppress(OSError):
                    if path.stat().st_ino == inode:
                        path.unlink()
                listener.close()

            with conn:
                if not _handle(conn, fingerprint, (listener.fileno(), lock, conn.fileno()),
                               retire):  # fmt: skip
                    return 0
        return 0
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == inode:
                path.unlink()
        listener.close()
        os.close(lock)


def _take_lock(lock: int, path: Path) -> bool:
    """The home's zygote lock; False if another zygote holds it and listens. One that
    let go of its socket (ending) is waited for, briefly."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if path.exists() or time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _handle(conn: socket.socket, fingerprint: str, own_fds: tuple[int, ...], retire: Any) -> bool:
    """Answer one request; False: the zygote ends."""
    conn.settimeout(REQUEST_TIMEOUT)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        while not data.endswith(b"\n") and len(data) < 1 << 20:
            more = conn.recv(1 << 20)
            if not more:
                break
            data += more
        request = json.loads(data)
        if request.get("op") == "stop":
            retire()
            conn.sendall(b'{"stopped": true}\n')
            return False
        if request.get("fingerprint") != fingerprint:
            retire()
            conn.sendall(b'{"stale": true}\n')
            return False
        if len(fds) != 2:
            raise ValueError("a start request passes the log and the ready pipe")
        pid = _fork(request, fds, own_fds)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return True
    except (OSError, ValueError, TypeError, KeyError) as exc:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
        return True
    finally:
        for fd in fds:
            os.close(fd)


def _fork(request: dict[str, Any], fds: list[int], own_fds: tuple[int, ...]) -> int:
    """Fork the supervisor out of this process tree; its pid."""
    if len(os.listdir("/proc/self/task")) != 1:  # a fork would copy only this thread
        raise OSError("the zygote runs threads and cannot fork safely")
    args = [str(a) for a in request["args"]]
    env = {str(k): str(v) for k, v in dict(request["env"]).items()}
    cwd, umask = str(request["cwd"]), int(request["umask"])
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
                _become_supervisor(args, env, cwd, umask, fds, own_fds)
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


def _become_supervisor(
    args: list[str], env: dict[str, str], cwd: str, umask: int, fds: list[int],
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
        tempfile.tempdir = None  # found again from this environment
        os.chdir(cwd)
        os.umask(umask)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m vm.lanes.zygote HOME READY_FD", file=sys.stderr)
        return 2
    return _serve(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
