"""``lanekit vm run``'s session: boot, stream one command, stop — and signals on the way.

The first SIGINT/SIGTERM is passed to the command; if it has not ended within
:data:`COMMAND_GRACE`, the command is abandoned and the sandbox left the normal way (the
guest syncs and powers off, the root disk is flushed and released). A second one kills
the guest at once and leaves the same way, minus the guest's sync. A third exits on the
spot (the lease then expires by itself). Leaving the boot normally, never by
cancellation, is what keeps the root disk's last flush.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from blockstore import Fenced
from blockstore.concurrency import first_failure
from vm.agent import ExecHandle
from vm.errors import GuestAgentError, VMError
from vm.machine import AgentMachine, Machine

from .config import EXIT_ERROR
from .terminal import raw_terminal, read_some, stdin_fd, terminal_size, write_all

if TYPE_CHECKING:
    from vm.launcher import Mount, Sandbox

COMMAND_GRACE = 10.0
EXIT_INTERRUPTED = 130


@dataclasses.dataclass
class RunOptions:
    command: list[str]
    env: dict[str, str]
    cwd: str
    user: str | None
    timeout: float | None
    tty: bool
    interactive: bool


def _say(line: str) -> None:
    sys.stderr.write(f"\r\nlanekit: {line}\r\n" if _raw[0] else f"lanekit: {line}\n")
    sys.stderr.flush()


_raw = [False]


class _Session:
    """What a signal needs to reach: the command, the machine, the scopes to cancel."""

    def __init__(self, after: str = "the sandbox stops cleanly when it ends") -> None:
        self.after = after
        self.signals = 0
        self.handle: ExecHandle | None = None
        self.machine: Machine | None = None
        self.command_scope: trio.CancelScope | None = None
        self.boot_scope = trio.CancelScope()

    async def on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals >= 3:
            _say(f"{name} a third time: exiting now; the root disk's lease will expire")
            os._exit(EXIT_INTERRUPTED)
        if self.signals == 2:
            _say(
                f"{name} again: stopping at once; what the guest had not synced is lost "
                "(the root disk is still flushed and released)"
            )
            if self.machine is not None:
                await self.machine.kill()
            self._abandon_command()
            return
        if self.handle is None:
            _say(f"{name}: stopping the sandbox before the command started")
            self.boot_scope.cancel()
            return
        _say(
            f"{name}: passed to the command; {self.after} "
            f"(or in {COMMAND_GRACE:.0f} s); {name} again stops at once"
        )
        try:
            await self.handle.signal(signum)
        except Exception as exc:  # the command may be gone already
            _say(f"could not pass {name} to the command: {exc}")
        if self.command_scope is not None:
            self.command_scope.deadline = min(
                self.command_scope.deadline, trio.current_time() + COMMAND_GRACE
            )

    def _abandon_command(self) -> None:
        if self.command_scope is not None:
            self.command_scope.cancel()
        else:
            self.boot_scope.cancel()


async def _pump_stdin(handle: ExecHandle, tty: bool) -> None:
    fd = stdin_fd()
    with contextlib.suppress(BrokenPipeError):  # the command exited before reading it all
        while True:
            data = await read_some(fd)
            if not data:
                await handle.stdin.close()
                return
            await handle.stdin.write(data)


async def _follow_window(handle: ExecHandle) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        async for _ in changes:
            await handle.resize(*terminal_size(sys.stdout.fileno()))


async def _stream(handle: ExecHandle) -> int:
    out, err = sys.stdout.fileno(), sys.stderr.fileno()
    async for event in handle:
        if event.kind == "stdout":
            await write_all(out, event.data)
        elif event.kind == "stderr":
            await write_all(err, event.data)
    assert handle.exit is not None and handle.exit.exit_code is not None
    return handle.exit.exit_code


async def _run_command(machine: AgentMachine, run: RunOptions, session: _Session) -> int | None:
    forward_stdin = run.interactive or not os.isatty(stdin_fd())
    rows, cols = terminal_size(sys.stdout.fileno())
    with trio.CancelScope() as scope:
        session.command_scope = scope
        handle = await machine.exec_stream(
            run.command, cwd=run.cwd, env=run.env, user=run.user, tty=run.tty,
            rows=rows, cols=cols, stdin="pipe" if forward_stdin else "none",
            timeout=run.timeout,
        )  # fmt: skip
        session.handle = handle
        try:
            async with trio.open_nursery() as nursery:
                if forward_stdin:
                    nursery.start_soon(_pump_stdin, handle, run.tty)
                if run.tty:
                    nursery.start_soon(_follow_window, handle)
                code = await _stream(handle)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_failure(group) from None
        return code
    return None  # abandoned after a signal


async def run_in_sandbox(sandbox: Sandbox, mounts: Sequence[Mount], run: RunOptions) -> int:
    session = _Session()
    code: int | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    await session.on_signal(signum)

            nursery.start_soon(watch)
            with session.boot_scope:
                async with sandbox.boot(mounts, cwd=run.cwd) as machine:
                    session.machine = machine
                    with raw_terminal(stdin_fd()) if run.tty else _no_terminal() as raw:
                        _raw[0] = bool(raw)
                        try:
                            code = await _run_command(machine, run, session)
                        except (GuestAgentError, VMError):
                            if machine.fenced:  # the watcher said why, once
                                raise Fenced("another host took the root disk over") from None
                            if machine.terminated is not None:  # the notice said why, once
                                code = EXIT_ERROR
                            elif session.signals < 2:
                                raise
                            else:
                                code = None  # we killed the guest under it
                        finally:
                            _raw[0] = False
            nursery.cancel_scope.cancel()
    if code is None:
        _say("interrupted; the sandbox was stopped")
        return EXIT_INTERRUPTED
    return code


async def run_in_machine(machine: AgentMachine, run: RunOptions) -> int:
    """``lane exec``: stream one command in a guest that goes on running. The first
    SIGINT/SIGTERM is passed to the command; a second abandons it (it may go on running
    in the guest); a third exits on the spot."""
    session = _Session("this command is left when it ends")
    code: int | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    await session.on_signal(signum)

            nursery.start_soon(watch)
            terminal = raw_terminal(stdin_fd()) if run.tty else _no_terminal()
            with session.boot_scope, terminal as raw:
                _raw[0] = bool(raw)
                try:
                    code = await _run_command(machine, run, session)
                finally:
                    _raw[0] = False
            nursery.cancel_scope.cancel()
    if code is None:
        _say("interrupted; the command was left")
        return EXIT_INTERRUPTED
    return code


class _no_terminal:
    def __enter__(self) -> bool:
        return False

    def __exit__(self, *exc: object) -> None:
        return None
