"""Disk and store URLs: ``file:///abs/dir/name[@tag]`` and ``s3://bucket/prefix/name[@tag]``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import InvalidURL
from .layout import check_name
from .objectstore import LocalObjectStore, ObjectStore, S3ObjectStore
from .probe import checked


@dataclass(frozen=True)
class DiskURL:
    store_url: str
    name: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        tag = f"@{self.checkpoint}" if self.checkpoint else ""
        return f"{self.store_url.rstrip('/')}/{self.name}{tag}"


def parse_disk_url(url: str) -> DiskURL:
    parts = urlsplit(url)
    if parts.scheme not in ("file", "s3") or parts.query or parts.fragment:
        raise InvalidURL(
            f"unsupported disk URL {url!r}: use file:///ABSOLUTE/DIR/NAME or s3://BUCKET/PREFIX/NAME"
        )
    _check_characters(url)
    if parts.path.endswith("/"):
        raise InvalidURL(
            f"{url!r} names a store, not a disk: add the disk's name "
            "(file:///ABSOLUTE/DIR/NAME or s3://BUCKET/PREFIX/NAME)"
        )
    store_path, _, last = parts.path.rpartition("/")
    name, _, tag = last.partition("@")
    check_name(name)
    if tag:
        check_name(tag, "checkpoint tag")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not store_path.startswith("/"):
            raise InvalidURL(f"{url!r}: file URLs need an absolute path (file:///dir/name)")
    elif not parts.netloc:
        raise InvalidURL(f"{url!r}: s3 URLs need a bucket (s3://bucket/prefix/name)")
    store_url = f"{parts.scheme}://{parts.netloc}{store_path}"
    return DiskURL(store_url, name, tag or None)


def open_store(
    store_url: str, *, s3_endpoint: str | None = None, max_attempts: int | None = None
) -> ObjectStore:
    """An object store for ``file:///dir`` or ``s3://bucket[/prefix]``. An S3 store is
    checked for conditional writes before its first conditional put (see ``probe``);
    ``max_attempts`` bounds its retries (a quick answer from a wrong endpoint)."""
    _check_characters(store_url)
    parts = urlsplit(store_url)
    if parts.scheme == "file":
        if not parts.path.startswith("/"):
            raise InvalidURL(f"{store_url!r}: file URLs need an absolute path")
        return LocalObjectStore(parts.path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise InvalidURL(f"{store_url!r}: s3 URLs need a bucket")
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        prefix = parts.path.strip("/")
        if max_attempts is None:
            return checked(S3ObjectStore(parts.netloc, prefix, endpoint_url=endpoint))
        return checked(
            S3ObjectStore(parts.netloc, prefix, endpoint_url=endpoint, max_attempts=max_attempts)
        )
    raise InvalidURL(f"unsupported store URL {store_url!r}: use file:///DIR or s3://BUCKET/PREFIX")


def _check_characters(url: str) -> None:
    """urlsplit drops tabs and line breaks without a word: a/b with one is not a/b."""
    if any(c in url for c in "\t\r\n"):
        raise InvalidURL(f"{url!r}: a store or disk URL has no tabs or line breaks")
