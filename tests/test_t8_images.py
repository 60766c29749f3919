"""Image builder, image store, kernel assets, push/pull, and the image CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vm import BuildError, ImageNotFoundError, Registry, transfer
from vm.errors import UnsafeArchive
from vm.images import ImageStore
from vm.kernel import GUEST_MODULES, KernelCache, load_order, module_dependencies

from .blockdev import sh


def debugfs(image: Path, request: str) -> str:
    return sh("debugfs", "-R", request, str(image)).stdout


def guest_file(image: Path, path: str) -> bytes:
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    return out.stdout


def guest_exists(image: Path, path: str) -> bool:
    out = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True
    )
    return "File not found" not in out.stderr and "Inode:" in out.stdout


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def leftovers(store: ImageStore) -> list[str]:
    return sorted(os.listdir(store.builds)) if store.builds.exists() else []


# ------------------------------------------------------------ layers


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw) if compress else raw


def entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for k, v in fields.items():
        setattr(info, k, v)
    return info


def oci_layout(path: Path, layers: list[bytes]) -> Path:
    """Write an OCI image layout tarball with these layer blobs."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = add(b"{}")
    manifest = add(
        json.dumps(
            {
                "schemaVersion": 2,
                "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
                "layers": [
                    {**add(layer), "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
                    for layer in layers
                ],
            }
        ).encode()
    )
    index = {"schemaVersion": 2, "manifests": [manifest]}
    members = [
        (entry("oci-layout"), b'{"imageLayoutVersion": "1.0.0"}'),
        (entry("index.json"), json.dumps(index).encode()),
    ]
    members += [(entry(f"blobs/sha256/{d}"), data) for d, data in blobs.items()]
    path.write_bytes(tar_bytes(members))
    return path


def docker_save(path: Path, layers: list[bytes]) -> Path:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    names = []
    for i, layer in enumerate(layers):
        names.append(f"l{i}/layer.tar")
        members.append((entry(names[-1]), layer))
    manifest = [{"Config": "config.json", "RepoTags": ["x:1"], "Layers": names}]
    members.append((entry("manifest.json"), json.dumps(manifest).encode()))
    members.append((entry("config.json"), b"{}"))
    path.write_bytes(tar_bytes(members))
    return path


BASE_LAYER = [
    (entry("etc", tarfile.DIRTYPE), None),
    (entry("etc/keep"), b"keep"),
    (entry("etc/gone"), b"to be whited out"),
    (entry("opaque", tarfile.DIRTYPE), None),
    (entry("opaque/old"), b"old"),
    (entry("bin", tarfile.DIRTYPE), None),
    (entry("bin/tool", mode=0o755), b"#!/bin/sh\necho tool\n"),
    (entry("bin/alias", tarfile.LNKTYPE, linkname="bin/tool"), None),
    (entry("bin/sh-link", tarfile.SYMTYPE, linkname="/bin/busybox"), None),
]
TOP_LAYER = [
    (entry("etc/.wh.gone"), b""),
    (entry("opaque/.wh..wh..opq"), b""),
    (entry("opaque/new"), b"new"),
    (entry("etc/keep"), b"replaced"),
]


@pytest.mark.parametrize("layout", ["oci", "docker"])
def test_oci_layers_with_whiteouts(store: ImageStore, tmp_path: Path, layout: str) -> None:
    layers = [tar_bytes(BASE_LAYER, compress=True), tar_bytes(TOP_LAYER, compress=True)]
    if layout == "oci":
        archive = oci_layout(tmp_path / "img.tar", layers)
    else:
        archive = docker_save(tmp_path / "img.tar", [tar_bytes(BASE_LAYER), tar_bytes(TOP_LAYER)])
    meta = store.build_from_oci(archive)
    image = store.path(meta.digest)
    assert meta.source["layers"] == 2
    assert guest_file(image, "/etc/keep") == b"replaced"
    assert not guest_exists(image, "/etc/gone")
    assert not guest_exists(image, "/opaque/old")
    assert guest_file(image, "/opaque/new") == b"new"
    assert "Links: 2" in debugfs(image, "stat /bin/alias")
    assert "/bin/busybox" in debugfs(image, "stat /bin/sh-link")
    for required in ("/lanekit", "/workspace", "/tmp", "/mnt"):
        assert guest_exists(image, required), required
    assert leftovers(store) == []
    sh("e2fsck", "-fn", str(image))


def test_oci_blob_digest_is_checked(store: ImageStore, tmp_path: Path) -> None:
    archive = oci_layout(tmp_path / "img.tar", [tar_bytes(BASE_LAYER)])
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]  # type: ignore[union-attr]
    tampered = []
    for info, data in members:
        if data is not None and info.name.startswith("blobs/") and b"etc/keep" in data:
            data = data.replace(b"keep\x00", b"kept\x00")
        tampered.append((info, data))
    archive.write_bytes(tar_bytes(tampered))
    with pytest.raises(BuildError, match="digest"):
        store.build_from_oci(archive)
    assert leftovers(store) == [] and store.list() == []


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(entry("../escape"), b"x")], "climbs out"),
        ([(entry("/etc/passwd"), b"x")], "absolute"),
        ([(entry("a/../../x"), b"x")], "climbs out"),
        ([(entry("up", tarfile.SYMTYPE, linkname="../../.."), None)], "outside the image"),
        (
            [
                (entry("link", tarfile.SYMTYPE, linkname="/"), None),
                (entry("link/etc/owned"), b"x"),
            ],
            "symlink",
        ),
        ([(entry("hl", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)], "climbs out"),
        ([(entry("hl", tarfile.LNKTYPE, linkname="etc/missing"), None)], "not in the image"),
        ([(entry("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None)], "device"),
        ([(entry("blk", tarfile.BLKTYPE, devmajor=8, devminor=0), None)], "device"),
    ],
)
def test_unsafe_layers_refused(
    store: ImageStore,
    tmp_path: Path,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    message: str,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = docker_save(tmp_path / "bad.tar", [tar_bytes(members)])
    with pytest.raises(UnsafeArchive, match=message):
        store.build_from_oci(archive)
    assert leftovers(store) == [] and store.list() == []
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-an-image", "missing"])
def test_corrupt_archives(store: ImageStore, tmp_path: Path, damage: str) -> None:
    good = docker_save(tmp_path / "good.tar", [tar_bytes(BASE_LAYER)]).read_bytes()
    path = tmp_path / "bad.tar"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(10000))
    elif damage == "not-an-image":
        path.write_bytes(tar_bytes([(entry("hello"), b"hi")]))
    with pytest.raises(BuildError):
        store.build_from_oci(path)
    assert leftovers(store) == [] and store.list() == []


def test_build_from_dir_and_content_addressing(store: ImageStore, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "app").mkdir(parents=True)
    (tree / "app" / "main.sh").write_text("echo hi\n")
    os.symlink("main.sh", tree / "app" / "link")
    meta = store.build_from_dir(tree)
    image = store.path(meta.digest)
    assert guest_file(image, "/app/main.sh") == b"echo hi\n"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == meta.digest
    assert store.meta(meta.digest).source == {"kind": "dir", "path": str(tree)}
    assert [m.digest for m in store.list()] == [meta.digest]
    with pytest.raises(ImageNotFoundError):
        store.path("0" * 64)
    with pytest.raises(ImageNotFoundError):
        store.path("../../etc")


def test_shell_recipe(store: ImageStore) -> None:
    meta = store.build_recipe("shell")
    image = store.path(meta.digest)
    assert guest_exists(image, "/bin/sh") and guest_exists(image, "/bin/busybox")
    assert guest_exists(image, "/lanekit")
    assert not guest_exists(image, "/lanekit/qemu-ga")  # the runtime comes with the initramfs


def test_full_disk_during_build(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small))
    try:
        store = ImageStore(small / "images")
        with pytest.raises(BuildError):
            store.build_recipe("shell")
        assert leftovers(store) == [] and store.list() == []
    finally:
        sh("umount", str(small))


def test_push_pull_round_trip(store: ImageStore, tmp_path: Path, s3: object) -> None:
    """An image travels as a read-only disk of the store: its data only (zeros and holes
    skipped), and a pull is verified against the digest before it appears."""
    objects = s3.object_store("images-test")  # type: ignore[attr-defined]
    meta = store.build_recipe("shell")
    sent = trio.run(transfer.push, store, meta.digest, objects)
    assert 0 < sent < meta.size // 4
    assert trio.run(transfer.push, store, meta.digest, objects) == 0  # once per store
    other = ImageStore(tmp_path / "other-host")
    pulled = trio.run(transfer.pull, other, meta.digest, objects)
    assert pulled.digest == meta.digest
    assert other.path(meta.digest).read_bytes() == store.path(meta.digest).read_bytes()
    with pytest.raises(ImageNotFoundError, match="push it from a host that has it"):
        trio.run(transfer.pull, ImageStore(tmp_path / "third"), "1" * 64, objects)


def test_pull_detects_corruption(store: ImageStore, tmp_path: Path) -> None:
    from blockstore import CorruptBlock, LocalObjectStore

    objects = LocalObjectStore(tmp_path / "remote")
    meta = store.build_recipe("shell")
    trio.run(transfer.push, store, meta.digest, objects)
    key = next(k.key for k in objects.list("packs/"))
    data = bytearray(objects.get(key).data)
    data[100] ^= 0xFF
    path = objects.root / key
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    other = ImageStore(tmp_path / "other")
    with pytest.raises(CorruptBlock):
        trio.run(transfer.pull, other, meta.digest, objects)
    assert other.list() == [] and leftovers(other) == []


def test_recipes_build_reproducibly(tmp_path: Path) -> None:
    """Two hosts (two state directories) build the shell recipe to the same digest."""
    first = ImageStore(tmp_path / "a").build_recipe("shell")
    second = ImageStore(tmp_path / "b").build_recipe("shell")
    assert first.digest == second.digest


# ------------------------------------------------------------ kernel


@pytest.fixture(scope="session")
def kernels(vm_home: Path) -> KernelCache:
    return KernelCache(vm_home / "kernels")


def test_kernel_assets_cached(kernels: KernelCache) -> None:
    first = kernels.ensure()
    assert first.kernel.stat().st_size > 1 << 20
    mtime = first.initramfs.stat().st_mtime_ns
    again = kernels.ensure()
    assert again == first and again.initramfs.stat().st_mtime_ns == mtime
    listing = sh("sh", "-c", f"busybox cpio -t < {first.initramfs}").stdout
    for module in GUEST_MODULES:
        assert f"modules/{module}.ko" in listing
    names = listing.split()
    for runtime in ("init", "busybox", "poweroff", "lib/ld-linux-x86-64.so.2",
                    "python/bin/python3", "python/lib/python3.11/lanekit_agent/guest.pyc",
                    "python/lib/python3.11/lanekit_agent/protocol.pyc"):  # fmt: skip
        assert f"lanekit/{runtime}" in names, runtime
    assert "lanekit/qemu-ga" not in names  # only the benchmark's variant carries it
    qga = kernels.ensure(variant="qga")
    assert qga.initramfs != first.initramfs
    assert "lanekit/qemu-ga" in sh("sh", "-c", f"busybox cpio -t < {qga.initramfs}").stdout.split()
    assert kernels.ensure().initramfs == first.initramfs  # both variants stay cached


def test_module_order_respects_dependencies(kernels: KernelCache) -> None:
    assets = kernels.ensure()
    paths = {p.stem: p for p in (assets.kernel.parent / "modules").glob("*.ko")}
    order = load_order(module_dependencies(paths, ["virtiofs"]))
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtiofs")
    assert order.index("fuse") < order.index("virtiofs")


# ------------------------------------------------------------ CLI


def lanekit(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LANEKIT_HOME": str(home)},
        timeout=600,
    )


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "home"


def test_cli_register_list_and_validation(home: Path) -> None:
    ok = lanekit(
        "image", "register", "--id", "tool", "--ref", "team/tool:1",
        "--healthcheck", "tool --version", "--timeout-ms", "2000", home=home,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    for bad_args, message in [
        (["--id", "Bad", "--ref", "a:1", "--healthcheck", "true"], "must match"),
        (["--id", "x", "--ref=--privileged", "--healthcheck", "true"], "CLI flag"),
        (["--id", "x", "--ref", "a:$(id)", "--healthcheck", "true"], "valid registry reference"),
        (["--id", "x", "--ref", "a:1", "--healthcheck", ""], "non-empty argv"),
        (["--id", "x", "--ref", "a:1", "--healthcheck", "true", "--timeout-ms", "0"], "positive"),
        (["--id", "tool", "--ref", "a:1", "--healthcheck", "true"], "already registered"),
        (["--id", "shell", "--ref", "a:1", "--healthcheck", "true"], "already registered"),
    ]:
        bad = lanekit("image", "register", *bad_args, home=home)
        assert bad.returncode != 0 and message in bad.stderr, (bad_args, bad.stderr)
    listing = lanekit("image", "list", home=home)
    assert listing.returncode == 0
    assert "team/tool:1" in listing.stdout and "lanekit/shell:busybox" in listing.stdout
    assert not any(line.startswith("x ") for line in listing.stdout.splitlines())


def test_cli_build_pins_digest(home: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    built = lanekit("image", "build", "--from-dir", str(tree), "--id", "mine", home=home)
    assert built.returncode == 0, built.stderr
    entry = Registry(home / "images" / "registry.json").lookup("mine")
    assert entry.digest and entry.digest in built.stdout
    listing = lanekit("image", "list", home=home).stdout
    assert f"sha256:{entry.digest}" in listing
    bad = lanekit("image", "build", "--from-oci", str(tree / "f"), "--id", "broken", home=home)
    assert bad.returncode != 0 and "error" in bad.stderr
    assert not Registry(home / "images" / "registry.json").has("broken")
