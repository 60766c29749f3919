"""Every conditional write can land and lose its reply: a writer recognises its own writes.

A wrapper around a real object store (a local directory, or the SeaweedFS fixture) fails
one chosen put as a lost reply would: after applying it, before, or with the request landing
late (just before the writer's next put of that key), optionally followed by an outage of
a few requests (so the writer cannot even look at once). The disk must go on
working: no Fenced, no lost acknowledged write, the lease released at close.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

import blockstore
from blockstore import (
    Disk,
    DiskExists,
    LocalObjectStore,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoredObject,
    StoreUnavailable,
    create_disk,
    fork_disk,
    open_disk,
)
from blockstore.lease import read_lease
from tests.conftest import S3Endpoint

BS = 4096
T = TypeVar("T")
Rule = Callable[[str, bytes, bool, str | None], bool]


APPLY_MODES = ("after", "before", "late")


class LostReplies(ObjectStore):
    """A real store whose next put matching ``rule`` (once armed) fails as if its reply was
    lost, then ``outage`` requests fail too. ``apply``: "after" applies the put first,
    "before" never, "late" just before the next put of the same key (a delayed request)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._rule: tuple[Rule, str, int] | None = None
        self._outage = 0
        self._late: tuple[str, bytes, bool, str | None] | None = None
        self.fired: list[str] = []

    def arm(self, rule: Rule, *, apply: str, outage: int) -> None:
        assert apply in APPLY_MODES
        with self._lock:
            self._rule = (rule, apply, outage)

    def _put(self, key: str, data: bytes, if_none_match: bool, if_match: str | None) -> None:
        with contextlib.suppress(PreconditionFailed):
            self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    def _request(self) -> None:
        with self._lock:
            if self._outage > 0:
                self._outage -= 1
                raise StoreUnavailable("injected outage")

    def get(self, key: str) -> StoredObject:
        self._request()
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._request()
        return self.inner.get_range(key, offset, length)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        self._request()
        with self._lock:
            rule = self._rule
            if rule is None or not rule[0](key, data, if_none_match, if_match):
                rule = None
            else:
                self._rule = None
            late = self._late if self._late and self._late[0] == key else None
            if late:
                self._late = None
        if late:
            self._put(*late)
        if rule is None:
            return self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        _, apply, outage = rule
        if apply == "after":
            self._put(key, data, if_none_match, if_match)
        with self._lock:
            if apply == "late":
                self._late = (key, data, if_none_match, if_match)
            self._outage = outage
            self.fired.append(key)
        raise StoreUnavailable(f"injected: the reply to PUT {key} was lost")

    def delete(self, key: str) -> None:
        self._request()
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._request()
        return self.inner.list(prefix)


def _head(name: str, create: bool) -> Rule:
    return lambda k, d, inm, im: k == f"disks/{name}/head" and (inm if create else im is not None)


RULES: dict[str, Rule] = {
    "disk create": _head("d", create=True),
    "lease create": lambda k, d, inm, im: k == "disks/d/lease" and inm,
    "fencing commit": _head("d", create=False),
    "pack": lambda k, d, inm, im: k.startswith("packs/"),
    "segment": lambda k, d, inm, im: k.startswith("segments/"),
    "head commit": _head("d", create=False),
    "lease renew": lambda k, d, inm, im: k == "disks/d/lease" and b'"held"' in d and bool(im),
    "checkpoint": lambda k, d, inm, im: k == "disks/d/checkpoints/cp",
    "fork": _head("f", create=True),
    "lease release": lambda k, d, inm, im: k == "disks/d/lease" and b'"released"' in d,
}

CASES = [(target, apply, 0) for target in RULES for apply in APPLY_MODES] + [
    # The store stays unreachable for a while after the lost reply: the call fails, and the
    # next one must first find out what happened.
    ("head commit", "after", 1),
    ("head commit", "before", 1),
    ("head commit", "late", 1),
    ("head commit", "after", 4),
    ("lease create", "after", 1),
    ("fencing commit", "after", 1),
    ("lease renew", "after", 1),
    ("lease renew", "before", 1),
    ("lease renew", "late", 1),
    ("checkpoint", "after", 1),
    ("fork", "before", 1),
]


async def _scenario(real: ObjectStore, target: str, apply: str, outage: int) -> None:
    objects = LostReplies(real)
    model = bytearray(64 * BS)

    def arm(step: str) -> None:
        if step == target:
            objects.arm(RULES[step], apply=apply, outage=outage)

    async def retried(step: Callable[[], Awaitable[T]]) -> T:
        """A step fails only while the injected outage lasts, then works."""
        for _ in range(6):
            try:
                return await step()
            except StoreUnavailable:
                assert objects.fired and outage, "a lost reply alone must not fail a call"
        raise AssertionError("the store came back but the call kept failing")

    async def write(disk: Disk, block: int, fill: bytes) -> None:
        data = (fill * BS)[: 4 * BS]
        await disk.write(block * BS, data)
        model[block * BS : block * BS + len(data)] = data

    arm("disk create")

    async def create() -> None:
        try:
            await trio.to_thread.run_sync(
                lambda: create_disk(objects, "d", len(model), block_size=BS)
            )
        except DiskExists:
            assert target == "disk create" and apply == "after" and outage  # it landed

    await retried(create)
    arm("lease create")
    arm("fencing commit")
    stack = contextlib.AsyncExitStack()

    async def open_it() -> Disk:
        return await stack.enter_async_context(open_disk((objects, "d"), lease_ttl=600))

    disk = await retried(open_it)
    async with stack:
        await write(disk, 0, b"A")
        for step in ("pack", "segment", "head commit"):
            arm(step)
        await retried(disk.flush)
        arm("lease renew")
        await retried(disk.store.renew_lease)  # type: ignore[attr-defined]
        await write(disk, 8, b"B")
        await retried(disk.flush)
        checkpointed = bytes(model)
        arm("checkpoint")
        await retried(lambda: disk.checkpoint("cp"))
        arm("fork")

        async def fork() -> None:
            try:
                await trio.to_thread.run_sync(lambda: fork_disk(objects, "d", "cp", "f"))
            except DiskExists:
                assert target == "fork" and apply == "after" and outage

        await retried(fork)
        await write(disk, 16, b"C")
        await retried(disk.flush)
        arm("lease release")
    assert objects.fired, f"the {target} put never happened: the test proved nothing"
    for name, expected in (("d", model), ("d@cp", checkpointed), ("f", checkpointed)):
        async with open_disk((real, name), writable=False) as check:
            assert await check.read(0, check.size) == expected, name
    lease, _ = read_lease(real, "d")
    assert lease is not None and lease["state"] == "released"


@pytest.mark.parametrize("target, apply, outage", CASES)
async def test_lost_reply_on_local_store(
    target: str, apply: str, outage: int, tmp_path: Path
) -> None:
    await _scenario(LocalObjectStore(tmp_path / "store"), target, apply, outage)


@pytest.mark.parametrize("target, apply, outage", CASES)
async def test_lost_reply_on_s3(target: str, apply: str, outage: int, s3: S3Endpoint) -> None:
    objects = s3.object_store()
    try:
        await _scenario(objects, target, apply, outage)
    finally:
        objects.close()


async def test_a_commit_that_landed_unseen_is_adopted_not_fenced(tmp_path: Path) -> None:
    """The issue's repro: the head put lands, its reply is lost, the store is then down for
    a while. Flushes fail while it is down; afterwards the writer recognises its own commit
    (same epoch, its commit id), keeps writing, and nothing acknowledged is lost."""
    objects = LostReplies(LocalObjectStore(tmp_path / "store"))
    create_disk(objects, "d", 64 * BS, block_size=BS)
    async with open_disk((objects, "d"), lease_ttl=600) as disk:
        await disk.write(0, b"1" * BS)
        objects.arm(RULES["head commit"], apply="after", outage=3)
        failures = 0
        while True:
            try:
                await disk.flush()
                break
            except StoreUnavailable:
                failures += 1
        assert failures >= 2
        store: Any = disk.store
        assert not store.fenced
        generation = store.head.generation
        await disk.write(BS, b"2" * BS)
        await disk.flush()
        assert store.head.generation == generation + 1
    async with open_disk((objects.inner, "d"), writable=False) as check:
        assert await check.read(0, 2 * BS) == b"1" * BS + b"2" * BS


def test_put_new_recognises_its_own_landed_create(tmp_path: Path) -> None:
    from blockstore.objectstore import put_new

    objects = LostReplies(LocalObjectStore(tmp_path / "store"))
    for apply in APPLY_MODES:
        key = f"x/{apply}"
        objects.arm(lambda k, d, inm, im: True, apply=apply, outage=0)
        assert put_new(objects, key, b"mine")
        assert not put_new(objects, key, b"other"), "other content is not ours"
        assert put_new(objects, key, b"mine"), "the same content again is a no-op"
    objects.arm(lambda k, d, inm, im: True, apply="after", outage=1)
    with pytest.raises(StoreUnavailable):
        put_new(objects, "y", b"mine")
    assert objects.inner.get("y").data == b"mine"


def test_lost_reply_wrapper_really_applies_or_not(tmp_path: Path) -> None:
    """The wrapper itself: applied puts are in the store, the others are not (yet)."""
    inner = LocalObjectStore(tmp_path / "store")
    objects = LostReplies(inner)
    for apply in APPLY_MODES:
        objects.arm(lambda k, d, inm, im: True, apply=apply, outage=1)
        with pytest.raises(StoreUnavailable):
            objects.put(f"k-{apply}", b"first")
        with pytest.raises(StoreUnavailable, match="outage"):
            objects.get(f"k-{apply}")
        assert any(o.key == f"k-{apply}" for o in inner.list("")) == (apply == "after")
    with pytest.raises(PreconditionFailed):  # the late one lands first, then this one
        objects.put("k-late", b"second", if_none_match=True)
    assert inner.get("k-late").data == b"first"


class Rendezvous(LocalObjectStore):
    """Once armed, a pack put and a segment put wait for each other (a barrier of two,
    so a flush that sent them one after the other fails); puts are logged in order, and
    pack puts can be made to fail (the segment's then goes on alone)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.armed = False
        self.fail_packs = False
        self.barrier = threading.Barrier(2, timeout=30)
        self.log: list[str] = []
        self.range_gets = 0

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        kind = key.split("/")[0] if key.startswith(("packs/", "segments/")) else key
        if not self.armed or kind not in ("packs", "segments", HEAD):  # leases renew any time
            return super().put(key, data, if_none_match=if_none_match, if_match=if_match)
        if kind == "packs" and self.fail_packs:
            self.log.append("packs failed")
            raise StoreUnavailable("injected: the pack put fails")
        if kind != HEAD and not self.fail_packs:
            self.log.append(f"{kind} started")
            self.barrier.wait()
        etag = super().put(key, data, if_none_match=if_none_match, if_match=if_match)
        self.log.append(kind)
        return etag

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.range_gets += 1
        return super().get_range(key, offset, length)


async def test_a_small_flush_puts_its_pack_beside_its_segment_then_the_head(
    tmp_path: Path,
) -> None:
    """A durable flush of a few small writes costs two round trips: the pack waits for the
    flush and goes up beside the segment naming it; the head follows both. Until then its
    pieces are read from memory; a failed pack put fails the flush and loses nothing."""
    objects = Rendezvous(tmp_path / "store")
    create_disk(objects, "d", 64 * BS * 16, block_size=BS * 16)
    async with open_disk((objects, "d")) as disk:
        await disk.write(0, b"\x01" * (64 * BS * 16))
        await disk.flush()
    async with open_disk((objects, "d")) as disk:
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        objects.armed = True
        await store.write_extents({3: [(100, b"new bytes")], 9: [(0, b"x" * 5000)]})
        assert objects.log == [], "a small write waits for the flush"
        gets = objects.range_gets
        layers = await store.read_layers([3])
        assert layers[3] == b"\x01" * 100 + b"new bytes" + b"\x01" * (BS * 16 - 109)
        assert objects.range_gets == gets + 1, "the old block is fetched, the extent is not"

        objects.fail_packs = True
        with pytest.raises(StoreUnavailable):
            await store.flush()
        assert "segments" in objects.log and HEAD not in objects.log, objects.log
        assert (await store.read_layers([9]))[9] == b"x" * 5000 + b"\x01" * (BS * 16 - 5000)
        objects.log.clear()
        objects.fail_packs = False
        await store.flush()
        assert set(objects.log[:2]) == {"packs started", "segments started"}, objects.log
        assert objects.log[-1] == HEAD and objects.log.count(HEAD) == 1, objects.log
    async with open_disk((objects, "d"), writable=False) as disk:
        assert await disk.read(3 * BS * 16 + 100, 9) == b"new bytes"
        assert await disk.read(9 * BS * 16, 5001) == b"x" * 5000 + b"\x01"


HEAD = "disks/d/head"
