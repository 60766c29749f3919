"""The object-store contract, for every implementation (S3 against the real fixture)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockstore import (
    InvalidKey,
    LocalObjectStore,
    MemoryObjectStore,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
)
from tests.conftest import S3Endpoint


@pytest.fixture(params=["memory", "local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "memory":
        yield MemoryObjectStore()
    elif request.param == "local":
        yield LocalObjectStore(tmp_path / "store")
    else:
        s3: S3Endpoint = request.getfixturevalue("s3")
        store = s3.object_store("some/prefix")
        yield store
        store.close()


def test_put_get_range_list_delete(objects: ObjectStore) -> None:
    etag = objects.put("a/b/c", b"0123456789")
    got = objects.get("a/b/c")
    assert got.data == b"0123456789"
    assert got.etag == etag
    assert objects.get_range("a/b/c", 3, 4) == b"3456"
    assert objects.get_range("a/b/c", 8, 10) == b"89"
    objects.put("a/x", b"1")
    objects.put("b", b"2")
    assert [o.key for o in objects.list("a/")] == ["a/b/c", "a/x"]
    assert [(o.key, o.size) for o in objects.list("")] == [("a/b/c", 10), ("a/x", 1), ("b", 1)]
    objects.delete("a/x")
    objects.delete("a/x")
    with pytest.raises(ObjectNotFound):
        objects.get("a/x")
    with pytest.raises(ObjectNotFound):
        objects.get_range("nothing", 0, 1)


def test_conditional_create(objects: ObjectStore) -> None:
    objects.put("lease", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        objects.put("lease", b"two", if_none_match=True)
    assert objects.get("lease").data == b"one"


def test_compare_and_swap(objects: ObjectStore) -> None:
    e1 = objects.put("head", b"v1")
    e2 = objects.put("head", b"v2", if_match=e1)
    with pytest.raises(PreconditionFailed):
        objects.put("head", b"stale", if_match=e1)
    with pytest.raises(PreconditionFailed):
        objects.put("missing", b"x", if_match=e2)
    assert objects.get("head").data == b"v2"


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "sp ace", "nul\0"])
def test_malformed_keys_are_refused(objects: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        objects.put(key, b"x")


def _race_create(root: str, who: int, barrier: multiprocessing.synchronize.Barrier) -> bool:
    store = LocalObjectStore(root)
    barrier.wait()
    try:
        store.put("lease", str(who).encode(), if_none_match=True)
        return True
    except PreconditionFailed:
        return False


def _increment(root: str, times: int) -> int:
    store = LocalObjectStore(root)
    lost = 0
    for _ in range(times):
        while True:
            cur = store.get("counter")
            try:
                store.put("counter", str(int(cur.data) + 1).encode(), if_match=cur.etag)
                break
            except PreconditionFailed:
                lost += 1
    return lost


def test_local_conditional_ops_are_safe_between_processes(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    LocalObjectStore(root)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(6)
        with ctx.Pool(6) as pool:
            wins = pool.starmap(_race_create, [(root, i, barrier) for i in range(6)])
    assert sum(wins) == 1
    store = LocalObjectStore(root)
    store.put("counter", b"0")
    with ctx.Pool(4) as pool:
        pool.starmap(_increment, [(root, 50)] * 4)
    assert int(store.get("counter").data) == 200


def test_local_store_is_made_by_the_first_put_not_by_looking(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    objects = LocalObjectStore(root)
    with pytest.raises(ObjectNotFound):
        objects.get("a/b")
    with pytest.raises(ObjectNotFound):
        objects.get_range("a/b", 0, 1)
    assert list(objects.list()) == []
    objects.delete("a/b")
    assert not (tmp_path / "not").exists()
    with pytest.raises(ObjectNotFound):
        LocalObjectStore(root, create=False)
    objects.put("a/b", b"x", if_none_match=True)
    assert objects.get("a/b").data == b"x"
    assert LocalObjectStore(root, create=False).get("a/b").data == b"x"
