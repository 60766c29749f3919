"""Concurrent flushes share a commit; none returns before the writes it covers are durable,
not even after a round that failed or was cancelled."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from blockstore import Disk, MemoryObjectStore, create_disk
from blockstore.store import ObjectBlockStore
from tests.test_t2_disk import DictBlockStore

BS = 4096


class GatedStore(DictBlockStore):
    """A user block store whose flush waits for the test to open its gate, or fails."""

    def __init__(self) -> None:
        super().__init__(BS)
        self.gate = trio.Event()
        self.entered = trio.Event()
        self.failures = 0

    async def flush(self) -> None:
        self.entered.set()
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("the store is unreachable")
        await super().flush()


async def _flush_into(disk: Disk, done: list[str], name: str) -> None:
    await disk.flush()
    done.append(name)


@pytest.mark.parametrize("written_meanwhile", [False, True])
async def test_flushes_during_a_commit_share_it_or_the_next(written_meanwhile: bool) -> None:
    """Fifteen flushes arrive while a commit is under way: with nothing written since its
    snapshot they share it; after a write acknowledged meanwhile, they share the next."""
    store = GatedStore()
    async with Disk(store, 16 * BS) as disk:
        await disk.write(0, b"a" * BS)
        done: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flush_into, disk, done, "first")
            await store.entered.wait()
            if written_meanwhile:
                await disk.write(BS, b"b" * BS)
            for i in range(15):
                nursery.start_soon(_flush_into, disk, done, f"queued {i}")
            await trio.testing.wait_all_tasks_blocked()
            assert done == []  # nobody returns before the commit lands
            store.gate.set()
        assert len(done) == 16
        assert store.flushes == (2 if written_meanwhile else 1)
        assert store.durable[0] == b"a" * BS
        if written_meanwhile:
            assert store.durable[1] == b"b" * BS


async def test_flushes_waiting_on_a_failed_commit_commit_again_or_fail() -> None:
    store = GatedStore()
    store.failures = 1
    async with Disk(store, 16 * BS) as disk:
        await disk.write(0, b"a" * BS)
        results: list[str] = []

        async def first() -> None:
            with pytest.raises(OSError, match="unreachable"):
                await disk.flush()
            results.append("first failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await store.entered.wait()
            for i in range(4):
                nursery.start_soon(_flush_into, disk, results, f"waiter {i}")
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
        assert results[0] == "first failed"
        assert sorted(results[1:]) == [f"waiter {i}" for i in range(4)]
        assert store.flushes == 1  # the waiters' one retry, shared
        assert store.durable[0] == b"a" * BS


async def _patched_again_during_a_lost_round(lose: str) -> bytes:
    """Half of a block is flushed by a round that fails (or is cancelled, as an NBD FLUSH
    whose connection drops), the other half is written meanwhile, and the retry commits."""
    objects = MemoryObjectStore()
    create_disk(objects, "d", 8 * BS, block_size=BS)
    store = await ObjectBlockStore.open(objects, "d", writable=True)
    entered, gate, lost = trio.Event(), trio.Event(), [True]
    real_flush = store.flush

    async def flush() -> None:
        if lost[0]:
            lost[0] = False
            entered.set()
            await gate.wait() if lose == "fails" else await trio.sleep_forever()
            raise OSError("the store is unreachable")
        await real_flush()

    store.flush = flush  # type: ignore[method-assign]
    async with Disk(store, 8 * BS, compact=False) as disk:
        await disk.write(2 * BS, b"a" * 2048)

        async def first() -> None:
            with contextlib.suppress(OSError):
                await disk.flush()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await entered.wait()
            await disk.write(2 * BS + 2048, b"b" * 2048)
            if lose == "fails":
                gate.set()
            else:
                nursery.cancel_scope.cancel()
        await disk.flush()
    reader = await ObjectBlockStore.open(objects, "d", writable=False)
    block = (await reader.read_blocks([2]))[2]
    assert isinstance(block, bytes)
    return block


@pytest.mark.parametrize("lose", ["fails", "cancelled"])
async def test_a_block_completed_during_a_lost_round_is_committed_whole(lose: str) -> None:
    assert await _patched_again_during_a_lost_round(lose) == b"a" * 2048 + b"b" * 2048
