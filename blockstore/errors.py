"""The blockstore's exceptions, mapped to errno, NBD errors and exit codes at the edges."""

from __future__ import annotations


class BlockStoreError(Exception):
    """Base class of every error this package raises on purpose."""


class ObjectNotFound(BlockStoreError):
    """The object store has no object under that key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key


class PreconditionFailed(BlockStoreError):
    """A conditional put lost: the key existed (If-None-Match) or changed (If-Match)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"conditional write lost the race on {key}")
        self.key = key


class StoreUnavailable(BlockStoreError):
    """The object store could not be reached after all retries."""


class InvalidKey(BlockStoreError, ValueError):
    """An object key that could escape its store or is malformed."""


class InvalidURL(BlockStoreError, ValueError):
    """A disk or store URL we cannot parse."""


class DiskNotFound(BlockStoreError):
    """No disk (or checkpoint) of that name in the store."""


class DiskExists(BlockStoreError):
    """Creating a disk (or checkpoint) whose name is taken."""


class BaseMismatch(BlockStoreError):
    """The base image given at open is not the one the disk was created on."""


class LeaseHeld(BlockStoreError):
    """Another writer holds the disk's lease."""

    def __init__(self, disk: str, holder: dict[str, object], since: float, expires: float) -> None:
        import time

        left = max(0.0, expires - time.time())
        super().__init__(
            f"disk {disk!r} is in use by host {holder.get('host')} pid {holder.get('pid')} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))} "
            f"(lease expires in {left:.0f}s unless renewed); stop that writer, wait for the "
            "lease to expire, or force a takeover (`lanekit disk release --force`)"
        )
        self.holder = holder
        self.since = since
        self.expires = expires


class Fenced(BlockStoreError):
    """This writer lost its lease: it may never commit again."""


class CorruptBlock(BlockStoreError):
    """A stored block failed its checksum or could not be decoded: never return wrong data."""

    def __init__(self, key: str, block: int, reason: str) -> None:
        super().__init__(f"corrupt data for block {block} in object {key}: {reason}")
        self.key = key
        self.block = block


class CorruptMetadata(BlockStoreError):
    """A head, checkpoint, manifest segment or lease failed its checksum or validation:
    nothing is read through it (a wrong head could move or hide every block)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt metadata in {key}: {reason}")
        self.key = key
        self.reason = reason


class ReadOnly(BlockStoreError):
    """A write to a disk opened read-only (or to a checkpoint)."""


class OutOfRange(BlockStoreError, ValueError):
    """An offset or length outside the disk."""
