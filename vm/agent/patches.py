"""Rootfs patches (after microsandbox's ``Patch``): files, directories and links put into
the guest's root filesystem before the first user command.

Paths are checked before boot (absolute, normalised, not ``/``). In the guest every
directory on the way is opened without following symlinks, so a patch cannot be led
outside the path it names by a link in the image; such a patch is refused and the boot
fails with the reason. On a durable root disk a patch is applied once: the digests of
applied patches are kept in the guest at :data:`APPLIED`, and a later boot applies only
patches it has not seen. An ephemeral disk starts from the image each boot, so there
they are applied every boot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from ..errors import VMError
from .client import AgentSession
from .fs import read_host_file

APPLIED = "/var/lib/lanekit/patches-applied"
KINDS = ("text", "append", "mkdir", "copy_file", "copy_dir", "symlink", "remove")


class PatchError(VMError):
    """A patch is malformed, or the guest refused to apply it."""


def check_guest_path(path: str) -> str:
    parts = path.split("/")
    if (
        not path.startswith("/")
        or path == "/"
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts[1:])
    ):
        raise PatchError(
            f"patch path {path!r} must be an absolute, normalised guest path other than /"
        )
    return path


@dataclasses.dataclass(frozen=True)
class Patch:
    """One change to the root filesystem; build them with the class methods."""

    kind: str
    path: str
    content: bytes = b""
    source: Path | None = None
    target: str | None = None
    mode: int | None = None
    replace: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PatchError(f"unknown patch kind {self.kind!r}: use one of {', '.join(KINDS)}")
        check_guest_path(self.path)
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise PatchError(f"patch mode {self.mode:o} is not a file mode")
        if self.kind in ("copy_file", "copy_dir"):
            if self.source is None:
                raise PatchError(f"a {self.kind} patch needs a host source")
            source = Path(self.source).absolute()
            object.__setattr__(self, "source", source)
            wanted = source.is_file() if self.kind == "copy_file" else source.is_dir()
            if not wanted:
                what = "file" if self.kind == "copy_file" else "directory"
                raise PatchError(f"patch source {source} is not a {what}")
        if self.kind == "symlink" and not self.target:
            raise PatchError("a symlink patch needs a target")

    @classmethod
    def text(
        cls, path: str, content: str | bytes, *, mode: int | None = None, replace: bool = True
    ) -> Patch:
        raw = content.encode() if isinstance(content, str) else content
        return cls("text", path, raw, mode=mode, replace=replace)

    @classmethod
    def append(cls, path: str, content: str | bytes) -> Patch:
        return cls("append", path, content.encode() if isinstance(content, str) else content)

    @classmethod
    def mkdir(cls, path: str, *, mode: int | None = None) -> Patch:
        return cls("mkdir", path, mode=mode)

    @classmethod
    def copy_file(
        cls,
        source: str | os.PathLike[str],
        path: str,
        *,
        mode: int | None = None,
        replace: bool = True,
    ) -> Patch:
        return cls("copy_file", path, source=Path(source), mode=mode, replace=replace)

    @classmethod
    def copy_dir(cls, source: str | os.PathLike[str], path: str, *, replace: bool = True) -> Patch:
        return cls("copy_dir", path, source=Path(source), replace=replace)

    @classmethod
    def symlink(cls, target: str, path: str, *, replace: bool = True) -> Patch:
        return cls("symlink", path, target=target, replace=replace)

    @classmethod
    def remove(cls, path: str) -> Patch:
        return cls("remove", path)

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.kind}\0{self.path}\0{self.target}\0{self.mode}\0".encode())
        h.update(b"R" if self.replace else b"K")
        h.update(self.content)
        if self.source is not None:
            for path in sorted([self.source, *self.source.rglob("*")]):
                h.update(str(path.relative_to(self.source)).encode() + b"\0")
                if path.is_file() and not path.is_symlink():
                    h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()


async def apply_patches(
    session: AgentSession, patches: Sequence[Patch], *, record: str = APPLIED
) -> int:
    """Apply the patches this root filesystem has not had yet, in order; returns how many.

    ``record`` is the guest file listing applied digests; a test whose "guest" is this
    host passes its own, so that no run leaves (or reads) state on the host's root.
    """
    if not patches:
        return 0
    try:
        done = set((await _read(session, record)).decode().split())
    except FileNotFoundError:
        done = set()
    applied = 0
    for patch in patches:
        digest = await trio.to_thread.run_sync(patch.digest)
        if digest in done:
            continue
        try:
            await _apply(session, patch)
        except OSError as exc:
            raise PatchError(f"patch {patch.kind} {patch.path}: {exc.strerror or exc}") from None
        except VMError as exc:
            raise PatchError(f"patch {patch.kind} {patch.path}: {exc}") from None
        done.add(digest)
        applied += 1
        await session.write_file(
            record, ["".join(f"{d}\n" for d in sorted(done)).encode()], parents=True
        )
    return applied


async def _read(session: AgentSession, path: str) -> bytes:
    return b"".join([chunk async for chunk in session.read_file(path)])


async def _exists(session: AgentSession, path: str) -> bool:
    return bool(await session.call("exists", path=path))


async def _apply(session: AgentSession, patch: Patch) -> None:
    safe = {"nofollow": True}
    keep = patch.kind in ("text", "copy_file", "symlink", "copy_dir") and not patch.replace
    if keep and await _exists(session, patch.path):
        return
    if patch.kind == "text":
        await session.write_file(patch.path, [patch.content], mode=patch.mode, parents=True, **safe)
    elif patch.kind == "append":
        await session.write_file(patch.path, [patch.content], append=True, parents=True, **safe)
    elif patch.kind == "mkdir":
        await session.call(
            "mkdir", path=patch.path, mode=patch.mode or 0o755, exist_ok=True, **safe
        )
    elif patch.kind == "copy_file":
        assert patch.source is not None
        mode = patch.mode if patch.mode is not None else stat.S_IMODE(patch.source.stat().st_mode)
        await session.write_file(
            patch.path, read_host_file(patch.source), mode=mode, parents=True, **safe
        )
    elif patch.kind == "copy_dir":
        assert patch.source is not None
        await _copy_tree(session, patch.source, patch.path)
    elif patch.kind == "symlink":
        await session.call(
            "symlink", path=patch.path, target=patch.target, replace=patch.replace, **safe
        )
    elif patch.kind == "remove":
        await session.call("remove", path=patch.path, recursive=True, missing_ok=True, **safe)


async def _copy_tree(session: AgentSession, source: Path, path: str) -> None:
    info = await trio.to_thread.run_sync(source.lstat)
    if stat.S_ISDIR(info.st_mode):
        await session.call(
            "mkdir", path=path, mode=stat.S_IMODE(info.st_mode), exist_ok=True, nofollow=True
        )
        for child in await trio.to_thread.run_sync(lambda: sorted(source.iterdir())):
            await _copy_tree(session, child, f"{path}/{child.name}")
    elif stat.S_ISLNK(info.st_mode):
        await session.call(
            "symlink", path=path, target=os.readlink(source), replace=True, nofollow=True
        )
    elif stat.S_ISREG(info.st_mode):
        chunks: AsyncIterator[bytes] = read_host_file(source)
        await session.write_file(
            path, chunks, mode=stat.S_IMODE(info.st_mode), parents=True, nofollow=True
        )
