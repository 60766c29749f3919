"""A writer that cannot renew its lease for a whole TTL (its store unreachable) is fenced
for good: after one TTL another writer may hold the disk, so it never commits again, even
when the store answers again and nobody took the disk."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import trio

from blockstore import Fenced, MemoryObjectStore, ObjectStore, create_disk, disk_info, open_disk
from blockstore.lease import read_lease
from blockstore.objectstore import ObjectInfo, StoredObject
from tests.workers import BS


class Freezable(ObjectStore):
    """A real store whose requests hang while it is frozen, as on a stopped server."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.thawed = threading.Event()
        self.thawed.set()

    def _wait(self) -> None:
        assert self.thawed.wait(60), "the test never thawed the store"

    def get(self, key: str) -> StoredObject:
        self._wait()
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._wait()
        return self.inner.get_range(key, offset, length)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        self._wait()
        return self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    def delete(self, key: str) -> None:
        self._wait()
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._wait()
        return self.inner.list(prefix)


async def test_a_lease_not_renewed_within_its_ttl_fences_its_writer() -> None:
    objects = MemoryObjectStore()
    create_disk(objects, "d", 16 * BS, block_size=BS)
    async with open_disk((objects, "d"), lease_ttl=0.3, lease_renew_interval=600) as disk:
        await disk.write(0, b"kept")
        await disk.flush()
        generation = disk_info(objects, "d")["generation"]
        await trio.sleep(0.4)  # no renewal came: the lease expired, though nobody took it
        await disk.write(BS, b"late")
        with pytest.raises(Fenced, match="longer than its TTL"):
            await disk.flush()
        with pytest.raises(Fenced, match="longer than its TTL"):
            await disk.store.renew_lease()  # type: ignore[attr-defined]
        assert disk_info(objects, "d")["generation"] == generation
        disk._closed = True  # it may not flush on exit either
    lease, _ = read_lease(objects, "d")
    assert lease is not None and lease["state"] == "held"  # not released: it may be stale


async def test_a_renewal_hanging_on_a_frozen_store_fences_at_the_ttl() -> None:
    """The renewal does not wait out the store's timeouts: at the lease's expiry the writer
    is fenced while the store is still frozen, and stays so once it is thawed."""
    frozen = Freezable(MemoryObjectStore())
    create_disk(frozen, "d", 16 * BS, block_size=BS)
    async with open_disk((frozen, "d"), lease_ttl=1.0, lease_renew_interval=0.2) as disk:
        await disk.write(0, b"kept")
        await disk.flush()
        generation = disk_info(frozen, "d")["generation"]
        frozen.thawed.clear()
        try:
            with trio.fail_after(20):
                while not disk.store.fenced:  # type: ignore[attr-defined]
                    await trio.sleep(0.05)
        finally:
            frozen.thawed.set()
        await disk.write(BS, b"late")
        with pytest.raises(Fenced, match="longer than its TTL"):
            await disk.flush()
        assert disk_info(frozen, "d")["generation"] == generation
        assert (await disk.read(0, 4)) == b"kept"
        disk._closed = True
