"""A warm supervisor: ``python -m vm.lanes.zygote HOME`` imports what a lane's supervisor
needs once (trio, the block store, the launcher, boto3 and its S3 model: more than half a
second, most of a resume's start) and forks a supervisor for every lane start on this host
that asks it through ``HOME/lanes/zygote.sock``. This module is the client side (and the
entry point); :mod:`.zygote_server` is the zygote.

A forked supervisor is the program ``python -m vm.lanes.supervisor`` would be: its own
session and process group outside the zygote's tree, the asking client's environment
(``TZ`` included), working directory, umask, resource limits and ignored signals, its
stdout and stderr on the log the client passed, the client's ready pipe for its answer.
What a fork cannot take from the client (the interpreter's flags and path, the cgroup, the
supplementary groups) is part of the zygote's :func:`fingerprint`: a client whose values
differ is served by a zygote of its own kind. Only its command line (what ps shows) is the
zygote's.

Once a request is sent, the client never starts a supervisor itself: the ready pipe tells
what became of it (two supervisors of one start would race for the lane).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
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
LOG = "zygote.log"
READY_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0
MAX_REQUEST = 1 << 20
RLIMITS = tuple(
    getattr(resource, name)
    for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_MEMLOCK", "RLIMIT_AS")
)
SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1)
_ROOTS = ("blockstore", "vm", "vfs", "tools")
_ENV_KINDS = ("PYTHON", "LANG", "LC_")


class ZygoteUnavailable(Exception):
    """No zygote took the request: start the supervisor directly."""


def idle_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(IDLE_ENV, IDLE)))
    except ValueError:
        return IDLE


def fingerprint() -> str:
    """What a fork inherits from the zygote where a spawned supervisor would take it from
    its client: the interpreter, the environment it reads at start (PYTHON*, locale), the
    installed packages (the site directories' modification times), every lanekit Python
    file (size and modification time), the cgroup, the ids and supplementary groups. A
    client and a zygote with one fingerprint: a fork is what a spawn would be."""
    import site

    base = Path(__file__).resolve().parent.parent.parent
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_KINDS))
    with open("/proc/self/cgroup") as f:
        cgroup = f.read()
    head = [sys.executable, sys.version, str(base), repr(env), cgroup,
            repr(sorted(os.getgroups())), repr((os.getuid(), os.getgid()))]  # fmt: skip
    digest = hashlib.sha256("\0".join(head).encode())
    for entry in [*site.getsitepackages(), site.getusersitepackages()]:
        with contextlib.suppress(OSError):
            digest.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\n".encode())
    for root in _ROOTS:
        for path in sorted((base / root).rglob("*.py")):
            with contextlib.suppress(OSError):
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def lanes_dir(home: Path) -> Path:
    path = home / "lanes"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def fork_supervisor(
    home: Path, args: Sequence[str], env: dict[str, str], log_fd: int, ready_fd: int
) -> int | None:
    """Have this home's zygote fork a supervisor with ``args`` (``--ready-fd`` added) and
    ``env``, its output on ``log_fd`` and its answer on ``ready_fd``; its pid, or None if
    the request went out but its reply was lost (the ready pipe tells the rest). Starts a
    zygote if none answers. ZygoteUnavailable: nothing was sent; spawn the supervisor."""
    if idle_seconds() <= 0:
        raise ZygoteUnavailable("disabled")
    try:
        request = _request(args, env)
    except OSError as exc:  # a cwd that is gone, say
        raise ZygoteUnavailable(str(exc)) from None
    for _attempt in range(3):
        try:
            sock = _connect(home)
        except (FileNotFoundError, ConnectionRefusedError):
            _start(home)
            continue
        except OSError as exc:
            raise ZygoteUnavailable(str(exc)) from None
        with sock:
            try:
                socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [log_fd, ready_fd])
            except OSError as exc:  # nothing of it was taken
                raise ZygoteUnavailable(str(exc)) from None
            try:
                sock.settimeout(REPLY_TIMEOUT)
                answer = json.loads(sock.makefile("rb").readline())
            except (OSError, ValueError):
                return None
        if answer.get("stale"):
            continue  # it has let go of its socket: the next attempt starts one of ours
        if isinstance(answer.get("pid"), int):
            return int(answer["pid"])
        raise ZygoteUnavailable(f"the zygote refused: {answer.get('error', answer)}")
    raise ZygoteUnavailable("no zygote answered")


def _request(args: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    return {
        "args": list(args),
        "env": env,
        "cwd": os.getcwd(),
        "umask": _umask(),
        "rlimits": {str(r): list(resource.getrlimit(r)) for r in RLIMITS},
        "ignored": [int(s) for s in SIGNALS if signal.getsignal(s) == signal.SIG_IGN],
        "fingerprint": fingerprint(),
    }


def _connect(home: Path) -> socket.socket:
    """A connection to the home's zygote, after checking that nobody else could have put
    it there: the directory is ours and private, the zygote runs as us."""
    lanes = lanes_dir(home)  # made private (a PermissionError if it is not ours)
    if os.stat(lanes).st_uid != os.getuid():
        raise ZygoteUnavailable(f"{lanes} belongs to another user")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(str(lanes / SOCKET))
        if peer_uid(sock) != os.getuid():
            raise ZygoteUnavailable("the zygote's socket is held by another user")
    except BaseException:
        sock.close()
        raise
    return sock


def _umask() -> int:
    """This process's umask, read without setting it (another thread may create files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask in /proc/self/status")


def _start(home: Path) -> None:
    """Start a zygote for ``home`` and wait until it listens (or another one does)."""
    lanes = lanes_dir(home)
    read_end, write_end = os.pipe()
    try:
        with open(lanes / LOG, "ab") as log:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "vm.lanes.zygote", str(home), str(write_end)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
                start_new_session=True, env={**os.environ, "LANEKIT_HOME": str(home)},
            )  # fmt: skip
        os.close(write_end)
        write_end = -1
        answer = read_line(read_end, READY_TIMEOUT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(READY_TIMEOUT)  # it forks the zygote away and exits: no zombie
        if answer.startswith("no answer"):
            raise ZygoteUnavailable(f"the zygote started gave {answer}")
        if answer != "ready":  # it ended: another zygote holds the lock, maybe warming up
            _wait_for_other(home)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _wait_for_other(home: Path) -> None:
    """Until the zygote that holds the lock answers, or none holds it."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and running(home) is not None:
        with contextlib.suppress(OSError):
            _connect(home).close()
            return
        time.sleep(0.05)


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
    with contextlib.suppress(OSError, ZygoteUnavailable), _connect(home) as sock:
        sock.settimeout(REPLY_TIMEOUT)
        sock.sendall(b'{"op": "stop"}\n')
        sock.makefile("rb").readline()
    try:
        fd = os.open(home / "lanes" / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        return take_lock(fd, timeout)  # held until the process is gone
    finally:
        os.close(fd)


def take_lock(fd: int, timeout: float) -> bool:
    """An exclusive flock on ``fd`` within ``timeout`` seconds (polled: bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


if __name__ == "__main__":
    from .zygote_server import main

    sys.exit(main(sys.argv[1:]))
