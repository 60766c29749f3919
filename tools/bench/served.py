"""The served disk, side by side with its peers, on one machine and one SeaweedFS.

Cases: qemu-nbd on a local raw file (the local ceiling), our NBD server, nbdkit's S3
plugin, our FUSE file under a loop device, and s3backer's file mode (256 KiB blocks) under
a loop device. Sequential copies use nbdcopy for every case (to an NBD URI or to the loop
device); random 4 KiB I/O uses fio (its nbd engine, or libaio with O_DIRECT on the loop
device). "Cold" means the server restarted and the kernel's caches dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vm.proc import spawn

from ..config import parse_size
from ..s3server import ACCESS_KEY, SECRET_KEY, S3Server
from .harness import Report

MiB = 1 << 20
REQUEST_1M = "--request-size=1048576"
FSYNC_EVERY = 64
"""Random writes with a flush every this many, as a guest's fsync-heavy work does."""
CACHE = "1G"
"""The same cache budget for our servers and s3backer (its default is 1000 blocks)."""


def sh(*argv: str, timeout: float = 900) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


SYNCED = f"4K random write, fsync every {FSYNC_EVERY}"
SYNCED_DURABLE = f"4K random write, fsync every {FSYNC_EVERY}, durable in S3"
UPLOADED = "bytes uploaded per durable 4K random write"
SUSTAINED_BEFORE, SUSTAINED_IOS = 20000, 8000
SUSTAINED = f"{SYNCED}, sustained (after {SUSTAINED_BEFORE:,} random writes, same server)"


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fio_iops(target: list[str], rw: str, ios: int, *extra: str) -> float:
    out = sh(
        "fio", "--name=bench", "--output-format=json", f"--rw={rw}", "--bs=4k",
        "--iodepth=16", f"--io_size={ios * 4096}", "--randrepeat=1", "--norandommap",
        "--end_fsync=1" if rw == "randwrite" else "--end_fsync=0", *extra, *target,
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return float(side["iops"])


class Service:
    """Something that serves the disk: start() makes it reachable, stop() shuts it down."""

    name = ""
    kind = "nbd"
    random_io = True
    """False where 4 KiB requests are refused (a minimum block size above 4 KiB)."""

    def start(self) -> None: ...

    def stop(self) -> dict[str, float]:
        return {}

    def target(self) -> str:
        return ""


class Proc(Service):
    def __init__(self, argv: list[str], ready: Callable[[], bool]) -> None:
        self.argv, self.ready = argv, ready
        self.proc: subprocess.Popen[str] | None = None
        self.output = ""

    def start(self) -> None:
        sock = getattr(self, "sock", None)
        if isinstance(sock, Path) and sock.exists():
            sock.unlink()
        # Dies with the benchmark (PDEATHSIG), however the benchmark dies.
        self.proc = spawn(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"{self.argv[0]} did not start: {out}")
            time.sleep(0.05)

    def stop(self) -> dict[str, float]:
        proc, self.proc = self.proc, None
        if proc is None:
            return {}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            self.output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            self.output, _ = proc.communicate()
        return {}


class LanekitNBD(Proc):
    name, kind = "lanekit NBD (S3)", "nbd"

    def __init__(self, url: str, sock: Path) -> None:
        self.sock = sock
        super().__init__(
            [
                sys.executable,
                "-m",
                "tools.cli",
                "disk",
                "serve",
                url,
                "--nbd",
                f"unix:{sock}",
                "--cache",
                CACHE,
            ],
            sock.exists,
        )

    def target(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> dict[str, float]:
        super().stop()
        m = re.search(r"^stats: (.*)$", self.output, re.M)
        if not m:
            return {}
        stats = json.loads(m.group(1))
        return {"puts": stats["store_puts"], "uploaded": stats["store_bytes_uploaded"]}


class QemuNBD(Proc):
    name, kind = "qemu-nbd (local raw file)", "nbd"

    def __init__(self, image: Path, sock: Path) -> None:
        self.sock = sock
        super().__init__(
            ["qemu-nbd", "-f", "raw", "-k", str(sock), "--persistent", "--shared=8", str(image)],
            sock.exists,
        )

    def target(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


class NbdkitS3(Proc):
    name, kind = "nbdkit S3 plugin", "nbd"
    random_io = False

    def __init__(self, endpoint: str, bucket: str, size: int, sock: Path) -> None:
        self.sock = sock
        super().__init__(
            [
                "nbdkit", "-f", "-U", str(sock), "S3", f"endpoint-url={endpoint}",
                f"access-key={ACCESS_KEY}", f"secret-key={SECRET_KEY}", f"bucket={bucket}",
                "key=disk", f"size={size}", "object-size=65536",
            ],
            sock.exists,
        )  # fmt: skip

    def target(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


class FileMount(Proc):
    """A FUSE file (ours or s3backer's) with a loop device on top."""

    kind = "loop"

    def __init__(self, name: str, argv: list[str], file: Path) -> None:
        self.name, self.file = name, file
        self.dev = ""
        super().__init__(argv, file.exists)

    def start(self) -> None:
        super().start()
        self.dev = sh("losetup", "-f", "--show", "--direct-io=on", str(self.file)).strip()

    def stop(self) -> dict[str, float]:
        # Stopped twice (by the measurement, then on the way out): the loop device's number
        # may belong to someone else by the second time.
        dev, self.dev = self.dev, ""
        if dev:
            sh("losetup", "-d", dev)
        result: dict[str, float] = {}
        mountpoint = str(self.file.parent)
        if self.name.startswith("s3backer") and self.proc is not None:
            # s3backer writes its cache back after the unmount: let it finish.
            sh("fusermount3", "-u", mountpoint)
            self.output, _ = self.proc.communicate(timeout=600)
            self.proc = None
        super().stop()
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
        if self.name.startswith("lanekit"):
            m = re.search(r"^stats: (.*)$", self.output, re.M)
            if m:
                stats = json.loads(m.group(1))
                result["puts"] = stats["store_puts"]
                result["uploaded"] = stats["store_bytes_uploaded"]
        return result

    def target(self) -> str:
        return self.dev


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    service.start()
    try:
        yield service
    finally:
        with contextlib.suppress(Exception):
            service.stop()


def fio_target(service: Service) -> list[str]:
    if service.kind == "nbd":
        return ["--ioengine=nbd", f"--uri={service.target()}"]
    return ["--ioengine=libaio", "--direct=1", f"--filename={service.target()}"]


def measure(
    service: Service, src: Path, size: int, report: Report, count_objects: Callable[[], int]
) -> None:
    ios = 2000
    gib = size / (1 << 30)
    with running(service):
        t = timed(lambda: sh("nbdcopy", "--flush", REQUEST_1M, str(src), service.target()))
        report.add("sequential write + sync", service.name, size / t / 1e6)
        stats: dict[str, float] = {}
        t_stop = timed(lambda: stats.update(service.stop()))
        report.add("sequential write, durable in S3", service.name, size / (t + t_stop) / 1e6)
        if "puts" in stats:
            report.add("PUTs per GiB written", service.name, stats["puts"] / gib)
        elif service.name.startswith("s3backer"):
            report.add("PUTs per GiB written", service.name, count_objects() / gib)
    drop_caches()
    with running(service):
        t = timed(lambda: sh("nbdcopy", REQUEST_1M, service.target(), "null:"))
        report.add("cold sequential read", service.name, size / t / 1e6)
        t = timed(lambda: sh("nbdcopy", REQUEST_1M, service.target(), "null:"))
        report.add("warm sequential read", service.name, size / t / 1e6)
        if not service.random_io:
            return
        target = fio_target(service)
        report.add("4K random read", service.name, fio_iops(target, "randread", ios))
        report.add("4K random write", service.name, fio_iops(target, "randwrite", ios))
    # Small durable writes on a server restarted (cold) over written data: its upload
    # counter then covers exactly these writes (and the compaction they cause).
    drop_caches()
    with running(service):
        sync, target = f"--fsync={FSYNC_EVERY}", fio_target(service)
        t = timed(
            lambda: report.add(SYNCED, service.name, fio_iops(target, "randwrite", ios, sync))
        )
        stats.clear()
        t_stop = timed(lambda: stats.update(service.stop()))
        report.add(SYNCED_DURABLE, service.name, ios / (t + t_stop))
        if "uploaded" in stats:
            report.add(UPLOADED, service.name, stats["uploaded"] / ios)
    if service.kind == "nbd" and service.random_io:
        # What a long-running writer sees: compaction has the earlier writes to fold.
        with running(service):
            target = fio_target(service)
            fio_iops(target, "randwrite", SUSTAINED_BEFORE)
            sync = f"--fsync={FSYNC_EVERY}"
            report.add(SUSTAINED, service.name, fio_iops(target, "randwrite", SUSTAINED_IOS, sync))


def run(*, quick: bool = False) -> Report:
    size = (64 if quick else 512) * MiB
    repeats = 1 if quick else 2
    report = Report(
        "served",
        f"Served disks side by side, {size >> 20} MiB of incompressible data, one SeaweedFS on "
        "loopback. Sequential: nbdcopy (1 MiB requests) to and from an NBD URI or the loop "
        "device; random: fio, 4 KiB, queue depth 16 (nbd engine, or libaio O_DIRECT on loop). "
        "'write + sync' stops when the client's flush is acknowledged; 'durable in S3' also "
        "counts shutting the server down, after which every byte is in S3 (s3backer "
        "acknowledges fsync with data still in its write-back cache). Cache budget: "
        f"{CACHE} for ours and for s3backer.",
    )
    local = "qemu-nbd (local raw file)"
    for metric, unit, better in (
        ("sequential write + sync", "MB/s", True),
        ("sequential write, durable in S3", "MB/s", True),
        ("cold sequential read", "MB/s", True),
        ("warm sequential read", "MB/s", True),
        ("4K random read", "IOPS", True),
        ("4K random write", "IOPS", True),
        (SYNCED, "IOPS", True),
        (SYNCED_DURABLE, "IOPS", True),
        (SUSTAINED, "IOPS", True),
        (UPLOADED, "bytes", False),
        ("PUTs per GiB written", "requests", False),
    ):
        report.metric(
            metric,
            unit,
            higher_is_better=better,
            baseline="s3backer file (256K blocks)" if metric.startswith("PUT") else local,
        )
    report.metrics[UPLOADED].baseline = None
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-served-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src.raw"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        with S3Server(tmp / "s3") as s3:
            client = s3.client()
            env_patch = dict(s3.env)
            os.environ.update(env_patch)
            for rep in range(repeats):
                bucket = f"served-{rep}"
                client.create_bucket(Bucket=bucket)
                sb_bucket = f"s3backer-{rep}"
                client.create_bucket(Bucket=sb_bucket)
                raw = tmp / f"local-{rep}.raw"
                with open(raw, "wb") as f:
                    f.truncate(size)
                lk_url = f"s3://{bucket}/lanekit/vol"
                sh(sys.executable, "-m", "tools.cli", "disk", "create", lk_url, "--size", str(size))
                fuse_url = f"s3://{bucket}/lanekit/fusevol"
                sh(
                    sys.executable,
                    "-m",
                    "tools.cli",
                    "disk",
                    "create",
                    fuse_url,
                    "--size",
                    str(size),
                )
                lk_mnt, sb_mnt = tmp / f"lkmnt{rep}", tmp / f"sbmnt{rep}"
                lk_mnt.mkdir()
                sb_mnt.mkdir()
                services: list[Service] = [
                    QemuNBD(raw, tmp / f"qemu{rep}.sock"),
                    LanekitNBD(lk_url, tmp / f"lk{rep}.sock"),
                    NbdkitS3(s3.endpoint, bucket, size, tmp / f"nbdkit{rep}.sock"),
                    FileMount(
                        "lanekit FUSE file + loop (S3)",
                        [sys.executable, "-m", "tools.cli", "disk", "mount", fuse_url, str(lk_mnt),
                         "--cache", CACHE],
                        lk_mnt / "disk",
                    ),
                    FileMount(
                        "s3backer file (256K blocks) + loop",
                        [
                            "s3backer", "-f", "--blockSize=256k", f"--size={size}",
                            f"--blockCacheSize={parse_size(CACHE) // (256 << 10)}",
                            f"--baseURL={s3.endpoint}/", f"--accessId={ACCESS_KEY}",
                            f"--accessKey={SECRET_KEY}", "--listBlocks", sb_bucket, str(sb_mnt),
                        ],
                        sb_mnt / "file",
                    ),
                ]  # fmt: skip

                def s3backer_objects(b: str = sb_bucket) -> int:
                    pages = client.get_paginator("list_objects_v2").paginate(Bucket=b)
                    return sum(len(p.get("Contents", [])) for p in pages)

                for service in services:
                    try:
                        measure(service, src, size, report, s3backer_objects)
                    except Exception as e:
                        report.notes.append(f"run {rep}: {service.name} failed: {e}"[:400])
    report.metrics["PUTs per GiB written"].baseline = "s3backer file (256K blocks) + loop"
    report.notes.append(
        "PUT counts: ours from the server's own counters (packs + manifest + head); s3backer's "
        "is the number of block objects stored after unmount (a lower bound: one PUT per "
        "block, rewrites not counted); nbdkit's S3 plugin (64 KiB objects, its largest allowed "
        "minimum block size) keeps no count.",
    )
    report.notes.append(
        f"'{SUSTAINED}': NBD servers only: on a server started for it, fio writes "
        f"{SUSTAINED_BEFORE:,} random 4 KiB blocks, then {SUSTAINED_IOS:,} more with an fsync "
        f"every {FSYNC_EVERY}, measured: what a writer that runs a while sees, with our "
        "compaction folding the earlier writes in the background.",
    )
    report.notes.append(
        f"'{SYNCED}': fio, 4 KiB random writes at queue depth 16 with an fsync (NBD FLUSH, or "
        "fsync of the loop device) after every 64, on a server restarted over the written "
        "disk; 'durable in S3' also counts stopping the server. Bytes uploaded: the server's "
        "own counter for that session (data, manifest, heads, compaction) over the writes."
    )
    report.notes.append(
        "nbdkit's S3 plugin has no random 4 KiB figures: its 64 KiB minimum block size makes "
        "it refuse 4 KiB requests (fio's nbd engine fails with EINVAL)."
    )
    return report
