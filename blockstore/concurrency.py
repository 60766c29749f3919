"""trio helpers every layer uses: worker threads, concurrent tasks with plain errors, and
async context managers held open for code that is not async."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def run_sync(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error in a nursery's exception group (a cancellation only if that is
    all there is): what a caller or a protocol edge should see and report."""
    leaves = _leaves(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return (real or leaves)[0]


async def parallel(tasks: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run tasks concurrently; if any fail, raise the first failure itself (not a group),
    so callers and the protocol edges see ordinary exceptions."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        raise first_failure(group) from None


@contextlib.contextmanager
def blocking(
    enter: Callable[[], AbstractAsyncContextManager[T]],
) -> Iterator[tuple[T, trio.lowlevel.TrioToken]]:
    """Hold ``enter()`` open for code that is not async: a trio loop on a helper thread
    enters it, keeps it until the with-block ends, then exits it. Yields its value and the
    loop's token (for ``trio.from_thread``). An error from entering is raised here, and
    one from exiting too unless the block itself failed."""
    ready = threading.Event()
    entered: list[T] = []
    errors: list[BaseException] = []
    token: list[trio.lowlevel.TrioToken] = []
    done: list[trio.Event] = []
    entering = trio.CancelScope()

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        done.append(trio.Event())
        try:
            with entering:
                async with enter() as value:
                    entered.append(value)
                    ready.set()
                    await done[0].wait()
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        ready.wait()
    except BaseException:
        # A Ctrl-C while entering (a sandbox booting): stop entering and exit what was
        # entered, rather than leave it running on the helper thread with no handle.
        while not token and thread.is_alive():
            thread.join(0.01)
        with contextlib.suppress(trio.RunFinishedError, IndexError):
            trio.from_thread.run_sync(entering.cancel, trio_token=token[0])
        thread.join()
        raise
    if not entered:
        thread.join()
        raise errors[0]
    body_failed = True
    try:
        yield entered[0], token[0]
        body_failed = False
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(done[0].set, trio_token=token[0])
        thread.join()
        if errors and not body_failed:
            raise errors[0]


class Services:
    """Tasks that keep running when their surroundings are cancelled, until :meth:`close`.

    A VM's servers (the root disk's NBD server, the guest agent's reader) must go on
    serving while the VM powers off, including when the boot is left because something
    outside was cancelled (a Ctrl-C): a cancelled NBD server would lose the guest's last
    flush. Each task runs in a shielded scope of its own; ``close`` cancels them all."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: list[trio.CancelScope] = []

    def _scope(self) -> trio.CancelScope:
        scope = trio.CancelScope(shield=True)
        self._scopes.append(scope)
        return scope

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        scope = self._scope()

        async def run() -> None:
            with scope:
                await fn(*args)

        self._nursery.start_soon(run)

    async def start(self, fn: Callable[..., Awaitable[object]], *args: Any) -> Any:
        """Like ``nursery.start``: ``fn`` gets ``task_status``; returns what it reports."""
        scope = self._scope()

        async def run(task_status: trio.TaskStatus[Any]) -> None:
            with scope:
                await fn(*args, task_status=task_status)

        return await self._nursery.start(run)

    def close(self) -> None:
        for scope in self._scopes:
            scope.cancel()
