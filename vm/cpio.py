"""A writer for the ``newc`` cpio format the kernel unpacks as an initramfs.

Written here rather than shelling out to ``cpio`` so the archive is reproducible (fixed
owners and times) and can hold a device node without creating one on the host.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

_MAGIC = b"070701"


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._offset = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0
        )  # fmt: skip
        header = _MAGIC + b"".join(b"%08X" % v for v in fields)
        self._ino += 1
        self._write(header + encoded)
        self._pad()
        self._write(data)
        self._pad()

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._offset % 4))

    def directory(self, name: str, perms: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perms)

    def file(self, name: str, data: bytes, perms: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perms, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perms: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perms, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._write(b"\0" * (-self._offset % 512))
