"""How a long-running command stops, the same for every one of them.

The first SIGINT or SIGTERM starts the clean stop (flush, release, unmount, stop the
children) and says so in one line. A second one during that stop takes the fastest safe
way out and says what it skips: nothing acknowledged is lost (every acknowledged write is
already committed), but unacknowledged writes are dropped and a lease is left to expire.
Neither signal is ever lost: the receiver is open from start-up to exit, so a signal that
lands mid-stop is seen, not queued behind the stop it would shorten.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def say(line: str) -> None:
    print(f"lanekit: {line}", file=sys.stderr, flush=True)


def name_of(signum: int) -> str:
    return signal.Signals(signum).name


class Stopper:
    """Counts stop signals; ``requested`` is set by the first. ``on_second`` runs on the
    second (it should not return: exit, or kill what the clean stop waits for)."""

    def __init__(self, stopping: str, hurry: str, on_second: Callable[[], None] | None = None):
        self.stopping = stopping
        self.hurry = hurry
        self.on_second = on_second or (lambda: os._exit(EXIT_INTERRUPTED))
        self.requested = trio.Event()
        self.count = 0

    def signalled(self, signum: int) -> None:
        self.count += 1
        name = name_of(signum)
        if self.count == 1:
            say(f"{name}: {self.stopping} ({name} again: {self.hurry})")
            self.requested.set()
        else:
            say(f"{name} again: {self.hurry}")
            self.on_second()

    async def watch(self, signals: trio.MemoryReceiveChannel[int] | Any) -> None:
        async for signum in signals:
            self.signalled(signum)


async def serve_until_stopped(
    stopper: Stopper,
    start: Callable[..., Awaitable[None]],
    ready: Callable[[Any], None],
) -> None:
    """Run ``start(task_status=...)`` until the first stop signal, or until it ends by
    itself (a mount taken away from outside); ``ready`` gets what it reports once up."""
    async with trio.open_nursery() as nursery:

        async def service(task_status: trio.TaskStatus[Any]) -> None:
            await start(task_status=task_status)
            nursery.cancel_scope.cancel()

        ready(await nursery.start(service))
        await stopper.requested.wait()
        nursery.cancel_scope.cancel()


def run_stoppable(main: Callable[[Stopper], Awaitable[Any]], stopper: Stopper) -> Any:
    """``trio.run(main(stopper))`` with the stop signals watched for its whole life (the
    clean stop included)."""

    async def wrapper() -> Any:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stopper.watch, signals)
                result = await main(stopper)
                nursery.cancel_scope.cancel()
                return result

    return trio.run(wrapper)


def terminate_like_interrupt() -> None:
    """SIGTERM stops a command that watches no signals of its own the way Ctrl-C does:
    its ``finally`` blocks and context managers run (scratch directories, child
    processes), where the default action ends the process on the spot. Commands that
    watch signals (``run_stoppable``, ``SignalCount``) replace this for their lifetime."""

    def handler(signum: int, frame: Any) -> None:
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):
            # Python's own raises; trio's (inside trio.run) raises where that is safe, or
            # delivers it to the main task at the next checkpoint.
            interrupt(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt  # SIGINT ignored (a background job): SIGTERM still stops

    signal.signal(signal.SIGTERM, handler)


class SignalCount:
    """Stop signals for a command that is not trio code (``s3 serve``), counted by a plain
    Python handler. Such a handler must not set a threading.Event: Event.set takes the lock
    the interrupted main thread may be holding inside Event.wait, and the process hangs
    ignoring every later signal (seen in CI). Counting is one bytecode, and ``first`` and
    ``second`` are polled, never waited on."""

    def __init__(self, stopping: str, hurry: str) -> None:
        self.stopping = stopping
        self.hurry = hurry
        self.count = 0
        self.first = _AtLeast(self, 1)
        self.second = _AtLeast(self, 2)

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        name = name_of(signum)
        if self.count == 1:
            line = f"{name}: {self.stopping} ({name} again: {self.hurry})"
        elif self.count == 2:
            line = f"{name} again: {self.hurry}"
        else:
            return
        # Unbuffered: a handler that interrupts another one's print would fail with
        # "reentrant call" on sys.stderr's buffer.
        os.write(2, f"lanekit: {line}\n".encode())

    def sleep_until_first(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` in short steps; whether a stop signal came."""
        deadline = time.monotonic() + seconds
        while not self.count and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.count > 0


class _AtLeast:
    def __init__(self, counter: SignalCount, n: int) -> None:
        self._counter = counter
        self._n = n

    def is_set(self) -> bool:
        return self._counter.count >= self._n
