"""Root disks as users move them around: checkpoint boots, another host, takeovers,
disks that cannot boot."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import blockstore
from vm import BootError
from vm.launcher import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def disk_hash(url: str, base: Path | None) -> str:
    async def main() -> str:
        digest = hashlib.sha256()
        async with blockstore.open_disk(url, writable=False, base=base) as disk:
            for offset in range(0, disk.size, 8 << 20):
                digest.update(await disk.read(offset, min(8 << 20, disk.size - offset)))
        return digest.hexdigest()

    return trio.run(main)


def lanekit(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, timeout=600,
        env={**os.environ, "LANEKIT_HOME": str(home)},
    )  # fmt: skip


def test_booting_a_checkpoint_never_writes_it(vm_home: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/cp1"
    sandbox = Sandbox("shell", home=vm_home, memory_mib=256, disk=url)
    with sandbox.run() as m:
        m.exec_text(["sh", "-c", "echo v1 > /root/version; sync"])
    objects, name, _ = blockstore.resolve(url)
    blockstore.checkpoint_disk(objects, name, "t1")
    base = sandbox.images.path(blockstore.disk_info(objects, name)["base_digest"])
    before = disk_hash(f"{url}@t1", base)
    generation = blockstore.disk_info(objects, name)["generation"]
    frozen = Sandbox("shell", home=vm_home, memory_mib=256, disk=f"{url}@t1")
    with frozen.run() as m:
        assert m.read_file("/root/version") == b"v1\n"
        m.exec_text(["sh", "-c", "echo v2 > /root/version; sync"])
        assert m.read_file("/root/version") == b"v2\n"  # writable, as a throwaway copy
    assert disk_hash(f"{url}@t1", base) == before
    assert blockstore.disk_info(objects, name)["generation"] == generation
    with sandbox.run() as m:
        assert m.read_file("/root/version") == b"v1\n"
    done = lanekit(vm_home, "disk", "create", f"{url}x@t1", "--size", "1G")
    assert done.returncode == 2 and b"lanekit disk fork" in done.stderr


def test_a_disk_moves_to_a_host_that_built_nothing(
    vm_home: Path, tmp_path: Path, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host A boots a disk in S3 and writes; host B, with nothing built, boots the same
    URL: the image comes from the store, block by block, as the guest reads it."""
    endpoint = s3.endpoint  # type: ignore[attr-defined]
    bucket = s3.new_bucket()  # type: ignore[attr-defined]
    for key, value in s3.env.items():  # type: ignore[attr-defined]
        monkeypatch.setenv(key, value)
    url = f"s3://{bucket}/lanes/l1"
    a = Sandbox("shell", home=vm_home, memory_mib=256, disk=url, s3_endpoint=endpoint)
    with a.run() as m:
        m.exec_text(["sh", "-c", "echo from-a > /root/note; sync"])
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    (host_b / "kernels").symlink_to(vm_home / "kernels")  # a kernel is the host's, not the lane's
    b = Sandbox("shell", home=host_b, memory_mib=256, disk=url, s3_endpoint=endpoint)
    with b.run() as m:
        assert m.read_file("/root/note") == b"from-a\n"
        image_disk = m._machine.disk.base._disk  # type: ignore[union-attr]
        root = m._machine.disk.store
        fetched = image_disk.store.stats.bytes_downloaded + root.stats.bytes_downloaded  # type: ignore[attr-defined]
        size = image_disk.size
        print(f"host B fetched {fetched} bytes of a {size}-byte image before its exec")
        assert fetched < size // 20
    assert not (host_b / "images" / "sha256").exists()  # B built and pulled nothing


def test_taking_a_disk_over(vm_home: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/shared"
    env = {**os.environ, "LANEKIT_HOME": str(vm_home)}
    holder = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell", "--memory", "256",
         "--disk", url, "--", "sh", "-c", "echo up; while :; do date > /root/a; sleep 1; done"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        busy = lanekit(vm_home, "vm", "run", "--image", "shell", "--disk", url, "--", "true")
        assert busy.returncode == 75 and b"in use by host" in busy.stderr, busy.stderr
        started = time.monotonic()
        waited = lanekit(vm_home, "vm", "run", "--image", "shell", "--disk", url, "--wait", "3",
                         "--", "true")  # fmt: skip
        assert waited.returncode == 75 and b"waiting up to 3 s" in waited.stderr
        assert time.monotonic() - started >= 3
        took = lanekit(vm_home, "vm", "run", "--image", "shell", "--memory", "256",
                       "--disk", url, "--force", "--",
                       "sh", "-c", "echo b > /root/owner; sync")  # fmt: skip
        assert took.returncode == 0, took.stderr
        holder.wait(120)  # the old holder notices it was fenced and stops
        assert holder.stderr is not None
        err = holder.stderr.read()
        assert holder.returncode != 0 and b"fenced: another host took this disk over" in err, err
        assert b"Traceback" not in err
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    done = lanekit(vm_home, "vm", "run", "--image", "shell", "--memory", "256", "--disk", url,
                   "--", "cat", "/root/owner")  # fmt: skip
    assert done.stdout == b"b\n", done.stderr


def test_a_disk_that_cannot_boot_says_why(vm_home: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store/blank"
    assert lanekit(vm_home, "disk", "create", url, "--size", "64M").returncode == 0
    sandbox = Sandbox("shell", home=vm_home, memory_mib=256, disk=url, boot_timeout=120)
    with pytest.raises(BootError, match="cannot mount /dev/vda") as caught, sandbox.run():
        pass
    assert "blank disk" in str(caught.value)
    done = lanekit(vm_home, "vm", "run", "--image", "shell", "--disk", url, "--", "true")
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert b"the guest did not boot" in done.stderr
