"""What a lane's supervisor and its clients on the host share: the run directory and the
names in it, starting the supervisor and reading its one-line answer, its control socket,
its log, and the machine behind its agent relay. (The supervisor runs as ``python -m
vm.lanes.supervisor``: nothing the package imports may import it.)"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from blockstore.identity import process_identity

from ..machine import AgentMachine
from ..state import lanekit_home
from . import zygote
from .cache import LaneCache
from .errors import LaneError, check_lane_name

CONNECT_TIMEOUT = 30.0
BUSY = "busy: "
"""How the supervisor tells ``Lane.start`` that another holder has the lane's disks."""
CONSOLE = "console.log"
FENCED = "fenced.json"
"""Why this host's last run of the lane was fenced (epoch, reason)."""
IDENTITY = "supervisor.json"
"""Who the supervisor is (pid, start time) and, once it has read it, the lane's env."""
AGENT_SOCKET = "agent.sock"
CONTROL_SOCKET = "control.sock"
"""The supervisor's requests: status, stop, pause, checkpoint."""
KILL_WAIT = 30.0
"""Seconds a killed process gets to be gone (a process in the kernel ends its call first)."""


def run_dir(home: Path, name: str) -> Path:
    return home / "lanes" / name


def read_fenced(run: Path) -> dict[str, Any] | None:
    """This host's record of its last run of the lane being fenced, if there is one."""
    try:
        record = json.loads((run / FENCED).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("reason"), str) else None


def live_supervisor(run: Path) -> dict[str, Any] | None:
    """The identity record of this host's live supervisor of the lane, if one runs."""
    try:
        record = json.loads((run / IDENTITY).read_text())
        alive = process_identity(int(record["pid"])) == record["process"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if alive else None


def running_env(
    name: str, home: Path | None = None, store: str | None = None
) -> dict[str, str] | None:
    """The environment every command of lane ``name`` gets, as this host's live supervisor
    of it recorded it; None if none runs here, if it was started by a lanekit that did not
    record it, or (with ``store``) if this host knows the lane from another store: ask
    the store then."""
    home = home or lanekit_home()
    record = live_supervisor(run_dir(home, check_lane_name(name)))
    env = None if record is None else record.get("env")
    if not isinstance(env, dict):
        return None
    if store is not None:
        cached = LaneCache.of(home).get(name)
        if cached is None or cached.store != store:
            return None
    return dict(env)


@contextlib.asynccontextmanager
async def connect_running(
    name: str, env: Mapping[str, str], home: Path | None = None
) -> AsyncIterator[AgentMachine]:
    """The machine of lane ``name`` running on this host, through its supervisor's relay;
    each command gets ``env`` (the lane's) under its own. It needs no store and none of
    the store's code: ``lane exec`` runs once per command an agent sends."""
    run = run_dir(home or lanekit_home(), check_lane_name(name))
    record = await trio.to_thread.run_sync(live_supervisor, run)
    if record is None or not (run / AGENT_SOCKET).exists():
        fenced = await trio.to_thread.run_sync(read_fenced, run)
        why = f" (its last run here was {fenced['reason']})" if fenced else ""
        raise LaneError(f"lane {name!r} is not running on this host{why}")
    async with trio.open_nursery() as nursery:
        machine = LaneMachine(env, run / AGENT_SOCKET, "/", nursery, CONNECT_TIMEOUT)
        try:
            await machine.session()
            yield machine
        finally:
            await machine.close()
            nursery.cancel_scope.cancel()


def spawn_supervisor(
    args: list[str],
    log_path: Path,
    home: Path,
    timeout: float,
    abandon: Callable[[int], None] | None = None,
) -> str:
    """Start a supervisor with ``args``, the way ``python -m vm.lanes.supervisor ARGS``
    would, in a session of its own (it outlives us), logging to ``log_path``: forked by
    this home's warm zygote (see :mod:`.zygote`) or, if none can, spawned. Its answer on
    the ready pipe ("ready", "error: ...", or why there was none). ``abandon(pid)`` is
    called when the wait ends without an answer (interrupted, or none within
    ``timeout``): nobody waits for that supervisor any more, so it must not boot on."""
    env = {**os.environ, "LANEKIT_HOME": str(home)}
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as log:
            try:
                pid = zygote.fork_supervisor(home, args, env, log.fileno(), write_end)
            except zygote.ZygoteUnavailable:
                pid = subprocess.Popen(
                    [sys.executable, "-m", "vm.lanes.supervisor", *args,
                     "--ready-fd", str(write_end)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
                    start_new_session=True, env=env,
                ).pid  # fmt: skip
        os.close(write_end)
        write_end = -1  # another thread may be given its number next
        try:
            answer = zygote.read_line(read_end, timeout)
        except BaseException:  # Ctrl-C while it boots
            if abandon is not None and pid is not None:
                abandon(pid)
            raise
        if answer.startswith("no answer") and abandon is not None and pid is not None:
            abandon(pid)
        return answer
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def control_request(
    name: str, run: Path, op: str, timeout: float, **fields: Any
) -> tuple[dict[str, Any], socket.socket]:
    """Send ``op`` to the supervisor's control socket; its JSON reply and the socket (some
    operations answer again on it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(str(run / CONTROL_SOCKET))
        sock.settimeout(timeout)
    except OSError as exc:
        sock.close()
        raise LaneError(f"lane {name!r}: its supervisor does not answer ({exc})") from None
    try:
        sock.sendall(json.dumps({**fields, "op": op}).encode() + b"\n")
        reply = sock.makefile("rb").readline()
    except OSError as exc:  # a timeout: it took the request and never answered
        sock.close()
        raise LaneError(f"lane {name!r}: its supervisor does not answer ({exc})") from None
    try:
        return json.loads(reply), sock
    except ValueError:
        sock.close()
        raise LaneError(f"lane {name!r}: its supervisor answered {reply!r}") from None


def end_process(pid: int, process: str, grace: float) -> bool:
    """SIGTERM to ``pid`` if it is still the process ``process`` (``PID:START``: pids are
    reused), SIGKILL if it has not ended within ``grace`` seconds; whether it had to be
    killed. Signalled and watched through a pidfd, so never another process that took the
    pid. LaneError if even SIGKILL does not end it."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if process_identity(pid) != process:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has ended
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signum)
            if poller.poll(wait * 1000):
                return signum == signal.SIGKILL
        raise LaneError(f"process {pid} did not end even when killed")
    finally:
        os.close(fd)


class LaneMachine(AgentMachine):
    """A connection to a running lane: every command gets the lane's environment."""

    def __init__(self, env: Mapping[str, str], *args: Any) -> None:
        super().__init__(*args)
        self.lane_env = dict(env)

    async def _spawn(self, argv: Sequence[str], cwd: str | None,
                     env: Mapping[str, str] | None, *rest: Any) -> Any:  # fmt: skip
        return await super()._spawn(argv, cwd, {**self.lane_env, **(env or {})}, *rest)


class Tee:
    """Text to several files (an attached supervisor's log: the terminal and the file)."""

    def __init__(self, *files: Any) -> None:
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
            f.flush()
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
