"""Host-implemented filesystems served with pyfuse3 (and into VMs through virtiofs).

Implement :class:`Filesystem` (or use :class:`MemoryFS`, :class:`PassthroughFS`,
:class:`ReadOnlyFS`, :class:`Hub`, :class:`Threaded`) and serve it with :func:`mount`
or :func:`serve`. Host code edits a mounted filesystem by path with :class:`Paths`
(``MemoryFS.paths``); a filesystem that changes behind its mount in other ways announces
it with :meth:`Filesystem.notify` (:class:`NodeChanged`, :class:`EntryChanged`).
"""

from .changes import EntryChanged, NodeChanged
from .fuse import FuseAdapter, MountError, mount, mount_blocking, serve
from .interface import (
    Attr,
    Context,
    Exists,
    Filesystem,
    FSError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    ReadOnly,
    SetAttr,
    StatFS,
)
from .memory import MemoryFS
from .passthrough import PassthroughFS
from .paths import BlockingPaths, Paths
from .snapshot import restore_objects, restore_tar, snapshot_objects, snapshot_tar
from .wrappers import Hub, ReadOnlyFS, Threaded

__all__ = [
    "Attr",
    "BlockingPaths",
    "Context",
    "EntryChanged",
    "Exists",
    "FSError",
    "Filesystem",
    "FuseAdapter",
    "Hub",
    "InvalidArgument",
    "IsADirectory",
    "MemoryFS",
    "MountError",
    "NameTooLong",
    "NoAttribute",
    "NoSpace",
    "NodeChanged",
    "NotADirectory",
    "NotEmpty",
    "NotFound",
    "NotPermitted",
    "NotSupported",
    "PassthroughFS",
    "Paths",
    "ReadOnly",
    "ReadOnlyFS",
    "SetAttr",
    "StatFS",
    "Threaded",
    "mount",
    "mount_blocking",
    "restore_objects",
    "restore_tar",
    "serve",
    "snapshot_objects",
    "snapshot_tar",
]
