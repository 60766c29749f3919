"""Host-implemented filesystems served with pyfuse3 (and into VMs through virtiofs).

Implement :class:`Filesystem` (or use :class:`MemoryFS`, :class:`PassthroughFS`,
:class:`ReadOnlyFS`, :class:`Hub`, :class:`Threaded`) and serve it with :func:`mount`
or :func:`serve`.
"""

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
from .snapshot import restore_objects, restore_tar, snapshot_objects, snapshot_tar
from .wrappers import Hub, ReadOnlyFS, Threaded

__all__ = [
    "Attr",
    "Context",
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
    "NotADirectory",
    "NotEmpty",
    "NotFound",
    "NotPermitted",
    "NotSupported",
    "PassthroughFS",
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
