"""A booted sandbox (:class:`Machine`) and its blocking form (:class:`SyncMachine`).

Commands and files go through lanekit's guest agent (:mod:`vm.agent`). ``exec`` is the
buffered form of ``exec_stream``: output is never capped, and streaming keeps memory
bounded on both sides however much a command prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from blockstore import Fenced
from blockstore.concurrency import Services

from .agent import AgentSession, ExecEvent, ExecHandle, GuestProcess
from .agent.client import TaskSpawner
from .agent.fs import FileInfo, GuestFS
from .errors import ExecTimeout, GuestAgentError, HealthcheckFailed, ImageNotFoundError, VMError
from .proc import Child
from .registry import ImageEntry

if TYPE_CHECKING:
    from blockstore import Disk

    from .launcher import Sandbox
    from .net import Network

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POWEROFF_GRACE = 10.0


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    """The signal that ended the command, if one did (exit_code is then 128 + signal)."""

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclasses.dataclass
class Metrics:
    guest_uptime_s: float
    host_cpu_s: float
    host_rss_bytes: int
    disk_bytes_read: int
    disk_bytes_written: int
    blocks_fetched: int
    blocks_uploaded: int


def check_resources(cpus: int, memory_mib: int) -> None:
    """What qemu is asked for, checked before anything is stored or started."""
    if not 1 <= cpus <= 64:
        raise VMError(f"cpus {cpus}: give between 1 and 64")
    if not 64 <= memory_mib <= 65536:
        raise VMError(f"memory {memory_mib} MiB: give between 64 and 65536 MiB")


def tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


def describe_exit(code: int) -> str:
    """qemu's exit status in words (what killed it, if something did)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (by another process, or the kernel's OOM killer)" if code == -9 else ""
        return f"qemu was killed by {name}{hint}"
    return f"qemu exited with status {code}"


def command_environment(env: Mapping[str, str] | None, tty: bool) -> dict[str, str]:
    environment = {
        "PATH": DEFAULT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color" if tty else "dumb",
    }
    environment.update(env or {})
    for key, value in environment.items():
        if not key or "=" in key or "\0" in key + value:
            raise VMError(f"invalid environment variable {key!r}")
    return environment


class AgentMachine:
    """Commands and files over a guest agent session on a unix socket: what a booted
    sandbox (:class:`Machine`) and a connection to a running lane share."""

    def __init__(
        self, agent_socket: Path, cwd: str, tasks: TaskSpawner, connect_timeout: float
    ) -> None:
        self.agent_socket = agent_socket
        self.cwd = cwd
        self.fs = GuestFS(self.session)
        self._services = tasks
        self._connect_timeout = connect_timeout
        self._agent: AgentSession | None = None
        self._connect_lock = trio.Lock()
        self.network: Network | None = None
        """The sandbox's network (``network.watch()``: its audit events live), if it has one
        and it runs in this process."""

    def _check_running(self) -> None:
        """Raise if the guest is known to be gone."""

    async def session(self) -> AgentSession:
        """The live session with the guest agent, opening a new one if the last broke."""
        self._check_running()
        async with self._connect_lock:
            if self._agent is None or not self._agent.alive:
                await self._drop_session()
                agent = AgentSession(str(self.agent_socket))
                await agent.open(self._services, timeout=self._connect_timeout)
                self._agent = agent
            return self._agent

    async def _drop_session(self) -> None:
        """Close the session. It is forgotten before the await, so a session opened
        meanwhile (by a caller not holding the connect lock) is never overwritten."""
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.aclose()

    async def reconnect(self) -> list[GuestProcess]:
        """Drop the session and open a new one (as a host that lost its connection would);
        returns the processes the agent still runs, for :meth:`attach`."""
        async with self._connect_lock:
            await self._drop_session()
        return (await self.session()).processes

    async def attach(self, stream_id: int, offsets: Mapping[str, int] | None = None) -> ExecHandle:
        """A process started before the last reconnect (see :meth:`reconnect`), its output
        resumed at ``offsets`` (what the caller already has; see ``AgentSession.attach``)."""
        return await (await self.session()).attach(stream_id, offsets)

    @property
    def agent_pid(self) -> int | None:
        """The guest agent's pid in the guest (while a session is open)."""
        return self._agent.agent_pid if self._agent is not None else None

    # ------------------------------------------------------------ commands

    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: str = "pipe",
        timeout: float | None = None,
    ) -> ExecHandle:
        """Start ``argv``; iterate the handle for its output as it is produced.

        ``stdin``: "pipe" (write with ``handle.stdin``) or "none". ``user``: a name, a
        uid or ``uid:gid``. ``timeout`` kills the command and everything it started."""
        await self.wait_healthy()
        return await self._spawn(argv, cwd, env, user, tty, rows, cols, stdin, timeout)

    async def _spawn(
        self,
        argv: Sequence[str],
        cwd: str | None,
        env: Mapping[str, str] | None,
        user: str | None,
        tty: bool,
        rows: int,
        cols: int,
        stdin: str,
        timeout: float | None,
    ) -> ExecHandle:
        self._check_running()
        if not argv or not all(isinstance(a, str) for a in argv):
            raise VMError("exec needs a non-empty argv of strings")
        if stdin not in ("pipe", "none"):
            raise VMError(f"stdin must be 'pipe' or 'none', not {stdin!r}")
        if timeout is not None and not timeout > 0:
            raise VMError(f"timeout must be a positive number of seconds, not {timeout}")
        where = cwd or self.cwd
        if not where.startswith("/"):
            raise VMError(f"cwd {where!r} must be an absolute guest path")
        session = await self.session()
        if self.network is not None:  # the sandbox CA, the secrets' placeholders
            env = {**self.network.guest_env(), **(env or {})}
        return await session.spawn(
            list(argv), env=command_environment(env, tty), cwd=where, user=user, tty=tty,
            rows=rows, cols=cols, stdin=stdin, timeout=timeout,
        )  # fmt: skip

    async def _run(
        self,
        argv: Sequence[str],
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: bytes | None,
        timeout: float | None,
        user: str | None = None,
    ) -> ExecResult:
        handle = await self._spawn(
            argv, cwd, env, user, False, 24, 80, "none" if stdin is None else "pipe", timeout
        )
        async with trio.open_nursery() as nursery:
            if stdin is not None:

                async def feed() -> None:
                    with contextlib.suppress(GuestAgentError, BrokenPipeError):
                        await handle.stdin.write(stdin)
                        await handle.stdin.close()

                nursery.start_soon(feed)
            exit_event, out, err = await handle.collect()
            nursery.cancel_scope.cancel()
        assert exit_event.exit_code is not None
        result = ExecResult(exit_event.exit_code, out, err, exit_event.signal)
        if exit_event.timed_out:
            raise ExecTimeout(f"{argv[0]} ran past its {timeout} s timeout and was killed", result)
        return result

    async def exit_code_of(self, argv: list[str]) -> int:
        """Run a set-up command (before the sandbox is handed out) for its exit code."""
        return (await self._run(argv, None, None, None, 120, None)).exit_code

    async def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run argv to completion; raises :class:`ExecTimeout` (with the result) past
        ``timeout``. Output is whole, however large."""
        await self.wait_healthy()
        return await self._run(argv, cwd, env, stdin, timeout, user)

    async def exec_text(self, argv: Sequence[str], **kwargs: Any) -> str:
        """stdout as text; a non-zero exit is an error carrying stderr."""
        result = await self.exec(argv, **kwargs)
        if result.exit_code != 0:
            raise VMError(f"{list(argv)} exited {result.exit_code}: {result.stderr_text[-2000:]}")
        return result.stdout_text

    async def wait_healthy(self) -> None:
        """Until the guest is ready for commands (a booted sandbox runs its healthcheck)."""

    async def close(self) -> None:
        """Close the session with the agent (what runs in the guest goes on running)."""
        await self._drop_session()

    # ------------------------------------------------------------ files (shortcuts)

    async def read_file(self, path: str) -> bytes:
        return await self.fs.read(path)

    async def write_file(self, path: str, data: bytes | str) -> None:
        await self.fs.write(path, data)

    async def list_dir(self, path: str) -> list[str]:
        return [info.path.rsplit("/", 1)[-1] for info in await self.fs.list(path)]

    async def sync(self) -> None:
        """Flush the guest's page cache to its disks (the root disk then holds it)."""
        await (await self.session()).call("sync")


class Machine(AgentMachine):
    """A booted sandbox."""

    def __init__(
        self,
        sandbox: Sandbox,
        entry: ImageEntry,
        qemu: Child,
        disk: Disk,
        runtime: Path,
        cwd: str,
        services: Services,
    ) -> None:
        super().__init__(runtime / "agent.sock", cwd, services, sandbox.boot_timeout)
        self.sandbox = sandbox
        self.entry = entry
        self.qemu = qemu
        self.disk = disk
        self.runtime = runtime
        self.volumes: dict[str, Disk] = {}
        """Writable volumes, by guest path."""
        self.mounts: list[Any] = []
        """This boot's host filesystems (:class:`vm.launcher.Mount`)."""
        self._healthy = False
        self._health_lock = trio.Lock()
        self._stopped = False
        self.fenced = False
        """Another writer took the root disk over (the guest was stopped then)."""
        self.terminated: str | None = None
        """Why the network killed the sandbox (a block-and-terminate secret violation)."""
        self.accel = "tcg"

    @property
    def console_log(self) -> Path:
        return self.runtime / "console.log"

    def _check_running(self) -> None:
        if self.fenced:
            raise Fenced("fenced: another host took this disk over; this sandbox was stopped")
        if self.terminated is not None:
            raise VMError(f"the sandbox was terminated: {self.terminated}")
        if self._stopped:
            raise VMError("the sandbox has been stopped")
        if self.qemu.returncode is not None:
            raise VMError(
                f"the VM is gone: {describe_exit(self.qemu.returncode)}; console:\n"
                f"{tail(self.console_log)}"
            )

    async def wait_healthy(self) -> None:
        """Run the image's healthcheck until it passes or its timeout ends (once per boot)."""
        async with self._health_lock:
            if self._healthy:
                return
            hc = self.entry.healthcheck
            deadline = trio.current_time() + hc.timeout_ms / 1000
            registry = self.sandbox.registry
            while True:
                remaining = max(deadline - trio.current_time(), 0.5)
                try:
                    result = await self._run(hc.argv, "/", None, None, remaining)
                except ExecTimeout as exc:
                    assert isinstance(exc.result, ExecResult)
                    result = exc.result
                if result.exit_code == hc.expected_exit_code:
                    self._healthy = True
                    with contextlib.suppress(ImageNotFoundError):
                        await trio.to_thread.run_sync(registry.mark_healthy, self.entry.id)
                    return
                if trio.current_time() >= deadline:
                    message = (
                        f"image {self.entry.id!r}: healthcheck {list(hc.argv)} exited "
                        f"{result.exit_code}, expected {hc.expected_exit_code}; "
                        f"stdout: {result.stdout_text[-500:]!r} "
                        f"stderr: {result.stderr_text[-500:]!r}"
                    )
                    with contextlib.suppress(ImageNotFoundError):
                        await trio.to_thread.run_sync(
                            registry.mark_unhealthy, self.entry.id, message
                        )
                    raise HealthcheckFailed(message)
                await trio.sleep(0.2)

    # ------------------------------------------------------------ lifecycle

    async def metrics(self) -> Metrics:
        self._check_running()
        uptime = float((await self.fs.read("/proc/uptime")).split()[0])
        with open(f"/proc/{self.qemu.pid}/stat") as f:  # noqa: ASYNC230  (procfs)
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = 0
        with open(f"/proc/{self.qemu.pid}/status") as f:  # noqa: ASYNC230  (procfs)
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        store_stats = getattr(self.disk.store, "stats", None)
        return Metrics(
            guest_uptime_s=uptime,
            host_cpu_s=cpu,
            host_rss_bytes=rss,
            disk_bytes_read=self.disk.stats.bytes_read,
            disk_bytes_written=self.disk.stats.bytes_written,
            blocks_fetched=getattr(store_stats, "blocks_fetched", 0),
            blocks_uploaded=getattr(store_stats, "blocks_uploaded", 0),
        )

    async def stop(self, timeout: float = POWEROFF_GRACE) -> None:
        """Power the guest off (every process stopped, filesystems synced and the root
        remounted read-only) within ``timeout``; SIGKILL qemu if it will not."""
        if self._stopped:
            return
        self._stopped = True
        if self.qemu.returncode is None:
            with trio.move_on_after(timeout):
                with contextlib.suppress(GuestAgentError, OSError, VMError):
                    agent = self._agent
                    if agent is not None and agent.alive:
                        await agent.call("poweroff")
                await self.qemu.wait()
        await self.kill()

    async def kill(self) -> None:
        """Stop qemu at once (the root disk keeps whatever the guest had flushed)."""
        self._stopped = True
        if self.qemu.returncode is None:
            self.qemu.kill_group()
            await self.qemu.wait()
        await self._drop_session()


class SyncExecHandle:
    """:class:`ExecHandle` for code that is not async: iterate it for events."""

    def __init__(self, handle: ExecHandle, token: trio.lowlevel.TrioToken) -> None:
        self._handle = handle
        self._token = token
        self.pid = handle.pid
        self.stream_id = handle.stream_id

    def _call(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def __iter__(self) -> Iterator[ExecEvent]:
        while True:
            try:
                yield self._call(self._handle.__anext__)
            except StopAsyncIteration:
                return

    def write(self, data: bytes | str) -> None:
        self._call(self._handle.stdin.write, data)

    def close_stdin(self) -> None:
        self._call(self._handle.stdin.close)

    def signal(self, sig: int) -> None:
        self._call(self._handle.signal, sig)

    def kill(self) -> None:
        self._call(self._handle.kill)

    def resize(self, rows: int, cols: int) -> None:
        self._call(self._handle.resize, rows, cols)

    def wait(self) -> ExecEvent:
        return self._call(self._handle.wait)

    def collect(self) -> tuple[ExecEvent, bytes, bytes]:
        return self._call(self._handle.collect)


class SyncGuestFS:
    """:class:`GuestFS`'s methods, callable from ordinary threads."""

    def __init__(self, fs: GuestFS, token: trio.lowlevel.TrioToken) -> None:
        self._fs = fs
        self._token = token

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._fs, name)
        if name.startswith("_") or not callable(method) or name in ("read_stream",):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(lambda: method(*args, **kwargs), trio_token=self._token)

        return call

    def list(self, path: str) -> list[FileInfo]:
        return trio.from_thread.run(self._fs.list, path, trio_token=self._token)


class SyncMachine:
    """:class:`Machine`'s methods, callable from ordinary threads."""

    def __init__(self, machine: Machine, token: trio.lowlevel.TrioToken) -> None:
        self._machine = machine
        self._token = token
        self.fs = SyncGuestFS(machine.fs, token)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(lambda: fn(*args, **kwargs), trio_token=self._token)

    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        return self._call(self._machine.exec, argv, **kwargs)

    def exec_text(self, argv: Sequence[str], **kwargs: Any) -> str:
        return self._call(self._machine.exec_text, argv, **kwargs)

    def exec_stream(self, argv: Sequence[str], **kwargs: Any) -> SyncExecHandle:
        handle = self._call(self._machine.exec_stream, argv, **kwargs)
        return SyncExecHandle(handle, self._token)

    def reconnect(self) -> list[GuestProcess]:
        return self._call(self._machine.reconnect)

    def attach(self, stream_id: int, offsets: Mapping[str, int] | None = None) -> SyncExecHandle:
        return SyncExecHandle(self._call(self._machine.attach, stream_id, offsets), self._token)

    @property
    def agent_pid(self) -> int | None:
        return self._machine.agent_pid

    @property
    def network(self) -> Network | None:
        return self._machine.network

    def read_file(self, path: str) -> bytes:
        return self._call(self._machine.read_file, path)

    def write_file(self, path: str, data: bytes | str) -> None:
        self._call(self._machine.write_file, path, data)

    def list_dir(self, path: str) -> list[str]:
        return self._call(self._machine.list_dir, path)

    def metrics(self) -> Metrics:
        return self._call(self._machine.metrics)

    def sync(self) -> None:
        self._call(self._machine.sync)

    def stop(self) -> None:
        self._call(self._machine.stop)

    def kill(self) -> None:
        self._call(self._machine.kill)
