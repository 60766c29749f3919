"""Content-addressed base images: build a tree, make it a raw ext4 disk, store it by digest.

An image is ``images/sha256/<digest>/disk.raw`` plus ``meta.json`` under the state
directory. A build works in its own directory under ``images/build/`` and moves the
finished disk into place with one rename, so a failed build (bad input, a full disk)
leaves nothing behind and registers nothing. Images travel through any blockstore
:class:`~blockstore.ObjectStore`: the disk is cut into 4 MiB chunks, all-zero chunks are
skipped, the rest are lz4-compressed, and the meta lists each chunk's sha256; a pull
verifies every chunk and then the whole digest before the image appears.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lz4.frame

from blockstore import ObjectNotFound, ObjectStore, sha256_file

from .errors import BuildError, ImageNotFoundError
from .guest import install_busybox_userland, prepare_tree
from .oci import unpack_image
from .proc import run_tool
from .registry import DIGEST_RE

MIB = 1 << 20
CHUNK = 4 * MIB
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPES: dict[str, tuple[str, ...] | None] = {
    "shell": None,
    "python": ("python3",),
    "javascript": ("nodejs",),
}
"""Built-in recipes: ``shell`` is busybox; the others are Debian minbase plus packages."""


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    digest: str
    size: int
    source: dict[str, Any]
    created: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageMeta:
        return cls(data["digest"], data["size"], data["source"], data["created"])


def _check_digest(digest: str) -> str:
    digest = digest.removeprefix("sha256:")
    if not DIGEST_RE.fullmatch(digest):
        raise ImageNotFoundError(f"{digest!r} is not a sha256 image digest (64 hex characters)")
    return digest


def _run(argv: Sequence[str], what: str, **kwargs: Any) -> None:
    run_tool(argv, what, error=BuildError, **kwargs)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def default_size(content: int) -> int:
    """Room for the tree plus working space, in whole 64 MiB steps, at least 256 MiB."""
    size = max(256 * MIB, int(content * 1.5) + 192 * MIB)
    return -(-size // (64 * MIB)) * (64 * MIB)


class ImageStore:
    """Built images by digest under ``root`` (``$LANEKIT_HOME/images``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_digest = root / "sha256"
        self.builds = root / "build"

    def path(self, digest: str) -> Path:
        digest = _check_digest(digest)
        disk = self.by_digest / digest / "disk.raw"
        if not disk.is_file():
            raise ImageNotFoundError(
                f"no image sha256:{digest} in {self.by_digest}: build it or pull it"
            )
        return disk

    def meta(self, digest: str) -> ImageMeta:
        self.path(digest)
        with open(self.by_digest / _check_digest(digest) / "meta.json") as f:
            return ImageMeta.from_json(json.load(f))

    def has(self, digest: str) -> bool:
        try:
            self.path(digest)
            return True
        except ImageNotFoundError:
            return False

    def list(self) -> list[ImageMeta]:
        if not self.by_digest.is_dir():
            return []
        out = []
        for d in sorted(self.by_digest.iterdir()):
            if (d / "meta.json").is_file() and (d / "disk.raw").is_file():
                with open(d / "meta.json") as f:
                    out.append(ImageMeta.from_json(json.load(f)))
        return out

    def new_build_dir(self) -> Path:
        self.builds.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="build-", dir=self.builds))

    def add(self, disk: Path, source: dict[str, Any], digest: str | None = None) -> ImageMeta:
        """Move a finished raw disk (in a build dir on the same filesystem) into the store."""
        digest = digest or sha256_file(disk)
        meta = ImageMeta(
            digest=digest,
            size=disk.stat().st_size,
            source=source,
            created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )
        if self.has(digest):
            disk.unlink()
            return self.meta(digest)
        staging = disk.parent / "entry"
        staging.mkdir()
        os.rename(disk, staging / "disk.raw")
        with open(staging / "meta.json", "w") as f:
            json.dump(meta.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(staging / "disk.raw", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(staging / "disk.raw", 0o444)
        self.by_digest.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, self.by_digest / digest)
        except OSError:
            if not self.has(digest):
                raise
        return meta

    # ------------------------------------------------------------ building

    def build(
        self,
        populate: Callable[[Path], dict[str, Any]],
        *,
        size: int | None = None,
    ) -> ImageMeta:
        """Run ``populate(tree)`` (returns the source description), then make and store the disk."""
        work = self.new_build_dir()
        try:
            tree = work / "tree"
            tree.mkdir()
            os.chmod(tree, 0o755)
            source = populate(tree)
            prepare_tree(tree)
            disk = work / "disk.raw"
            disk_size = size or default_size(tree_bytes(tree))
            with open(disk, "wb") as f:
                f.truncate(disk_size)
            _run(
                ["mkfs.ext4", "-q", "-F", "-L", "lanekit-root", "-m", "0",
                 "-E", "root_owner=0:0", "-d", str(tree), str(disk)],
                "mkfs.ext4 -d (making the image's filesystem)",
                env={**os.environ, "E2FSPROGS_FAKE_TIME": str(int(time.time()))},
            )  # fmt: skip
            _run(["e2fsck", "-fn", str(disk)], "e2fsck of the new image")
            return self.add(disk, source)
        except OSError as exc:
            raise BuildError(f"image build failed: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def build_from_dir(self, directory: Path, size: int | None = None) -> ImageMeta:
        directory = directory.absolute()
        if not directory.is_dir():
            raise BuildError(f"{directory} is not a directory")

        def populate(tree: Path) -> dict[str, Any]:
            _run(["cp", "-a", "--", f"{directory}/.", str(tree)], f"copying {directory}")
            return {"kind": "dir", "path": str(directory)}

        return self.build(populate, size=size)

    def build_from_oci(self, archive: Path, size: int | None = None) -> ImageMeta:
        archive = archive.absolute()

        def populate(tree: Path) -> dict[str, Any]:
            layers = unpack_image(archive, tree)
            return {"kind": "oci", "path": str(archive), "layers": layers}

        return self.build(populate, size=size)

    def build_debian(
        self,
        suite: str,
        packages: Sequence[str] = (),
        *,
        mirror: str = DEFAULT_MIRROR,
        size: int | None = None,
    ) -> ImageMeta:
        for name in (suite, *packages):
            if not name or name.startswith("-") or any(c in name for c in " ,\n\t/\\'\"$`;|&"):
                raise BuildError(f"invalid Debian suite or package name {name!r}")

        def populate(tree: Path) -> dict[str, Any]:
            argv = ["debootstrap", "--variant=minbase"]
            if packages:
                argv.append("--include=" + ",".join(packages))
            _run(
                [*argv, suite, str(tree), mirror],
                f"debootstrap {suite}",
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (tree / cache).glob("*"):
                    if item.is_file() and item.name not in ("lock",):
                        item.unlink()
            return {"kind": "debian", "suite": suite, "packages": list(packages)}

        return self.build(populate, size=size)

    def build_recipe(self, name: str, size: int | None = None) -> ImageMeta:
        if name not in RECIPES:
            raise BuildError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
        packages = RECIPES[name]
        if packages is None:

            def populate(tree: Path) -> dict[str, Any]:
                install_busybox_userland(tree)
                return {"kind": "recipe", "recipe": name}

            return self.build(populate, size=size)
        return self.build_debian("bookworm", packages, size=size)

    # ------------------------------------------------------------ travel

    def push(self, digest: str, objects: ObjectStore, prefix: str = "images") -> int:
        """Upload an image (skipping all-zero chunks); returns the number of chunks sent."""
        disk = self.path(digest)
        meta = self.meta(digest)
        base = f"{prefix}/sha256/{meta.digest}"
        chunks: list[str | None] = []
        sent = 0
        zero = bytes(CHUNK)
        with open(disk, "rb") as f:
            index = 0
            while data := f.read(CHUNK):
                if data == zero[: len(data)]:
                    chunks.append(None)
                else:
                    chunk_digest = hashlib.sha256(data).hexdigest()
                    chunks.append(chunk_digest)
                    objects.put(f"{base}/chunks/{index:08d}", lz4.frame.compress(data))
                    sent += 1
                index += 1
        manifest = {**meta.to_json(), "chunk_size": CHUNK, "chunks": chunks}
        objects.put(f"{base}/manifest.json", json.dumps(manifest).encode())
        return sent

    def pull(self, digest: str, objects: ObjectStore, prefix: str = "images") -> ImageMeta:
        """Download and verify an image; it appears in the store only once it checks out."""
        digest = _check_digest(digest)
        if self.has(digest):
            return self.meta(digest)
        base = f"{prefix}/sha256/{digest}"
        try:
            manifest = json.loads(objects.get(f"{base}/manifest.json").data)
        except ObjectNotFound:
            raise ImageNotFoundError(f"no image sha256:{digest} under {prefix}/ in that store")
        work = self.new_build_dir()
        try:
            disk = work / "disk.raw"
            with open(disk, "wb") as f:
                f.truncate(int(manifest["size"]))
                for index, chunk_digest in enumerate(manifest["chunks"]):
                    if chunk_digest is None:
                        continue
                    data = lz4.frame.decompress(objects.get(f"{base}/chunks/{index:08d}").data)
                    if hashlib.sha256(data).hexdigest() != chunk_digest:
                        raise BuildError(f"chunk {index} of image sha256:{digest} is corrupt")
                    f.seek(index * int(manifest["chunk_size"]))
                    f.write(data)
            if sha256_file(disk) != digest:
                raise BuildError(f"pulled image does not match sha256:{digest}")
            return self.add(disk, manifest["source"], digest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
