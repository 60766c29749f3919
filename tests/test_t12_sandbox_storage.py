"""Where a sandbox keeps its disks: an object store or a block store of the caller's own
(``Sandbox(disk=...)``), and volumes (ext4 disks over a second virtio-blk device)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import trio

import blockstore
from blockstore import LeaseHeld
from vm import VMError
from vm.launcher import Sandbox
from vm.snapshot import SnapshotError, save_memory
from vm.volumes import VolumeAttachment, VolumeError, create_volume, disk_name, remove_volume

pytestmark = [pytest.mark.vm, pytest.mark.slow]


class FileBlockStore:
    """A caller's own block store: one file per block, fsynced at flush (torkbot's
    ``rootfs.cow`` in spirit). Not a lanekit class: what ``Sandbox(disk=...)`` must take."""

    block_size = 64 << 10

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.unsynced: set[Path] = set()

    async def list_blocks(self) -> dict[int, bool]:
        return {int(p.name): p.stat().st_size > 0 for p in self.directory.iterdir()}

    async def read_blocks(self, blocks: Sequence[int]) -> dict[int, bytes | None]:
        def read() -> dict[int, bytes | None]:
            found: dict[int, bytes | None] = {}
            for block in blocks:
                path = self.directory / str(block)
                found[block] = path.read_bytes() if path.exists() else None
            return found

        return await trio.to_thread.run_sync(read)

    async def write_blocks(self, blocks: Mapping[int, bytes | None]) -> None:
        def write() -> None:
            for block, data in blocks.items():
                path = self.directory / str(block)
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(data)
                    self.unsynced.add(path)

        await trio.to_thread.run_sync(write)

    async def flush(self) -> None:
        def sync() -> None:
            for path in list(self.unsynced):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                self.unsynced.discard(path)
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(sync)


def test_own_block_store_and_volumes(vm_home: Path, tmp_path: Path) -> None:
    """Two boots on the caller's block store: what the first wrote, the second reads. The
    first writes a volume (and a second writer is refused meanwhile); the second attaches
    it read-only and sees it, and cannot write it."""
    objects = blockstore.LocalObjectStore(tmp_path / "store")
    trio.run(create_volume, objects, "work", 32 << 20)
    volume = (objects, disk_name("work"))
    cow = tmp_path / "cow"
    first = Sandbox(
        "shell", home=vm_home, memory_mib=256, disk=FileBlockStore(cow),
        volumes=[VolumeAttachment("/work", volume)],
    )  # fmt: skip
    with first.run() as m:
        m.exec_text(["sh", "-c", "echo mine > /root/own; echo shared > /work/f; sync"])
        assert b"/work ext4 rw" in m.read_file("/proc/mounts")
        second_writer = Sandbox(
            "shell", home=vm_home, memory_mib=256, volumes=[VolumeAttachment("/work", volume)]
        )
        with pytest.raises(LeaseHeld, match="attached for writing elsewhere"), second_writer.run():
            pass
        with pytest.raises(VolumeError, match="attached for writing"):
            remove_volume(objects, "work")
    assert any(cow.iterdir())  # the written blocks went to the caller's store
    again = Sandbox(
        "shell", home=vm_home, memory_mib=256, disk=FileBlockStore(cow),
        volumes=[VolumeAttachment("/work", volume, read_only=True)],
    )  # fmt: skip
    with again.run() as m:
        assert m.read_file("/root/own") == b"mine\n"
        assert m.read_file("/work/f") == b"shared\n"
        refused = m.exec(["sh", "-c", "echo x > /work/g"])
        assert refused.exit_code != 0 and b"Read-only" in refused.stderr
    remove_volume(objects, "work")
    with pytest.raises(VolumeError, match="no volume named"):
        remove_volume(objects, "work")


def test_disk_in_an_object_store(vm_home: Path, tmp_path: Path) -> None:
    """An ObjectStore alone holds the disk ``root``, created on the image and leased. (The
    same boot has a virtiofs mount, which qemu 7.2 cannot migrate: no memory snapshot.)"""
    objects = blockstore.LocalObjectStore(tmp_path / "store")
    sandbox = Sandbox("shell", home=vm_home, memory_mib=256, disk=objects)
    (tmp_path / "shared").mkdir()
    with sandbox.run({"/shared": tmp_path / "shared"}) as m:
        m.exec_text(["sh", "-c", "echo kept > /root/kept; sync"])
        assert blockstore.disk_info(objects, "root")["lease_holder"] is not None
        with pytest.raises(SnapshotError, match=r"virtiofs mounts \(/shared\).*vhost-user-fs"):
            m._call(save_memory, m._machine, tmp_path / "memory.bin")
        assert m.exec_text(["cat", "/root/kept"]) == "kept\n"  # it runs on
        assert not (tmp_path / "memory.bin").exists()
    info = blockstore.disk_info(objects, "root")
    assert info["base_digest"] == sandbox.registry.lookup("shell").digest
    assert info["lease_holder"] is None and info["generation"] > 0


def test_disk_arguments_that_cannot_work(vm_home: Path, tmp_path: Path) -> None:
    with (
        pytest.raises(VMError, match="give a disk URL"),
        Sandbox(
            "shell",
            home=vm_home,
            disk=42,  # type: ignore[arg-type]
        ).run(),
    ):
        pass
    with (
        pytest.raises(VMError, match="a BlockStore you pass in has none"),
        Sandbox("shell", home=vm_home, disk=FileBlockStore(tmp_path / "cow"), force=True).run(),
    ):
        pass
    with pytest.raises(VolumeError, match="at least 16 MiB"):
        trio.run(create_volume, blockstore.LocalObjectStore(tmp_path / "s"), "tiny", 1 << 20)
