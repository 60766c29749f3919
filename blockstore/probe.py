"""Refuse an object store that does not honour conditional writes, before it is written.

Leases, fencing and commits rest on one property of the store: ``If-None-Match: *`` and
``If-Match`` are honoured. A store that ignores them lets two writers both "win" without a
single error. The probe proves the answers on a probe object of its own, in one round of
requests; a pass is remembered in the store itself (:data:`VERDICT_KEY`, under the store's
prefix like ``disks/``), so a later open costs one read, and in this process, so it costs
none. Stores opened by URL or through :func:`blockstore.resolve` are wrapped in
:class:`CheckedObjectStore`, which runs the check before its first conditional put.

The probe checks answers, one request at a time, not atomicity under load: a store that
checks a condition and then writes without a lock passes it (moto's threaded server does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import BlockStoreError, ObjectNotFound, PreconditionFailed, StoreUnavailable
from .objectstore import (
    LocalObjectStore,
    MemoryObjectStore,
    ObjectInfo,
    ObjectStore,
    StoredObject,
    StoreRejected,
)

log = logging.getLogger(__name__)

PROBE_PREFIX = "probe/"
VERDICT_KEY = f"{PROBE_PREFIX}conditional-writes"
"""A pass, saved in the store: JSON naming where it was checked (a copy of the bucket on
another service is probed again)."""
_VERDICT_FORMAT = 1

CREATE_ONLY = "create-only puts (If-None-Match: *)"
COMPARE_AND_SWAP = "compare-and-swap puts (If-Match)"

ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "NoSuchBucket",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
    }
)
"""Rejections that say nothing about conditional writes (credentials, bucket, region):
the probe reports them as they are, not as a verdict."""

_TRUSTED = (MemoryObjectStore, LocalObjectStore)
"""Stores that honour the conditions by construction (exactly these classes: a subclass
may override put)."""


class UnsafeStore(BlockStoreError):
    """The store does not honour a conditional write the leases and commits depend on."""

    def __init__(self, store: str, guarantee: str, detail: str) -> None:
        super().__init__(
            f"{store} is refused: it does not honour {guarantee}: {detail}. Leases, fencing "
            "and commits depend on it (two writers could both commit and corrupt a disk): "
            "use a store that honours If-None-Match: * and If-Match, and check it with "
            "`lanekit s3 check URL`"
        )
        self.store = store
        self.guarantee = guarantee
        self.detail = detail


@dataclass(frozen=True)
class Verdict:
    store: str
    guarantee: str | None
    """The guarantee the store lacks; None when it passed."""
    detail: str = ""
    source: str = "probe"
    """Where the verdict came from: "probe" (just now), "store" (a saved pass) or
    "process" (remembered by this process)."""
    saved: bool = False
    """A pass is saved in the store (a failure to save one only costs a probe next time)."""

    @property
    def ok(self) -> bool:
        return self.guarantee is None

    def refusal(self) -> UnsafeStore:
        assert self.guarantee is not None
        return UnsafeStore(self.store, self.guarantee, self.detail)


class _Refused(Exception):
    def __init__(self, guarantee: str, detail: str) -> None:
        super().__init__(detail)
        self.guarantee = guarantee
        self.detail = detail


def _passes_through(e: Exception) -> bool:
    """Errors that are no verdict: the store is unreachable or the access is wrong."""
    return isinstance(e, StoreUnavailable) or (
        isinstance(e, StoreRejected) and e.code in ACCESS_CODES
    )


def _must_succeed(guarantee: str, what: str, put: Callable[[], str]) -> str:
    try:
        return put()
    except PreconditionFailed:
        raise _Refused(guarantee, f"{what} was refused as if it lost a race") from None
    except Exception as e:
        if _passes_through(e):
            raise
        raise _Refused(guarantee, f"{what} failed: {e}") from None


def _must_lose(guarantee: str, what: str, put: Callable[[], str]) -> None:
    try:
        put()
    except PreconditionFailed:
        return
    except Exception as e:
        if _passes_through(e):
            raise
        raise _Refused(guarantee, f"{what} failed instead of losing: {e}") from None
    raise _Refused(guarantee, f"{what} succeeded")


def _expect(objects: ObjectStore, key: str, data: bytes, guarantee: str, what: str) -> str:
    """The etag of ``key``, which must hold ``data`` after ``what``."""
    try:
        current = objects.get(key)
    except ObjectNotFound:
        raise _Refused(guarantee, f"the object was gone after {what}") from None
    if current.data != data:
        raise _Refused(guarantee, f"{what} was answered as lost but replaced the object")
    return current.etag


def probe_conditional_writes(objects: ObjectStore) -> Verdict:
    """Run the probe now, on a probe object of its own (no caches): a create-only put of a
    new key (must succeed), again (must lose), a replace with the etag the put returned
    (must succeed), with that etag again, now stale (must lose), with the etag a get
    returned (must succeed: lanekit uses both), and an If-Match put of a missing key (must
    lose); every lost put must have left the object as it was. Raises StoreUnavailable or
    StoreRejected when the store cannot be reached or used at all (no verdict then)."""
    run = uuid.uuid4().hex
    key, absent = f"{PROBE_PREFIX}run-{run}", f"{PROBE_PREFIX}run-{run}-absent"
    body = [f"lanekit conditional-write probe {run} #{i}\n".encode() for i in range(5)]
    try:
        first = _must_succeed(
            CREATE_ONLY,
            "a create-only put of a new key",
            lambda: objects.put(key, body[0], if_none_match=True),
        )
        _must_lose(
            CREATE_ONLY,
            "a second create-only put of the same key",
            lambda: objects.put(key, body[1], if_none_match=True),
        )
        _expect(objects, key, body[0], CREATE_ONLY, "a second create-only put")
        _must_succeed(
            COMPARE_AND_SWAP,
            "a put with the etag the previous put returned",
            lambda: objects.put(key, body[2], if_match=first),
        )
        _must_lose(
            COMPARE_AND_SWAP,
            "a put with a stale etag",
            lambda: objects.put(key, body[3], if_match=first),
        )
        read = _expect(objects, key, body[2], COMPARE_AND_SWAP, "a put with a stale etag")
        _must_succeed(
            COMPARE_AND_SWAP,
            "a put with the etag a get returned",
            lambda: objects.put(key, body[4], if_match=read),
        )
        _must_lose(
            COMPARE_AND_SWAP,
            "a put with If-Match of a key that does not exist",
            lambda: objects.put(absent, body[0], if_match=first),
        )
        try:
            objects.get(absent)
        except ObjectNotFound:
            pass
        else:
            raise _Refused(
                COMPARE_AND_SWAP,
                "a put with If-Match of a key that does not exist was answered as lost "
                "but created it",
            )
    except _Refused as refused:
        return Verdict(objects.describe(), refused.guarantee, refused.detail)
    finally:
        for leftover in (key, absent):
            try:
                objects.delete(leftover)
            except Exception as e:
                log.debug("could not delete the probe object %s: %s", leftover, e)
    return Verdict(objects.describe(), None)


# ---------------------------------------------------------------- caches

_lock = threading.Lock()
_by_location: dict[str, Verdict] = {}
_by_store: weakref.WeakKeyDictionary[ObjectStore, Verdict] = weakref.WeakKeyDictionary()


def _remembered(objects: ObjectStore) -> Verdict | None:
    location = objects.location()
    with _lock:
        if location is not None:
            return _by_location.get(location)
        try:
            return _by_store.get(objects)
        except TypeError:  # a store that is not hashable is not remembered
            return None


def _remember(objects: ObjectStore, verdict: Verdict) -> None:
    location = objects.location()
    with _lock:
        if location is not None:
            _by_location[location] = verdict
        else:
            with contextlib.suppress(TypeError):
                _by_store[objects] = verdict


def forget_verdicts() -> None:
    """Drop what this process remembers (the verdicts saved in stores stay)."""
    with _lock:
        _by_location.clear()
        _by_store.clear()


def _where(objects: ObjectStore) -> str:
    return objects.location() or objects.describe()


def _saved_pass(objects: ObjectStore) -> bool:
    try:
        saved = json.loads(objects.get(VERDICT_KEY).data)
    except ObjectNotFound:
        return False
    except ValueError:
        return False
    return (
        isinstance(saved, dict)
        and saved.get("format") == _VERDICT_FORMAT
        and saved.get("conditional_writes") == "honoured"
        and saved.get("where") == _where(objects)
    )


def _save(objects: ObjectStore, verdict: Verdict) -> bool:
    """Save a pass, or remove a saved one after a refusal; whether a pass is saved now (a
    failure is only logged: the next open probes again)."""
    try:
        if verdict.ok:
            record = {
                "format": _VERDICT_FORMAT,
                "conditional_writes": "honoured",
                "where": _where(objects),
                "checked_at": time.time(),
                "checked_by": socket.gethostname(),
            }
            objects.put(VERDICT_KEY, json.dumps(record, sort_keys=True).encode())
            return True
        objects.delete(VERDICT_KEY)
    except Exception as e:
        log.debug("could not save the conditional-write verdict of %s: %s", verdict.store, e)
    return False


def check_conditional_writes(objects: ObjectStore, *, fresh: bool = False) -> Verdict:
    """Whether ``objects`` honours conditional writes: remembered by this process, else a
    pass saved in the store, else the probe (whose pass is then saved). ``fresh`` probes
    in any case. Raises StoreUnavailable or StoreRejected when the store cannot be used."""
    if isinstance(objects, CheckedObjectStore):
        objects = objects.inner
    if not fresh:
        remembered = _remembered(objects)
        if remembered is not None:
            return dataclasses.replace(remembered, source="process")
        if _saved_pass(objects):
            verdict = Verdict(objects.describe(), None, source="store", saved=True)
            _remember(objects, verdict)
            return verdict
    verdict = probe_conditional_writes(objects)
    verdict = dataclasses.replace(verdict, saved=_save(objects, verdict))
    _remember(objects, verdict)
    return verdict


# ---------------------------------------------------------------- the wrapper


class CheckedObjectStore(ObjectStore):
    """``inner``, checked before its first conditional put (reads never need it).

    A refused store refuses every request after that, reads included, so that no retry
    loop around a put takes the refusal for a lost reply and reports something else.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self._verdict: Verdict | None = None
        self._lock = threading.Lock()

    def require(self) -> Verdict:
        """The verdict, checked now if not yet; raises UnsafeStore if refused."""
        verdict = self._verdict
        if verdict is None:
            with self._lock:
                if self._verdict is None:
                    self._verdict = check_conditional_writes(self.inner)
                verdict = self._verdict
        if not verdict.ok:
            raise verdict.refusal()
        return verdict

    def _usable(self) -> None:
        verdict = self._verdict
        if verdict is not None and not verdict.ok:
            raise verdict.refusal()

    def get(self, key: str) -> StoredObject:
        self._usable()
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._usable()
        return self.inner.get_range(key, offset, length)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if if_none_match or if_match is not None:
            self.require()
        else:
            self._usable()
        return self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    def delete(self, key: str) -> None:
        self._usable()
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._usable()
        return self.inner.list(prefix)

    def describe(self) -> str:
        return self.inner.describe()

    def location(self) -> str | None:
        return self.inner.location()

    def collect_temporary(self, older_than: float, *, dry_run: bool = False) -> int:
        self._usable()
        return self.inner.collect_temporary(older_than, dry_run=dry_run)

    def close(self) -> None:
        self.inner.close()


def checked(objects: ObjectStore) -> ObjectStore:
    """``objects`` as a store checked before its first conditional put; stores that honour
    the conditions by construction (local directory, memory) are returned as they are."""
    if isinstance(objects, CheckedObjectStore) or type(objects) in _TRUSTED:
        return objects
    return CheckedObjectStore(objects)


def require_conditional_writes(objects: ObjectStore) -> None:
    """Check a checked store now (before a write that depends on the conditions), so its
    refusal comes first, not from inside a lease's retry loop; nothing for other stores."""
    if isinstance(objects, CheckedObjectStore):
        objects.require()
