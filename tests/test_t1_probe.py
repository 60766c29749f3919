"""The conditional-write probe: real stores pass it, stores that get any step wrong are
refused with one line naming the guarantee they lack, and the verdict costs one round of
requests per store (saved in the store, remembered by the process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import blockstore
from blockstore import (
    LocalObjectStore,
    MemoryObjectStore,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    S3ObjectStore,
    StoredObject,
    StoreRejected,
    StoreUnavailable,
    UnsafeStore,
    check_conditional_writes,
    create_disk,
    force_release,
)
from blockstore.probe import (
    COMPARE_AND_SWAP,
    CREATE_ONLY,
    PROBE_PREFIX,
    VERDICT_KEY,
    CheckedObjectStore,
    forget_verdicts,
    probe_conditional_writes,
)
from tests.conftest import S3Endpoint
from tests.test_t1_objectstore import KINDS, S3_KINDS, open_kind, s3_endpoint


class Wrapper(ObjectStore):
    """A user's store around a real one, counting requests; subclasses get puts wrong."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.requests: list[str] = []
        self.conditional = 0
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.requests.append(what)

    def get(self, key: str) -> StoredObject:
        self._count("get")
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._count("get")
        return self.inner.get_range(key, offset, length)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        self._count("put")
        if not (if_none_match or if_match is not None):
            return self.inner.put(key, data)
        with self._lock:
            self.conditional += 1
            n = self.conditional
        return self.conditional_put(n, key, data, if_none_match, if_match)

    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        return self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    def delete(self, key: str) -> None:
        self._count("delete")
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def location(self) -> str | None:
        return self.inner.location()

    def _holds(self, key: str, if_none_match: bool, if_match: str | None) -> bool:
        try:
            current: str | None = self.inner.get(key).etag
        except ObjectNotFound:
            current = None
        return current is None if if_none_match else current is not None and current == if_match


class DropsConditions(Wrapper):
    """Forgets the conditions: every put is a plain put (as a store ignoring the headers)."""

    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        return self.inner.put(key, data)


class WrongOnce(Wrapper):
    """Gets one conditional put wrong, the ``wrong``-th: it wins where it should lose
    (writes without the condition) and loses where it should win (writes nothing)."""

    def __init__(self, inner: ObjectStore, wrong: int) -> None:
        super().__init__(inner)
        self.wrong = wrong

    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        if n != self.wrong:
            return super().conditional_put(n, key, data, if_none_match, if_match)
        if self._holds(key, if_none_match, if_match):
            raise PreconditionFailed(key)
        return self.inner.put(key, data)


class SaysLostButWrites(Wrapper):
    """Applies every put, and answers 'lost' where the condition did not hold."""

    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        holds = self._holds(key, if_none_match, if_match)
        etag = self.inner.put(key, data)
        if not holds:
            raise PreconditionFailed(key)
        return etag


class RejectsHeaders(Wrapper):
    """Answers conditional puts as an old appliance does: 501 Not Implemented."""

    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        raise StoreRejected("s3://old/: PutObject refused: NotImplemented", "NotImplemented")


@pytest.fixture(autouse=True)
def _fresh_process_cache() -> Iterator[None]:
    forget_verdicts()
    yield
    forget_verdicts()


@pytest.fixture(params=KINDS)
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    store = open_kind(request.param, request, tmp_path)
    yield store
    store.close()


def test_every_implementation_passes_and_leaves_only_its_verdict(objects: ObjectStore) -> None:
    verdict = probe_conditional_writes(objects)
    assert verdict.ok and verdict.guarantee is None, verdict
    assert list(objects.list(PROBE_PREFIX)) == [], "the probe cleans up after itself"
    checked = check_conditional_writes(objects)
    assert checked.ok and checked.source == "probe" and checked.saved
    assert [o.key for o in objects.list()] == [VERDICT_KEY]
    saved = json.loads(objects.get(VERDICT_KEY).data)
    assert saved["conditional_writes"] == "honoured"
    assert saved["where"] == (objects.location() or objects.describe())


def test_a_store_that_drops_the_conditions_is_refused_with_one_line() -> None:
    verdict = check_conditional_writes(DropsConditions(MemoryObjectStore()))
    assert not verdict.ok
    assert verdict.guarantee == CREATE_ONLY
    message = str(verdict.refusal())
    assert "If-None-Match: *" in message and "a second create-only put" in message
    assert "two writers could both commit" in message and "lanekit s3 check" in message
    assert "\n" not in message


STEPS = [
    (1, CREATE_ONLY, "a create-only put of a new key was refused"),
    (2, CREATE_ONLY, "a second create-only put of the same key succeeded"),
    (3, COMPARE_AND_SWAP, "a put with the etag the previous put returned was refused"),
    (4, COMPARE_AND_SWAP, "a put with a stale etag succeeded"),
    (5, COMPARE_AND_SWAP, "a put with the etag a get returned was refused"),
    (6, COMPARE_AND_SWAP, "a put with If-Match of a key that does not exist succeeded"),
]


@pytest.mark.parametrize("wrong, guarantee, detail", STEPS)
def test_a_store_wrong_on_a_single_step_is_refused_naming_it(
    wrong: int, guarantee: str, detail: str, tmp_path: Path
) -> None:
    store = WrongOnce(LocalObjectStore(tmp_path / "store"), wrong)
    verdict = check_conditional_writes(store)
    assert (verdict.guarantee, verdict.detail.split(" as if")[0]) == (guarantee, detail)
    assert store.conditional == wrong, "the probe stops at the first wrong answer"
    assert list(store.inner.list(PROBE_PREFIX)) == [], "and cleans up"


def test_the_same_store_right_on_every_step_passes(tmp_path: Path) -> None:
    store = WrongOnce(LocalObjectStore(tmp_path / "store"), wrong=0)
    assert check_conditional_writes(store).ok
    assert store.conditional == len(STEPS)


def test_a_store_that_answers_lost_but_writes_anyway_is_refused() -> None:
    verdict = check_conditional_writes(SaysLostButWrites(MemoryObjectStore()))
    assert verdict.guarantee == CREATE_ONLY
    assert "answered as lost but replaced the object" in verdict.detail


def test_a_store_that_does_not_implement_the_headers_is_refused() -> None:
    verdict = check_conditional_writes(RejectsHeaders(MemoryObjectStore()))
    assert verdict.guarantee == CREATE_ONLY
    assert "NotImplemented" in verdict.detail


class Unreachable(Wrapper):
    def conditional_put(
        self, n: int, key: str, data: bytes, if_none_match: bool, if_match: str | None
    ) -> str:
        raise StoreUnavailable("injected outage")


def test_an_unreachable_store_gets_no_verdict_and_is_probed_again() -> None:
    inner = MemoryObjectStore()
    with pytest.raises(StoreUnavailable):
        check_conditional_writes(Unreachable(inner))
    assert check_conditional_writes(inner).source == "probe"


# ---------------------------------------------------------------- caching


def test_a_pass_costs_one_round_per_store_then_one_read_then_nothing(
    request: pytest.FixtureRequest,
) -> None:
    """Per bucket and prefix: saved in the store (one read from a new process), remembered
    in this one (no request)."""
    for kind in S3_KINDS:
        s3: S3Endpoint = s3_endpoint(request, kind)
        bucket = s3.new_bucket()
        first = Wrapper(S3ObjectStore(bucket, "lanes", client=s3.client()))
        assert check_conditional_writes(first).source == "probe"
        assert first.conditional == len(STEPS)
        forget_verdicts()  # as a new process would
        second = Wrapper(S3ObjectStore(bucket, "lanes", client=s3.client()))
        assert check_conditional_writes(second).source == "store"
        assert second.requests == ["get"]
        third = Wrapper(S3ObjectStore(bucket, "lanes", client=s3.client()))
        assert check_conditional_writes(third).source == "process"
        assert third.requests == []
        other = Wrapper(S3ObjectStore(bucket, "other-prefix", client=s3.client()))
        assert check_conditional_writes(other).source == "probe"
        assert check_conditional_writes(second, fresh=True).source == "probe"


def test_a_saved_pass_from_elsewhere_or_unreadable_is_not_trusted(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    assert check_conditional_writes(store).ok
    record = json.loads(store.get(VERDICT_KEY).data)
    for damaged in (
        json.dumps(dict(record, where="http://another-service/bucket/")).encode(),
        b"not json",
        json.dumps(dict(record, format=99)).encode(),
    ):
        forget_verdicts()
        store.put(VERDICT_KEY, damaged)
        assert check_conditional_writes(store).source == "probe"


class CannotSaveVerdicts(Wrapper):
    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if key == VERDICT_KEY:
            raise StoreRejected("s3://b/: PutObject refused: AccessDenied", "AccessDenied")
        return super().put(key, data, if_none_match=if_none_match, if_match=if_match)


def test_a_pass_that_cannot_be_saved_still_passes_and_says_so() -> None:
    store = CannotSaveVerdicts(MemoryObjectStore())
    verdict = check_conditional_writes(store)
    assert verdict.ok and not verdict.saved
    forget_verdicts()
    assert check_conditional_writes(store).source == "probe"


def test_a_refusal_removes_a_saved_pass(tmp_path: Path) -> None:
    """A bucket copied to a service that ignores the conditions, with the same name."""
    inner = LocalObjectStore(tmp_path / "store")
    assert check_conditional_writes(inner).ok
    forget_verdicts()
    assert not check_conditional_writes(DropsConditions(inner), fresh=True).ok
    with pytest.raises(ObjectNotFound):
        inner.get(VERDICT_KEY)


def test_threads_racing_for_the_first_conditional_put_run_one_probe() -> None:
    user = Wrapper(MemoryObjectStore())
    store = CheckedObjectStore(user)
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        store.put(f"packs/{i}", b"x", if_none_match=True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(8)))
    assert user.conditional == len(STEPS) + 8
    assert user.requests.count("put") == len(STEPS) + 8 + 1  # and the verdict, once


# ---------------------------------------------------------------- where it is hooked


def test_stores_are_checked_where_disks_are_opened_unless_trusted_by_construction(
    tmp_path: Path, s3: S3Endpoint
) -> None:
    memory, local = MemoryObjectStore(), LocalObjectStore(tmp_path / "store")
    assert blockstore.resolve((memory, "d"))[0] is memory
    assert blockstore.resolve((local, "d"))[0] is local
    assert isinstance(blockstore.resolve(f"file://{tmp_path}/store/d")[0], LocalObjectStore)
    user = Wrapper(memory)
    checked, _, _ = blockstore.resolve((user, "d"))
    assert isinstance(checked, CheckedObjectStore) and checked.inner is user
    assert blockstore.resolve((checked, "d"))[0] is checked
    url = f"s3://{s3.new_bucket()}/lanes/d"
    assert isinstance(blockstore.resolve(url, s3.endpoint)[0], CheckedObjectStore)
    with pytest.raises(ObjectNotFound):
        checked.get("reads/need/no/probe")
    assert user.conditional == 0


async def test_create_and_a_writable_open_refuse_an_unsafe_store_and_write_nothing() -> None:
    inner = MemoryObjectStore()
    unsafe = DropsConditions(inner)
    with pytest.raises(UnsafeStore) as caught:
        await blockstore.create((unsafe, "d"), 1 << 20)
    assert "If-None-Match" in str(caught.value)
    assert list(inner.list("disks/")) == []
    forget_verdicts()
    create_disk(inner, "d", 1 << 20)
    with pytest.raises(UnsafeStore):
        async with blockstore.open_disk((DropsConditions(inner), "d")):
            pass
    with pytest.raises(ObjectNotFound):
        inner.get("disks/d/lease")
    async with blockstore.open_disk((DropsConditions(inner), "d"), writable=False) as disk:
        assert await disk.read(0, 4) == bytes(4)


def test_after_a_refusal_every_request_is_refused_so_no_retry_hides_it() -> None:
    """force_release retries a put that raised; it reported 'the lease kept changing'."""
    inner = MemoryObjectStore()
    create_disk(inner, "d", 1 << 20)
    inner.put("disks/d/lease", json.dumps({"state": "held"}).encode())
    store = CheckedObjectStore(DropsConditions(inner))
    with pytest.raises(UnsafeStore):
        force_release(store, "d")
    for call in (lambda: store.get("disks/d/head"), lambda: list(store.list())):
        with pytest.raises(UnsafeStore):
            call()
