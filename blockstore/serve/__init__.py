"""Serving disks to clients: NBD (for VMs and the host) and a FUSE single-file export."""

from .limits import NBDLimits
from .nbd import BlockDevice, NBDServer, nbd_errno, open_listener, parse_address, serve_device

__all__ = [
    "BlockDevice",
    "NBDLimits",
    "NBDServer",
    "nbd_errno",
    "open_listener",
    "parse_address",
    "serve_device",
]
