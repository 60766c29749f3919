"""Boot to first exec result: a lanekit sandbox vs a bare qemu boot of the same kernel.

Cases, all in one run on the same machine and accelerator:

- *bare qemu (floor)*: the same qemu machine, kernel and initramfs, told to power off as
  soon as the virtio modules are loaded — what any boot on this machine costs;
- *lanekit, warm root disk*: ``Sandbox("shell").boot()`` then ``exec(["true"])`` (which
  first runs the image's healthcheck); root disk blocks come from the local base image;
- *lanekit, cold root disk in S3*: the image imported into SeaweedFS as a disk with no
  base; each boot opens a fresh fork of its checkpoint, so every block the boot reads is
  fetched from S3.

It also reports how many blocks a cold boot fetches next to the image's stored blocks:
lazy fetch should touch a small fraction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

import blockstore
from tools.s3server import S3Server
from vm.accel import choose_accelerator
from vm.launcher import Sandbox, _host_tsc_khz

from .harness import Report

FLOOR = "bare qemu boot, power off at once (floor)"
WARM = "lanekit sandbox, warm root disk (local base image)"
COLD = "lanekit sandbox, cold root disk (every block from S3)"


def _floor_seconds(sandbox: Sandbox, accel: str) -> float:
    assets = sandbox.kernels.ensure()
    with tempfile.TemporaryDirectory() as tmp:
        cmdline = ["console=ttyS0", "quiet", "panic=-1", "reboot=t", "lanekit.poweroff"]
        khz = _host_tsc_khz() if accel == "tcg" else None
        if khz:
            cmdline += [f"tsc_early_khz={khz}", "tsc=reliable"]
        line = " ".join(cmdline)
        argv = sandbox._qemu_argv(Path(tmp), accel, assets.kernel, assets.initramfs, line, 0)
        # No root disk, agent or mounts: drop the devices that need a server behind them.
        keep: list[str] = []
        skip = 0
        for i, arg in enumerate(argv):
            if skip:
                skip -= 1
                continue
            if arg in ("-blockdev", "-device", "-chardev") and i + 1 < len(argv):
                skip = 1
                continue
            keep.append(arg)
        start = time.monotonic()
        subprocess.run(keep, check=True, capture_output=True, timeout=120)
        return time.monotonic() - start


async def _boot_seconds(sandbox: Sandbox) -> tuple[float, int]:
    start = time.monotonic()
    async with sandbox.boot() as machine:
        await machine.exec(["true"])
        elapsed = time.monotonic() - start
        fetched = (await machine.metrics()).blocks_fetched
    return elapsed, fetched


def run(*, quick: bool = False) -> Report:
    repeats = 1 if quick else 5
    report = Report(
        "vmboot",
        "Time from boot start to the first exec result, and blocks a boot fetches.",
    )
    report.metric("boot to first exec result", "s", higher_is_better=False, baseline=FLOOR)
    report.metric("blocks fetched by one boot", "blocks", higher_is_better=False)
    report.metric("blocks stored in the image disk", "blocks", higher_is_better=False)
    report.metric("blocks in the image (its size)", "blocks", higher_is_better=False)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-vmboot-") as tmp:
        _measure(report, Path(tmp), repeats)
    report.notes.append(
        "The floor includes loading the virtio modules; the sandbox adds mounting the root "
        "over NBD, the guest init, the guest agent's start-up and the healthcheck exec."
    )
    return report


def _measure(report: Report, home: Path, repeats: int) -> None:
    warm = Sandbox("shell", home=home, memory_mib=256)
    warm._local_image()
    accel = choose_accelerator(warm.kernels.ensure().kernel, home / "accel.json", None)
    report.notes.append(f"accelerator: {accel}; 1 vCPU, 256 MiB; shell image (busybox)")
    with tempfile.TemporaryDirectory() as s3dir, S3Server(Path(s3dir)) as server:
        client = server.client()
        client.create_bucket(Bucket="vmboot")
        os.environ.update(server.env)
        store = "s3://vmboot/lanes"
        _, image = warm._local_image()
        subprocess.run(
            [sys.executable, "-m", "tools.cli", "disk", "import", str(image), f"{store}/image",
             "--s3-endpoint", server.endpoint],
            check=True, capture_output=True,
        )  # fmt: skip
        objects = blockstore.open_store(store, s3_endpoint=server.endpoint)
        blockstore.checkpoint_disk(objects, "image", "v1")
        info = blockstore.disk_info(objects, "image")
        stored, total = info["stored_blocks"], info["size"] // info["block_size"]
        for _ in range(repeats):
            report.add("boot to first exec result", FLOOR, _floor_seconds(warm, accel))
            seconds, _ = trio.run(_boot_seconds, warm)
            report.add("boot to first exec result", WARM, seconds)
            lane = f"lane-{uuid.uuid4().hex[:8]}"
            blockstore.fork_disk(objects, "image", "v1", lane)
            cold = Sandbox(
                "shell", home=home, memory_mib=256, disk=f"{store}/{lane}",
                s3_endpoint=server.endpoint,
            )  # fmt: skip
            seconds, fetched = trio.run(_boot_seconds, cold)
            report.add("boot to first exec result", COLD, seconds)
            report.add("blocks fetched by one boot", COLD, fetched)
            report.add("blocks stored in the image disk", COLD, stored)
            report.add("blocks in the image (its size)", COLD, total)
