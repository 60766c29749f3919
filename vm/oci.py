"""Unpack an OCI image layout or a ``docker save`` tarball into a directory, safely.

Layers are applied in order with whiteouts (``.wh.NAME`` deletes NAME from lower layers,
``.wh..wh..opq`` empties the directory first). Every member is checked before anything is
written: no absolute names, no ``..``, nothing written through a symlink (each parent is
opened component by component with ``O_NOFOLLOW``), hard links only to files already in
the tree, symlinks whose target would climb above the image root refused, and no device
nodes. Errors name the member and the layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import BuildError, UnsafeArchive

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _clean_name(name: str, where: str) -> list[str]:
    if "\0" in name:
        raise UnsafeArchive(f"{where}: member name contains NUL")
    if name.startswith("/"):
        raise UnsafeArchive(f"{where}: absolute member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchive(f"{where}: member name {name!r} climbs out with '..'")
    if any(len(p.encode()) > 255 for p in parts):
        raise UnsafeArchive(f"{where}: member name {name!r} has a component over 255 bytes")
    return parts


def _symlink_escapes(parts: list[str], target: str) -> bool:
    if target.startswith("/"):
        return False  # rooted at the image root when the guest follows it
    depth = len(parts) - 1
    for piece in target.split("/"):
        if piece == "..":
            depth -= 1
            if depth < 0:
                return True
        elif piece not in ("", "."):
            depth += 1
    return False


@contextlib.contextmanager
def _parent_fd(root_fd: int, parts: list[str], where: str) -> Iterator[int]:
    """An fd of the directory holding ``parts[-1]``, never following a symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for piece in parts[:-1]:
            try:
                nfd = os.open(piece, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(piece, 0o755, dir_fd=fd)
                nfd = os.open(piece, _DIR_FLAGS, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                raise UnsafeArchive(
                    f"{where}: a parent of the member is not a directory (or is a symlink): {exc}"
                ) from None
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child in os.listdir(fd):
                _remove(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _apply_metadata(dir_fd: int, name: str, member: tarfile.TarInfo, symlink: bool) -> None:
    os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
    if not symlink:
        os.chmod(name, member.mode & 0o7777, dir_fd=dir_fd)
    os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)


def apply_layer(layer: IO[bytes], root: Path, label: str) -> None:
    """Apply one layer tar (any compression tarfile detects) on top of ``root``."""
    root_fd = os.open(root, _DIR_FLAGS)
    directories: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        try:
            archive = tarfile.open(fileobj=layer, mode="r|*")  # noqa: SIM115  (closed below)
        except tarfile.TarError as exc:
            raise BuildError(f"{label}: not a readable tar archive ({exc})") from None
        try:
            for member in archive:
                where = f"{label}: {member.name!r}"
                parts = _clean_name(member.name, where)
                if not parts:
                    continue
                base = parts[-1]
                with _parent_fd(root_fd, parts, where) as dfd:
                    if base == OPAQUE:
                        for child in os.listdir(dfd):
                            _remove(dfd, child)
                        continue
                    if base.startswith(WHITEOUT):
                        _remove(dfd, base[len(WHITEOUT) :])
                        continue
                    if member.isdir():
                        try:
                            st = os.lstat(base, dir_fd=dfd)
                            if not stat.S_ISDIR(st.st_mode):
                                _remove(dfd, base)
                                os.mkdir(base, 0o755, dir_fd=dfd)
                        except FileNotFoundError:
                            os.mkdir(base, 0o755, dir_fd=dfd)
                        directories.append((parts, member))
                        continue
                    _remove(dfd, base)
                    if member.isreg():
                        fd = os.open(
                            base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                            dir_fd=dfd,
                        )  # fmt: skip
                        with os.fdopen(fd, "wb") as out:
                            source = archive.extractfile(member)
                            assert source is not None
                            while chunk := source.read(1 << 20):
                                out.write(chunk)
                        _apply_metadata(dfd, base, member, symlink=False)
                    elif member.issym():
                        if _symlink_escapes(parts, member.linkname):
                            raise UnsafeArchive(
                                f"{where}: symlink to {member.linkname!r} points outside the image"
                            )
                        os.symlink(member.linkname, base, dir_fd=dfd)
                        _apply_metadata(dfd, base, member, symlink=True)
                    elif member.islnk():
                        target = _clean_name(member.linkname, where + " (hard link target)")
                        if not target:
                            raise UnsafeArchive(f"{where}: hard link to the image root")
                        with _parent_fd(root_fd, target, where) as tfd:
                            try:
                                st = os.lstat(target[-1], dir_fd=tfd)
                            except FileNotFoundError:
                                raise UnsafeArchive(
                                    f"{where}: hard link to {member.linkname!r}, "
                                    "which is not in the image"
                                ) from None
                            if not stat.S_ISREG(st.st_mode):
                                raise UnsafeArchive(f"{where}: hard link to a non-regular file")
                            os.link(
                                target[-1], base, src_dir_fd=tfd, dst_dir_fd=dfd,
                                follow_symlinks=False,
                            )  # fmt: skip
                    elif member.isfifo():
                        os.mkfifo(base, 0o600, dir_fd=dfd)
                        _apply_metadata(dfd, base, member, symlink=False)
                    elif member.ischr() or member.isblk():
                        raise UnsafeArchive(f"{where}: device nodes are not allowed in images")
                    else:
                        raise UnsafeArchive(f"{where}: unsupported member type {member.type!r}")
        except tarfile.TarError as exc:
            raise BuildError(f"{label}: corrupt or truncated tar archive ({exc})") from None
        except EOFError:
            raise BuildError(f"{label}: truncated tar archive") from None
        finally:
            archive.close()
        for parts, member in reversed(directories):
            with _parent_fd(root_fd, parts, label) as dfd:
                _apply_metadata(dfd, parts[-1], member, symlink=False)
    finally:
        os.close(root_fd)


class _Source:
    """Blobs of an OCI layout or docker-save archive, from a directory or a tarball."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._names: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115  (closed by close())
                for m in self._tar.getmembers():
                    self._names[posixpath.normpath(m.name.lstrip("./") or ".")] = m
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise BuildError(f"{path}: corrupt or truncated image archive ({exc})") from None
        elif not path.is_dir():
            raise BuildError(f"{path}: no such OCI layout directory or image tarball")

    def has(self, name: str) -> bool:
        if self._tar is not None:
            return posixpath.normpath(name) in self._names
        return (self.path / name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        parts = _clean_name(name, f"{self.path}: blob")
        if self._tar is not None:
            member = self._names.get("/".join(parts))
            if member is None or not member.isreg():
                raise BuildError(f"{self.path}: the archive has no file {name!r}")
            f = self._tar.extractfile(member)
            assert f is not None
            yield f
        else:
            with open(self.path.joinpath(*parts), "rb") as f:
                yield f

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return json.loads(f.read(16 << 20))
            except (ValueError, UnicodeDecodeError) as exc:
                raise BuildError(f"{self.path}: {name} is not valid JSON ({exc})") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


class _Verified:
    """A reader that checks the sha256 of everything read against the expected digest."""

    def __init__(self, f: IO[bytes], digest: str, label: str) -> None:
        self._f, self._digest, self._label = f, digest, label
        self._hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hash.update(data)
        return data

    def finish(self) -> None:
        while rest := self._f.read(1 << 20):
            self._hash.update(rest)
        if self._hash.hexdigest() != self._digest:
            raise BuildError(f"{self._label}: content does not match its sha256 digest")


def layer_names(source: _Source) -> list[tuple[str, str | None]]:
    """(path inside the source, expected sha256 or None) of each layer, bottom first."""
    if source.has("index.json"):
        index = source.json("index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not manifests:
            raise BuildError(f"{source.path}: index.json lists no manifests")
        manifest = _blob_json(source, manifests[0])
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            raise BuildError(f"{source.path}: the image manifest has no layers list")
        return [(_blob_path(d), _blob_digest(d)) for d in layers]
    if source.has("manifest.json"):
        manifest = source.json("manifest.json")
        if not isinstance(manifest, list) or not manifest or "Layers" not in manifest[0]:
            raise BuildError(f"{source.path}: manifest.json is not a docker-save manifest")
        return [(str(name), None) for name in manifest[0]["Layers"]]
    raise BuildError(
        f"{source.path}: neither an OCI layout (index.json) nor a docker save archive "
        "(manifest.json)"
    )


def _blob_digest(descriptor: Any) -> str:
    digest = descriptor.get("digest", "") if isinstance(descriptor, dict) else ""
    algo, _, hexdigest = str(digest).partition(":")
    if (
        algo != "sha256"
        or len(hexdigest) != 64
        or not all(c in "0123456789abcdef" for c in hexdigest)
    ):
        raise BuildError(f"unsupported or malformed blob digest {digest!r}")
    return hexdigest


def _blob_path(descriptor: Any) -> str:
    return f"blobs/sha256/{_blob_digest(descriptor)}"


def _blob_json(source: _Source, descriptor: Any) -> Any:
    path = _blob_path(descriptor)
    with source.open(path) as f:
        data = f.read(16 << 20)
    if hashlib.sha256(data).hexdigest() != _blob_digest(descriptor):
        raise BuildError(f"{source.path}: {path} does not match its digest")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BuildError(f"{source.path}: {path} is not valid JSON ({exc})") from None


def unpack_image(path: Path, root: Path) -> int:
    """Apply every layer of the image at ``path`` onto ``root``; returns the layer count."""
    source = _Source(path)
    try:
        layers = layer_names(source)
        for i, (name, digest) in enumerate(layers):
            label = f"layer {i + 1}/{len(layers)} ({name})"
            with source.open(name) as f:
                verified = _Verified(f, digest, label) if digest else None
                apply_layer(verified or f, root, label)  # type: ignore[arg-type]
                if verified is not None:
                    verified.finish()
        return len(layers)
    finally:
        source.close()
