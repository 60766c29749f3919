"""Copy-on-write block store for VM root disks, on S3, a local directory or memory.

Layers, bottom up: :class:`ObjectStore` (get/put with conditions/list), :class:`BlockStore`
(blocks by index + durable flush, optionally extents: :class:`ExtentBlockStore`;
:class:`ObjectBlockStore` is the reference one on any object store) and :class:`Disk`
(byte offsets, base image, write-back cache).
"""

from typing import TYPE_CHECKING

from .errors import (
    BaseMismatch,
    BlockStoreError,
    CorruptBlock,
    CorruptMetadata,
    DiskExists,
    DiskNotFound,
    Fenced,
    InvalidKey,
    InvalidURL,
    LeaseHeld,
    ObjectNotFound,
    OutOfRange,
    PreconditionFailed,
    ReadOnly,
    StoreUnavailable,
)
from .identity import host_identity, process_identity
from .lazy import lazy_exports

if TYPE_CHECKING:
    from .api import create, open_disk, resolve
    from .disk import HOLE, ZERO_FLAG, BaseImage, Disk
    from .disks import (
        DEFAULT_BLOCK_SIZE,
        checkpoint_disk,
        collect_garbage,
        create_disk,
        delete_disk,
        disk_info,
        fork_disk,
        list_checkpoints,
        list_disks,
    )
    from .layered import DiskBase
    from .lease import force_release
    from .local import sha256_file
    from .objectstore import (
        LocalObjectStore,
        MemoryObjectStore,
        ObjectInfo,
        ObjectStore,
        S3ObjectStore,
        StoredObject,
        StoreRejected,
    )
    from .probe import UnsafeStore, Verdict, check_conditional_writes
    from .protocol import BlockStore, BlockValue, Extent, ExtentBlockStore, Layered
    from .store import ObjectBlockStore
    from .url import DiskURL, open_store, parse_disk_url
else:  # the rest on first use: the numpy block map and the store cost 0.2 s
    __getattr__ = lazy_exports(
        __name__,
        {
            ".api": "create open_disk resolve",
            ".disk": "HOLE ZERO_FLAG BaseImage Disk",
            ".disks": "DEFAULT_BLOCK_SIZE checkpoint_disk collect_garbage create_disk delete_disk"
            " disk_info fork_disk list_checkpoints list_disks",
            ".layered": "DiskBase",
            ".lease": "force_release",
            ".local": "sha256_file",
            ".objectstore": "LocalObjectStore MemoryObjectStore ObjectInfo ObjectStore"
            " S3ObjectStore StoredObject StoreRejected",
            ".probe": "UnsafeStore Verdict check_conditional_writes",
            ".protocol": "BlockStore BlockValue Extent ExtentBlockStore Layered",
            ".store": "ObjectBlockStore",
            ".url": "DiskURL open_store parse_disk_url",
        },
    )

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "HOLE",
    "ZERO_FLAG",
    "BaseImage",
    "BaseMismatch",
    "BlockStore",
    "BlockStoreError",
    "BlockValue",
    "CorruptBlock",
    "CorruptMetadata",
    "Disk",
    "DiskBase",
    "DiskExists",
    "DiskNotFound",
    "DiskURL",
    "Extent",
    "ExtentBlockStore",
    "Fenced",
    "InvalidKey",
    "InvalidURL",
    "Layered",
    "LeaseHeld",
    "LocalObjectStore",
    "MemoryObjectStore",
    "ObjectBlockStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "OutOfRange",
    "PreconditionFailed",
    "ReadOnly",
    "S3ObjectStore",
    "StoreRejected",
    "StoreUnavailable",
    "StoredObject",
    "UnsafeStore",
    "Verdict",
    "check_conditional_writes",
    "checkpoint_disk",
    "collect_garbage",
    "create",
    "create_disk",
    "delete_disk",
    "disk_info",
    "force_release",
    "fork_disk",
    "host_identity",
    "list_checkpoints",
    "list_disks",
    "open_disk",
    "open_store",
    "parse_disk_url",
    "process_identity",
    "resolve",
    "sha256_file",
]
