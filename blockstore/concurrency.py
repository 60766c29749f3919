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

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        done.append(trio.Event())
        try:
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
    ready.wait()
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
