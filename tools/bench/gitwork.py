"""A guest's small-file work on a durable disk in S3 vs a local raw file through qemu-nbd.

One boot (Debian bookworm with git, TCG) with two volumes of the same size and the same
ext4 (``vm.volumes``' own mkfs): one a lanekit disk in S3 (SeaweedFS on loopback), the
other a raw file on the host's disk served by qemu-nbd, whose blockdev takes the second
volume's place. In each, in turn: unpack a source tree of a few thousand files (a tar in
the guest's tmpfs, made here from a fixed seed), ``git init``, ``git add -A``, ``git
commit``, ``sync``, timed from the host around that one exec. ``sync`` returns once the
data is durable: in S3 for ours (NBD flush), on the host's disk for qemu-nbd (fdatasync).
"""

from __future__ import annotations

import io
import os
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import trio

import blockstore
from vm.launcher import Sandbox
from vm.machine import Machine
from vm.registry import Healthcheck, ImageEntry
from vm.state import state_paths
from vm.volumes import VolumeAttachment, create_volume, disk_name, make_filesystem

from ..s3server import S3Server
from .harness import Report
from .served import QemuNBD

OURS = "lanekit disk in S3 (durable)"
LOCAL = "qemu-nbd (local raw file)"
METRIC = "unpack + git init/add/commit + sync"
VOLUME_SIZE = 1 << 30
WORDS = [
    "static", "int", "return", "struct", "const", "void", "if", "else", "for", "while",
    "buffer", "length", "offset", "error", "value", "count", "size_t", "char", "unsigned",
    "#include", "#define", "{", "}", "(", ")", ";", "=", "->", "0", "1", "NULL", "//",
]  # fmt: skip
WORKLOAD = (
    "set -e; mkdir -p {path}/src; cd {path}/src; tar -xf /tmp/tree.tar; git init -q; "
    "git add -A; git -c user.name=bench -c user.email=bench@lanekit.test commit -qm tree; "
    "sync; git count-objects -v | grep -E '^(count|size):'"
)


def source_tree(files: int, seed: int = 19) -> bytes:
    """A tar of ``files`` text files in nested directories, sized like a C source tree
    (median about 3 KiB, a few over 30 KiB), from a fixed seed: the same bytes every run."""
    rng = random.Random(seed)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(files):
            size = min(int(rng.lognormvariate(8.0, 1.0)), 64 << 10)
            words: list[str] = []
            length = 0
            while length < size:
                word = rng.choice(WORDS)
                words.append(word)
                length += len(word) + 1
            body = (" ".join(words)[:size] + "\n").encode()
            name = f"tree/d{i % 37:02d}/s{i % 11}/f{i:05d}.c"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(body), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


class _SwappedVolume(Sandbox):
    """The second volume's blockdev points at qemu-nbd instead of lanekit's server."""

    local_socket: Path | None = None

    def _qemu_argv(self, *args: object, **kwargs: object) -> list[str]:
        argv = super()._qemu_argv(*args, **kwargs)  # type: ignore[arg-type]
        out = []
        for arg in argv:
            if "node-name=vol1," in arg and self.local_socket is not None:
                arg = (
                    f"driver=nbd,node-name=vol1,server.type=unix,"
                    f"server.path={self.local_socket},discard=unmap"
                )
            out.append(arg)
        return out


def _git_image(home: Path) -> ImageEntry:
    registry, images, _ = state_paths(home)
    images.on_phase = lambda phase: print(f"  image: {phase}", flush=True)
    meta = images.build_debian("bookworm", ["git"])
    entry = ImageEntry(
        id="gitwork", image="lanekit/gitwork:bookworm",
        healthcheck=Healthcheck(("git", "--version")), default_entrypoint=("sh", "-c"),
        description="Debian 12 minbase with git (benchmark)", digest=meta.digest,
    )  # fmt: skip
    return (
        registry.register(entry)
        if not registry.has(entry.id)
        else registry.pin(entry.id, meta.digest)
    )


async def _work(machine: Machine, path: str) -> float:
    start = time.perf_counter()
    result = await machine.exec(["sh", "-c", WORKLOAD.format(path=path)])
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"the workload failed in {path}: {result.stderr_text[-500:]}")
    await machine.exec(["rm", "-rf", f"{path}/src"])
    await machine.exec(["sync"])
    return elapsed


def run(*, quick: bool = False) -> Report:
    files, repeats = (300, 1) if quick else (3000, 3)
    report = Report("gitwork", __doc__.split("\n\n")[0] if __doc__ else "gitwork")
    report.metric(METRIC, "s", higher_is_better=False, baseline=LOCAL)
    tree = source_tree(files)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-gitwork-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        entry = _git_image(home)
        raw = tmp / "local.raw"
        make_filesystem(raw, VOLUME_SIZE, "local")
        with S3Server(tmp / "s3") as s3:
            s3.client().create_bucket(Bucket="gitwork")
            os.environ.update(s3.env)
            objects = blockstore.open_store("s3://gitwork/bench", s3_endpoint=s3.endpoint)
            for name in ("ours", "stand-in"):
                trio.run(create_volume, objects, name, VOLUME_SIZE)
            local = QemuNBD(raw, tmp / "qemu-nbd.sock")
            local.start()
            try:
                sandbox = _SwappedVolume(
                    entry, home=home, memory_mib=1024, s3_endpoint=s3.endpoint,
                    volumes=[
                        VolumeAttachment("/ours", (objects, disk_name("ours"))),
                        VolumeAttachment("/local", (objects, disk_name("stand-in"))),
                    ],
                )  # fmt: skip
                sandbox.local_socket = local.sock

                async def measure() -> None:
                    async with sandbox.boot() as machine:
                        await machine.fs.write("/tmp/tree.tar", tree)
                        for _ in range(repeats):  # alternating, so drift hits both
                            report.add(METRIC, OURS, await _work(machine, "/ours"))
                            report.add(METRIC, LOCAL, await _work(machine, "/local"))

                allocated = os.stat(raw).st_blocks * 512
                trio.run(measure)
            finally:
                local.stop()
        grown = os.stat(raw).st_blocks * 512 - allocated
        if grown < len(tree):  # the swap of the second volume's blockdev did not happen
            raise RuntimeError(f"the local raw file grew by {grown} bytes only")
    times = {case: statistics.median(v) for case, v in report.metrics[METRIC].values.items()}
    report.notes += [
        f"{files} files, {len(tree) >> 20} MiB of tar; 1 vCPU, 1024 MiB guest; TCG unless "
        f"KVM works; {repeats} runs each, alternating in one boot",
        f"throughput ratio (qemu-nbd's time / ours): {times[LOCAL] / times[OURS]:.2f}x "
        "(goal at least 0.7x)",
    ]
    return report
