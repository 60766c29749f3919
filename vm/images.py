"""Content-addressed base images: build a tree, make it a raw ext4 disk, store it by digest.

An image is ``images/sha256/<digest>/disk.raw`` plus ``meta.json`` under the state
directory. A build works in its own directory under ``images/build/`` and moves the
finished disk into place with one rename, so a failed build (bad input, a full disk)
leaves nothing behind and registers nothing. Builds are reproducible: the same recipe
and the same host packages give the same digest on any host (every time in the tree and
in the filesystem is fixed, as are the filesystem's UUID and directory hash seed, which
are derived from the tree's content). Images travel between hosts through object stores
as read-only disks (:mod:`vm.transfer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blockstore import sha256_file

from .errors import BuildError, ImageNotFoundError
from .guest import install_busybox_userland, prepare_tree
from .oci import unpack_image
from .proc import run_tool
from .registry import DIGEST_RE, ImageEntry

MIB = 1 << 20
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


def check_digest(digest: str) -> str:
    digest = digest.removeprefix("sha256:")
    if not DIGEST_RE.fullmatch(digest):
        raise ImageNotFoundError(f"{digest!r} is not a sha256 image digest (64 hex characters)")
    return digest


def not_built_message(entry: ImageEntry) -> str:
    """What to run when an image is registered but not built on this host: only commands
    that work for that entry."""
    if entry.id in RECIPES:
        return f"image {entry.id!r} is not built on this host: run `lanekit image build {entry.id}`"
    return (
        f"image {entry.id!r} ({entry.image}) is registered but not built on this host: build "
        f"it with `lanekit image build --from-oci FILE --id {entry.id}` (an OCI layout or "
        f"`docker save` tarball), `lanekit image build --debian bookworm --packages PKG... "
        f"--id {entry.id}` or `lanekit image build --from-dir DIR --id {entry.id}`, or fetch "
        f"a built one with `lanekit image pull sha256:DIGEST --store URL --id {entry.id}`"
    )


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


FIXED_TIME = 1577836800
"""2020-01-01: every time in an image (files, directories, the filesystem's own)."""


def tree_uuids(root: Path) -> tuple[str, str]:
    """A filesystem UUID and a directory hash seed derived from the tree's content, so the
    same tree makes the same image (mkfs picks both at random otherwise)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            digest.update(f"{rel}\0{st.st_mode}:{st.st_uid}:{st.st_gid}:{st.st_rdev}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                digest.update(bytes.fromhex(sha256_file(path)))
    raw = digest.digest()
    return str(uuid.UUID(bytes=raw[:16], version=4)), str(uuid.UUID(bytes=raw[16:], version=4))


def set_fixed_times(root: Path) -> None:
    """Every file's access and modification time to :data:`FIXED_TIME` (mkfs copies them)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    os.utime(root, (FIXED_TIME, FIXED_TIME))


def fix_change_times(tree: Path, disk: Path, work: Path) -> None:
    """mkfs copies each file's ctime, which no call can set: set them in the image instead
    (one debugfs run for the whole tree). Names debugfs cannot quote keep theirs."""
    commands = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in sorted(dirnames + filenames):
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), tree)
            if '"' not in rel and "\n" not in rel and "\\" not in rel:
                commands.append(f'sif "{rel}" ctime {FIXED_TIME:#x}\n')
    script = work / "ctimes.debugfs"
    script.write_text("".join(commands))
    _run(
        ["debugfs", "-w", "-f", str(script), str(disk)],
        "debugfs (fixing change times)",
        env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)},
    )


DEBIAN_NOISE = (
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/apt/extended_states",
)
"""Files a debootstrap run fills with times or chance: removed from images."""


def clean_debian_tree(tree: Path) -> None:
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (tree / cache).glob("*"):
            if item.is_file() and item.name != "lock":
                item.unlink()
    for rel in DEBIAN_NOISE:
        with contextlib.suppress(FileNotFoundError):
            (tree / rel).unlink()
    for log in (tree / "var/log").rglob("*"):
        if log.is_file() and not log.is_symlink():
            log.write_bytes(b"")
    for rel in ("etc/machine-id", "var/lib/dbus/machine-id"):
        path = tree / rel
        if path.is_file() and not path.is_symlink():
            path.write_bytes(b"")


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
        self.on_phase: Callable[[str], None] = lambda text: None
        """Told what a build does next (the CLI shows it on a terminal)."""

    def path(self, digest: str) -> Path:
        digest = check_digest(digest)
        disk = self.by_digest / digest / "disk.raw"
        if not disk.is_file():
            raise ImageNotFoundError(
                f"no image sha256:{digest} in {self.by_digest}: build it or pull it"
            )
        return disk

    def meta(self, digest: str) -> ImageMeta:
        self.path(digest)
        with open(self.by_digest / check_digest(digest) / "meta.json") as f:
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
            self.on_phase("fixing times and identities (reproducible builds)")
            fs_uuid, hash_seed = tree_uuids(tree)
            set_fixed_times(tree)
            self.on_phase(f"making the ext4 filesystem ({disk_size >> 20} MiB)")
            _run(
                ["mkfs.ext4", "-q", "-F", "-L", "lanekit-root", "-m", "0", "-U", fs_uuid,
                 "-E", f"root_owner=0:0,hash_seed={hash_seed}", "-d", str(tree), str(disk)],
                "mkfs.ext4 -d (making the image's filesystem)",
                env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)},
            )  # fmt: skip
            fix_change_times(tree, disk, work)
            self.on_phase("checking the filesystem (e2fsck)")
            _run(["e2fsck", "-fn", str(disk)], "e2fsck of the new image")
            self.on_phase("hashing and storing the image")
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
            self.on_phase(f"copying {directory}")
            _run(["cp", "-a", "--", f"{directory}/.", str(tree)], f"copying {directory}")
            return {"kind": "dir", "path": str(directory)}

        return self.build(populate, size=size)

    def build_from_oci(self, archive: Path, size: int | None = None) -> ImageMeta:
        archive = archive.absolute()

        def populate(tree: Path) -> dict[str, Any]:
            self.on_phase(f"unpacking the layers of {archive.name}")
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
            what = " with " + " ".join(packages) if packages else ""
            self.on_phase(f"debootstrap {suite}{what} from {mirror} (the slow part)")
            argv = ["debootstrap", "--variant=minbase"]
            if packages:
                argv.append("--include=" + ",".join(packages))
            _run(
                [*argv, suite, str(tree), mirror],
                f"debootstrap {suite}",
                env={
                    **os.environ,
                    "DEBIAN_FRONTEND": "noninteractive",
                    "SOURCE_DATE_EPOCH": str(FIXED_TIME),
                },
            )
            clean_debian_tree(tree)
            return {"kind": "debian", "suite": suite, "packages": list(packages)}

        return self.build(populate, size=size)

    def build_recipe(self, name: str, size: int | None = None) -> ImageMeta:
        if name not in RECIPES:
            raise BuildError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
        packages = RECIPES[name]
        if packages is None:

            def populate(tree: Path) -> dict[str, Any]:
                self.on_phase("installing busybox")
                install_busybox_userland(tree)
                return {"kind": "recipe", "recipe": name}

            return self.build(populate, size=size)
        return self.build_debian("bookworm", packages, size=size)
