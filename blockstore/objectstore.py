"""Object stores: the lowest plug-in layer (get, ranged get, conditional put, delete, list).

Implementations are synchronous and thread-safe; the block store calls them from worker
threads (``trio.to_thread``) so that boto3 and file I/O never block the trio loop.
Conditional puts are the foundation of leases and manifest commits:
``if_none_match=True`` creates only if absent, ``if_match=etag`` replaces only that version.
Both raise :class:`PreconditionFailed` when they lose.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    BlockStoreError,
    InvalidKey,
    ObjectNotFound,
    PreconditionFailed,
    StoreUnavailable,
)

MD5_PUT_LIMIT = 1 << 20
"""Puts up to this size send Content-MD5 (see S3ObjectStore.put)."""
_KEY_RE = re.compile(r"^[A-Za-z0-9._@=-]+(/[A-Za-z0-9._@=-]+)*$")


def check_key(key: str) -> str:
    """Keys are relative, slash-separated, with no empty, '.' or '..' parts."""
    if not _KEY_RE.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise InvalidKey(f"invalid object key {key!r}")
    return key


class StoreRejected(BlockStoreError):
    """The store refused a request for a reason retrying cannot fix: no such bucket, wrong
    credentials, access denied, a request it does not implement. ``code`` is the service's
    error code (``NoSuchBucket``, ``AccessDenied``, ``NotImplemented``...)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: float
    """Seconds since the epoch, as the store's clock saw the last write."""


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str


class ObjectStore(ABC):
    """Flat key/value object storage with S3's conditional-write semantics."""

    @abstractmethod
    def get(self, key: str) -> StoredObject:
        """The whole object and its etag; ObjectNotFound if absent."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the object)."""

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Store ``data`` durably and return its etag; conditional forms may raise
        PreconditionFailed (a missing key under ``if_match`` loses too)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; absent keys are not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    def describe(self) -> str:
        return type(self).__name__

    def location(self) -> str | None:
        """A stable name of where the objects live, the same for every instance that
        reaches them (caches key on it); None if there is none (a store in memory)."""
        return None

    def collect_temporary(self, older_than: float, *, dry_run: bool = False) -> int:
        """Remove leftovers of puts that never finished (a process killed mid-put) last
        modified before ``older_than`` (seconds since the epoch); how many there were.
        The default store keeps none."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""


def put_new(objects: ObjectStore, key: str, data: bytes, *, attempts: int = 3) -> bool:
    """Create ``key`` holding ``data`` unless the key exists; False if it holds other data.

    Idempotent: a put can land and lose its reply (it raises, or the client's own retry
    loses to it with PreconditionFailed). Either way the object is read back, and if it
    holds exactly ``data`` it was this call's, so it counts as created. Raises the put's
    error when the store cannot be read to find out.
    """
    error: Exception | None = None
    for _ in range(attempts):
        try:
            objects.put(key, data, if_none_match=True)
            return True
        except PreconditionFailed:
            pass
        except Exception as e:
            error = e
        try:
            existing = objects.get(key).data
        except ObjectNotFound:
            continue  # it did not land, and the store answers: try again
        except Exception:
            if error is not None:
                raise error from None
            raise
        return existing == data
    if error is not None:
        raise error
    raise StoreUnavailable(f"{key}: neither created nor found after {attempts} attempts")


class MemoryObjectStore(ObjectStore):
    """A dict, for tests and ephemeral disks. Counts requests like a billing meter."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, str, float]] = {}
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"get": 0, "put": 0, "delete": 0, "list": 0}

    def get(self, key: str) -> StoredObject:
        with self._lock:
            self.counts["get"] += 1
            try:
                data, etag, _ = self._objects[check_key(key)]
            except KeyError:
                raise ObjectNotFound(key) from None
        return StoredObject(data, etag)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key).data[offset : offset + length]

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest() + uuid.uuid4().hex[:8]
        with self._lock:
            self.counts["put"] += 1
            current = self._objects.get(check_key(key))
            if if_none_match and current is not None:
                raise PreconditionFailed(key)
            if if_match is not None and (current is None or current[1] != if_match):
                raise PreconditionFailed(key)
            self._objects[key] = (bytes(data), etag, time.time())
        return etag

    def delete(self, key: str) -> None:
        with self._lock:
            self.counts["delete"] += 1
            self._objects.pop(check_key(key), None)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            self.counts["list"] += 1
            items = sorted(
                (k, len(v[0]), v[2]) for k, v in self._objects.items() if k.startswith(prefix)
            )
        for k, size, mtime in items:
            yield ObjectInfo(k, size, mtime)


def fsync_dir(path: Path) -> None:
    """Make a rename or a create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore(ObjectStore):
    """Objects as files under a directory: the embedded default.

    Durability: data is written to a temporary file, fsynced, renamed (or hard-linked, for
    create-only puts) into place, and the directory is fsynced. Conditional replaces take an
    exclusive ``flock`` on a per-store lock file, so they are safe between processes.
    The etag is a hash of the content, so it is stable across processes and restarts.
    The directory is made by the first put, so looking into a store (``disk info`` of a
    mistyped path) leaves nothing behind; ``create=False`` wants it to exist already.
    """

    _TMP = ".tmp"
    _LOCK = ".lock"

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        if not create and not self.root.is_dir():
            raise ObjectNotFound(str(self.root))
        self._thread_lock = threading.Lock()

    def describe(self) -> str:
        return f"file://{self.root}"

    def location(self) -> str:
        return self.describe()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @staticmethod
    def _etag(data: bytes) -> str:
        # Every put pays for it (4 MiB per pack): SHA-256 runs in hardware on current CPUs.
        return hashlib.sha256(data).hexdigest()[:32]

    def get(self, key: str) -> StoredObject:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return StoredObject(data, self._etag(data))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.root / self._TMP / uuid.uuid4().hex
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self.root / self._LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(data)
        try:
            if if_none_match:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(key) from None
            elif if_match is not None:
                with self._exclusive():
                    try:
                        current = self._etag(path.read_bytes())
                    except FileNotFoundError:
                        raise PreconditionFailed(key) from None
                    if current != if_match:
                        raise PreconditionFailed(key)
                    os.rename(tmp, path)
            else:
                with self._exclusive():
                    os.rename(tmp, path)
            fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return self._etag(data)

    def collect_temporary(self, older_than: float, *, dry_run: bool = False) -> int:
        """Temporary files of puts killed before their rename (kill -9 leaves them)."""
        count = 0
        try:
            entries = list(os.scandir(self.root / self._TMP))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                    continue
                if not dry_run:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # its put finished, or another collector took it
            count += 1
        return count

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            with self._exclusive():  # its lock file is missing too in a store never put to
                os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the directory that can hold the prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if not start.is_dir():
            return
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel_dir = ""
            for name in filenames:
                if name.startswith("."):
                    continue
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        found.sort(key=lambda o: o.key)
        yield from found


_TRANSIENT = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
)
_CREDENTIALS = "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
_REGION = "check the region (AWS_REGION) and the endpoint (--s3-endpoint, AWS_ENDPOINT_URL)"
_HINTS = {
    "AccessDenied": "check the credentials and the bucket's permissions",
    "InvalidAccessKeyId": _CREDENTIALS,
    "SignatureDoesNotMatch": _CREDENTIALS,
    "ExpiredToken": _CREDENTIALS,
    "InvalidToken": _CREDENTIALS,
    "AuthorizationHeaderMalformed": _REGION,
    "PermanentRedirect": _REGION,
    "IllegalLocationConstraintException": _REGION,
    "NotImplemented": "the service does not implement this request",
}


_loader: Any = None
_loader_lock = threading.Lock()


def _boto3_session() -> Any:
    """A new boto3 session (credentials and region found afresh in the environment) on the
    process's one botocore data loader: the S3 model is parsed once per process, not for
    every client (8 ms a client instead of 55), and once for all a zygote's forks. The
    first session's data path (``AWS_DATA_PATH``) is every later one's."""
    global _loader
    import boto3
    import botocore.session

    core = botocore.session.Session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        core.register_component("data_loader", _loader)
        session = boto3.session.Session(botocore_session=core)
        # Each boto3 session appends its data directory to the loader's search path.
        paths = _loader.search_paths
        paths[:] = list(dict.fromkeys(paths))
    return session


def warm_s3_client() -> None:
    """Load what an S3 client needs (imports, service model), making no request."""
    _boto3_session().client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        aws_access_key_id="warm", aws_secret_access_key="warm",
    )  # fmt: skip


class S3ObjectStore(ObjectStore):
    """An S3 bucket (and key prefix) through boto3.

    Endpoint, region and credentials come from the standard AWS settings unless given.
    Retries with backoff on 5xx, throttling and connection errors (botocore's ``standard``
    mode, more attempts than its default); a bounded connection pool shared by all threads.
    Any put can land on the server and still fail here (a lost reply, after all retries),
    and a conditional put retried by botocore can lose to its own first attempt: callers
    recognise their own writes (commit and lease ids, :func:`put_new`'s read-back).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = True,
        max_connections: int = 16,
        max_attempts: int = 8,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if client is None:
            endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
            config = Config(
                s3={"addressing_style": "path" if path_style else "auto"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                max_pool_connections=max_connections,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Every block carries its own checksum, verified on read, and the transport
                # has its own (SigV4's payload hash over http, TLS over https): a CRC32 of
                # each body on top costs CPU on both ends for nothing.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            client = _boto3_session().client(
                "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
            )
        self.client = client
        self.bytes_read = 0
        """Body bytes of every GET so far: what this process fetched from the store."""
        self._counting = threading.Lock()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def location(self) -> str:
        return f"{self.client.meta.endpoint_url}/{self.bucket}/{self.prefix}"

    def _call(self, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            error = self._translate(e, key, if_match="IfMatch" in kwargs)
            if error is None:
                return None
            raise error from (e if isinstance(error, StoreUnavailable) else None)
        except NoCredentialsError:
            raise self._no_credentials() from None
        except BotoCoreError as e:
            raise StoreUnavailable(f"{self.describe()}: {e}") from e

    def _no_credentials(self) -> StoreRejected:
        return StoreRejected(
            f"no S3 credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            "NoCredentials",
        )

    def _translate(self, e: Any, key: str, *, if_match: bool = False) -> Exception | None:
        """Our error for a ClientError; None for an unsatisfiable range (reads as empty).

        Services differ: a missing key under If-Match is 404 on AWS and moto, 412 on
        SeaweedFS, and AWS may answer 409 to racing conditional puts; all of them lose.
        A missing bucket is a 404 too, but never a missing key: it must not read as one.
        """
        details = e.response.get("Error", {})
        code = str(details.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreRejected(
                f"{self.describe()}: bucket {self.bucket!r} does not exist at "
                f"{self.client.meta.endpoint_url} (create it, or check the URL and the endpoint)",
                code,
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return PreconditionFailed(key) if if_match else ObjectNotFound(key)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return PreconditionFailed(key)
        if code == "InvalidRange" or status == 416:
            return None
        if code in _TRANSIENT or (status is not None and status >= 500 and status != 501):
            return StoreUnavailable(f"{self.describe()}: {e}")
        message = str(details.get("Message", "")) or str(e)
        hint = _HINTS.get(code, "")
        if hint == _CREDENTIALS:
            return StoreRejected(
                f"S3 refused the credentials for {self.describe()} ({code}: {message}); {hint}",
                code,
            )
        return StoreRejected(
            f"{self.describe()}: {getattr(e, 'operation_name', 'request')} {key!r} refused: "
            f"{code or status} ({message}){'; ' + hint if hint else ''}",
            code,
        )

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                self.client.create_bucket(Bucket=self.bucket)

    def _count(self, data: bytes) -> bytes:
        with self._counting:
            self.bytes_read += len(data)
        return data

    def get(self, key: str) -> StoredObject:
        r = self._call(key, self.client.get_object, Key=self._k(key))
        return StoredObject(self._count(r["Body"].read()), r["ETag"])

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        r = self._call(
            key,
            self.client.get_object,
            Key=self._k(key),
            Range=f"bytes={offset}-{offset + length - 1}",
        )
        return b"" if r is None else self._count(bytes(r["Body"].read()))

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        # botocore sends the body only after the server's "100 Continue": a round trip per
        # put, and what keeps a put cut before its body from emptying the object on
        # SeaweedFS (test_a_put_cut_before_its_body_changes_nothing). Keep it. A put cut
        # after the "100 Continue" (a writer killed there) empties it all the same unless
        # the body carries its MD5, which SeaweedFS checks before it replaces anything:
        # every conditional put (heads, leases) and every small one (records) sends it;
        # big new objects (packs, memory chunks) carry their own checksums instead.
        kwargs: dict[str, Any] = {"Key": self._k(key), "Body": data}
        if if_none_match or if_match is not None or len(data) <= MD5_PUT_LIMIT:
            digest = hashlib.md5(data, usedforsecurity=False).digest()
            kwargs["ContentMD5"] = base64.b64encode(digest).decode()
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        r = self._call(key, self.client.put_object, **kwargs)
        return str(r["ETag"])

    def delete(self, key: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            self._call(key, self.client.delete_object, Key=self._k(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        obj["Key"][len(self.prefix) :],
                        int(obj["Size"]),
                        obj["LastModified"].timestamp(),
                    )
        except ClientError as e:
            error = self._translate(e, prefix)
            if isinstance(error, StoreRejected | StoreUnavailable):
                raise error from (e if isinstance(error, StoreUnavailable) else None)
            raise StoreUnavailable(f"{self.describe()}: {e}") from e
        except NoCredentialsError:
            raise self._no_credentials() from None
        except BotoCoreError as e:
            raise StoreUnavailable(f"{self.describe()}: {e}") from e

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
