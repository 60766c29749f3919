"""The object-store contract, one suite for every implementation: memory, a local
directory, S3 on SeaweedFS and on moto (two independent servers on loopback), and a store
a user could have written from the README ("Writing your own storage")."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from blockstore import (
    InvalidKey,
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
)
from tests.conftest import S3Endpoint
from tools.s3server import S3Server


class SQLiteObjectStore(ObjectStore):
    """What a user could write from the README: objects in one SQLite table, each put's
    condition checked and applied in one transaction."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS objects"
            " (key TEXT PRIMARY KEY, data BLOB NOT NULL, etag TEXT NOT NULL, mtime REAL)"
        )
        self._lock = threading.Lock()

    def get(self, key: str) -> StoredObject:
        with self._lock:
            row = self._db.execute("SELECT data, etag FROM objects WHERE key = ?", (key,))
            found = row.fetchone()
        if found is None:
            raise ObjectNotFound(key)
        return StoredObject(bytes(found[0]), found[1])

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key).data[offset : offset + length]

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        etag = uuid.uuid4().hex
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT etag FROM objects WHERE key = ?", (key,))
                current = row.fetchone()
                if (if_none_match and current is not None) or (
                    if_match is not None and (current is None or current[0] != if_match)
                ):
                    raise PreconditionFailed(key)
                self._db.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?)",
                    (key, data, etag, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return etag

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE key = ?", (key,))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, length(data), mtime FROM objects WHERE key >= ? ORDER BY key",
                (prefix,),
            ).fetchall()
        for key, size, mtime in rows:
            if not key.startswith(prefix):
                break
            yield ObjectInfo(key, size, mtime)

    def close(self) -> None:
        self._db.close()


SHIPPED = ["memory", "local", "s3-seaweedfs", "s3-moto"]
KINDS = [*SHIPPED, "user-written"]
S3_KINDS = ["s3-seaweedfs", "s3-moto"]


def s3_endpoint(request: pytest.FixtureRequest, kind: str) -> S3Endpoint:
    endpoint: S3Endpoint = request.getfixturevalue("s3" if kind == "s3-seaweedfs" else "moto_s3")
    return endpoint


def open_kind(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh, empty store of that kind (S3 ones in a new bucket, under a prefix)."""
    if kind == "memory":
        return MemoryObjectStore()
    if kind == "local":
        return LocalObjectStore(tmp_path / "store")
    if kind == "user-written":
        return SQLiteObjectStore(tmp_path / "objects.sqlite")
    return s3_endpoint(request, kind).object_store("some/prefix")


@pytest.fixture(params=KINDS)
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    store = open_kind(request.param, request, tmp_path)
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
@pytest.mark.parametrize("objects", SHIPPED, indirect=True)
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


# ---------------------------------------------------------------- the conformance suite


def test_ranged_gets_past_the_end(objects: ObjectStore) -> None:
    objects.put("r", b"0123456789")
    assert objects.get_range("r", 0, 10) == b"0123456789"
    assert objects.get_range("r", 9, 1) == b"9"
    assert objects.get_range("r", 9, 100) == b"9"
    assert objects.get_range("r", 10, 1) == b""
    assert objects.get_range("r", 11, 5) == b""
    assert objects.get_range("r", 1 << 40, 1) == b""
    with pytest.raises(ObjectNotFound):
        objects.get_range("missing", 5, 5)


def test_empty_objects(objects: ObjectStore) -> None:
    etag = objects.put("empty", b"", if_none_match=True)
    got = objects.get("empty")
    assert (got.data, got.etag) == (b"", etag)
    assert objects.get_range("empty", 0, 10) == b""
    assert [(o.key, o.size) for o in objects.list("empty")] == [("empty", 0)]
    objects.put("empty", b"now something", if_match=etag)
    assert objects.get("empty").data == b"now something"


def test_large_objects(objects: ObjectStore) -> None:
    """Bigger than any pack lanekit writes (4 MiB by default); one put, no multipart."""
    data = random.Random(7).randbytes(12 << 20)
    etag = objects.put("big", data, if_none_match=True)
    got = objects.get("big")
    assert got.data == data and got.etag == etag
    assert objects.get_range("big", (6 << 20) - 3, 1 << 20) == data[(6 << 20) - 3 : (7 << 20) - 3]
    assert objects.get_range("big", len(data) - 5, 100) == data[-5:]
    assert [(o.key, o.size) for o in objects.list("big")] == [("big", len(data))]


def test_listing_with_prefixes_and_more_than_one_page(objects: ObjectStore) -> None:
    """S3 answers a listing in pages of at most 1,000 keys: every page is read, in order.
    Keys that continue a prefix with '/' and with a lower character ('-', '.') are listed
    in another order by SeaweedFS ('a', 'a/1', 'a-b'; S3 and the others: 'a-b', 'a/1'), so
    only their set is compared; lanekit sorts where order matters. A key cannot be both an
    object and a "directory" of others in a local directory, so none here is."""
    keys = [f"many/{i:05d}" for i in range(1050)]
    others = ["man", "many-not/x", "many.x", "manz/y", "other/z"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: objects.put(k, k.encode()), [*keys, *others]))
    listed = list(objects.list("many/"))
    assert [o.key for o in listed] == keys
    assert all(o.size == len(o.key) for o in listed)
    assert [o.key for o in objects.list("many/0104")] == [f"many/0104{i}" for i in range(10)]
    assert sorted(o.key for o in objects.list("many")) == sorted(["many-not/x", "many.x", *keys])
    assert sorted(o.key for o in objects.list()) == sorted([*keys, *others])
    assert list(objects.list("nothing/")) == []


def test_deletes_of_missing_keys_are_not_errors(objects: ObjectStore) -> None:
    objects.delete("never/was")
    objects.put("once", b"x")
    objects.delete("once")
    objects.delete("once")
    with pytest.raises(ObjectNotFound):
        objects.get("once")
    assert list(objects.list()) == []


def test_conditional_puts_and_their_errors(objects: ObjectStore) -> None:
    """Every way a condition loses is PreconditionFailed, whatever the service answered."""
    first = objects.put("k", b"one", if_none_match=True)
    assert objects.get("k").etag == first
    for data in (b"one", b"two"):
        with pytest.raises(PreconditionFailed):
            objects.put("k", data, if_none_match=True)
    second = objects.put("k", b"two", if_match=first)
    for stale in (first, "0" * 32, '"0123"', "nonsense"):
        with pytest.raises(PreconditionFailed):
            objects.put("k", b"stale", if_match=stale)
    assert objects.get("k") == StoredObject(b"two", second)
    read = objects.get("k").etag
    third = objects.put("k", b"three", if_match=read)
    with pytest.raises(PreconditionFailed):
        objects.put("absent", b"x", if_match=third)
    with pytest.raises(ObjectNotFound):
        objects.get("absent")
    objects.delete("k")
    with pytest.raises(PreconditionFailed):
        objects.put("k", b"after delete", if_match=third)
    objects.put("k", b"again", if_none_match=True)
    assert objects.get("k").data == b"again"


def test_concurrent_conditional_puts_have_exactly_one_winner(objects: ObjectStore) -> None:
    """Several threads race a create-only put of one key, then a replace with the same
    etag: one wins each time. (SeaweedFS makes the losers of a contended key wait in steps
    of a second, hence the small numbers.)"""
    threads, rounds = 4, 4
    barrier = threading.Barrier(threads)

    def race(key: str, data: bytes, etag: str | None) -> bool:
        barrier.wait()
        try:
            if etag is None:
                objects.put(key, data, if_none_match=True)
            else:
                objects.put(key, data, if_match=etag)
        except PreconditionFailed:
            return False
        return True

    with ThreadPoolExecutor(threads) as pool:
        for r in range(rounds):
            key, etag = f"race/{r}", None
            for form in ("If-None-Match", "If-Match"):
                bodies = [f"{form} {r} {i}".encode() for i in range(threads)]
                won = list(pool.map(race, [key] * threads, bodies, [etag] * threads))
                assert won.count(True) == 1, f"round {r}, {form}: {won.count(True)} winners"
                current = objects.get(key)
                assert current.data == bodies[won.index(True)]
                etag = current.etag


# ---------------------------------------------------------------- S3 services


@pytest.fixture(params=S3_KINDS)
def s3_any(request: pytest.FixtureRequest) -> S3Endpoint:
    return s3_endpoint(request, request.param)


def _is_seaweedfs(endpoint: S3Endpoint) -> bool:
    return isinstance(endpoint.server, S3Server)


def _raw_status(client: object, **kwargs: object) -> tuple[int, str]:
    from botocore.exceptions import ClientError

    try:
        client.put_object(**kwargs)  # type: ignore[attr-defined]
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"]
    return 200, ""


def test_services_answer_a_lost_condition_differently(s3_any: S3Endpoint) -> None:
    """Known differences the mapping covers: If-Match of a missing key is 404 on moto and
    AWS, 412 on SeaweedFS; a taken key under If-None-Match is 412 on both."""
    client, bucket = s3_any.client(), s3_any.new_bucket()
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    missing = _raw_status(client, Bucket=bucket, Key="absent", Body=b"x", IfMatch='"0"')
    expected = (
        (412, "PreconditionFailed")
        if s3_any.server.__class__.__name__ == "S3Server"
        else (404, "NoSuchKey")
    )
    assert missing == expected
    assert _raw_status(client, Bucket=bucket, Key="k", Body=b"y", IfNoneMatch="*")[0] == 412
    store = S3ObjectStore(bucket, client=client)
    with pytest.raises(PreconditionFailed):
        store.put("absent", b"x", if_match='"0"')
    with pytest.raises(PreconditionFailed):
        store.put("k", b"y", if_none_match=True)


def test_a_missing_bucket_is_one_clear_error_not_a_missing_key(s3_any: S3Endpoint) -> None:
    """It was read as a missing object: a get said 'not found', a delete 'done'. A put is
    refused too on moto (and AWS); SeaweedFS makes the bucket instead."""
    store = S3ObjectStore(f"nope-{uuid.uuid4().hex[:12]}", "p", client=s3_any.client())
    calls = {
        "get": lambda: store.get("k"),
        "get_range": lambda: store.get_range("k", 0, 1),
        "delete": lambda: store.delete("k"),
        "list": lambda: list(store.list("")),
    }
    if not _is_seaweedfs(s3_any):
        calls["put"] = lambda: store.put("k", b"x")
        calls["create"] = lambda: store.put("k", b"x", if_none_match=True)
        calls["replace"] = lambda: store.put("k", b"x", if_match='"0"')
    for name, call in calls.items():
        with pytest.raises(StoreRejected) as caught:
            call()
        assert caught.value.code == "NoSuchBucket", name
        assert "does not exist" in str(caught.value) and "\n" not in str(caught.value)
    if _is_seaweedfs(s3_any):
        store.put("k", b"x", if_none_match=True)
        assert store.get("k").data == b"x"


def test_wrong_credentials_are_one_clear_error(s3: S3Endpoint) -> None:
    """SeaweedFS checks credentials (moto's server accepts any)."""
    import boto3

    kwargs = dict(s3.client_kwargs, aws_secret_access_key="wrong")
    store = S3ObjectStore(s3.new_bucket(), client=boto3.client("s3", **kwargs))
    for call in (lambda: store.get("k"), lambda: store.put("k", b"x"), lambda: list(store.list())):
        with pytest.raises(StoreRejected) as caught:
            call()
        assert caught.value.code == "SignatureDoesNotMatch"
        assert "check the credentials" in str(caught.value)


def _cut_after_headers(
    upstream: tuple[str, int], ready: threading.Event, after_continue: bool = False
) -> tuple[int, Any]:
    """A loopback relay that passes each request's headers to ``upstream`` and then ends
    both connections, as a writer killed between its headers and its body would; with
    ``after_continue``, once the server's "100 Continue" has reached the writer."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        ready.set()
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client, socket.create_connection(upstream) as server:
                head = b""
                while b"\r\n\r\n" not in head:
                    part = client.recv(65536)
                    if not part:
                        break
                    head += part
                server.sendall(head.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
                if after_continue:
                    client.sendall(server.recv(65536))
                    time.sleep(0.05)
                    server.shutdown(socket.SHUT_WR)  # the body never comes: end of stream
                time.sleep(0.2)  # the server has the headers; now the writer dies

    threading.Thread(target=serve, daemon=True).start()
    return port, listener


@pytest.mark.parametrize("after_continue", [False, True], ids=["before-100", "after-100"])
def test_a_put_cut_before_its_body_changes_nothing(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, after_continue: bool
) -> None:
    """A writer killed between a PUT's headers and its body changes nothing. This matters:
    SeaweedFS replaces an object with an empty one when a bare PUT's connection ends before
    its first body byte (seen with a raw client, payload hash or not). Our client is safe
    because botocore sends ``Expect: 100-continue`` (the server reads no body it was not
    sent) and a signed payload hash; this test guards that. Cut after the server's
    "100 Continue" (a writer killed just before its first body byte), SeaweedFS empties the
    object all the same unless the put carries Content-MD5 (the crash test found it: a
    disk whose head was emptied)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3.new_bucket()
    direct = S3ObjectStore(bucket, client=s3.client())
    etag = direct.put("head", b"committed head")
    ready = threading.Event()
    host, _, port = s3.endpoint.removeprefix("http://").partition(":")
    relay_port, listener = _cut_after_headers((host, int(port)), ready, after_continue)
    ready.wait(5)
    cut = S3ObjectStore(
        bucket, endpoint_url=f"http://127.0.0.1:{relay_port}", max_attempts=1, read_timeout=5
    )
    try:
        with pytest.raises(StoreUnavailable):
            cut.put("head", b"a new head that never arrives", if_match=etag)
        assert direct.get("head").data == b"committed head"
        with pytest.raises(StoreUnavailable):
            cut.put("new", b"never arrives", if_none_match=True)
        with pytest.raises(ObjectNotFound):
            direct.get("new")
    finally:
        listener.close()
