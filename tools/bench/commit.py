"""What a durable flush of a few small writes costs, in round trips of the store it is on.

The SeaweedFS server on loopback, reached directly and through a proxy that delays every
byte (``delay.DelayProxy``), as an S3 some milliseconds away would: one raw 4 KiB PUT (the
floor: a commit needs at least the head's conditional PUT) against a flush of 64 random
4 KiB writes on a lanekit disk. The disk flushes the way it does by default (the pack of
the writes goes up beside the manifest segment that names it, then the head), and, as
the older order, with packs too small to wait for the flush (each uploaded before the
segment is). The ratio to the PUT is the flush's cost in round trips.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio

from blockstore import S3ObjectStore, create_disk, open_disk

from ..s3server import S3Server
from .delay import DelayProxy
from .harness import Report

WRITES = 64
BLOCK = 64 << 10
SIZE = 256 << 20


def _put_ms(objects: S3ObjectStore, count: int) -> float:
    body = os.urandom(4096)
    times = []
    for i in range(count):
        start = time.perf_counter()
        objects.put(f"raw/{i}", body)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


async def _flush_ms(objects: S3ObjectStore, name: str, count: int, pack_size: int) -> float:
    rng = random.Random(7)
    times = []
    async with open_disk((objects, name), pack_size=pack_size) as disk:
        for _ in range(count):
            for _ in range(WRITES):
                await disk.write(rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096))
            start = time.perf_counter()
            await disk.flush()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(*, quick: bool = False) -> Report:
    rtts = (0, 10) if quick else (0, 10, 40)
    count = 8 if quick else 30
    repeats = 1 if quick else 3
    report = Report(
        "commit",
        f"A durable flush of {WRITES} random 4 KiB writes (64 KiB blocks, written data, "
        "compaction in the background) against one raw 4 KiB PUT, on SeaweedFS on "
        "loopback reached directly or through a proxy delaying each direction by half "
        f"the round-trip time named. Medians of {count} flushes or PUTs per run; ratio: "
        "the flush's cost in PUT round trips.",
    )
    with (
        tempfile.TemporaryDirectory(prefix="lanekit-bench-commit-") as tmp,
        S3Server(Path(tmp) / "s3") as s3,
    ):
        os.environ.update(s3.env)
        s3.client().create_bucket(Bucket="commit")
        seed = S3ObjectStore("commit", "disks/", endpoint_url=s3.endpoint)
        create_disk(seed, "d", SIZE, block_size=BLOCK)

        async def fill() -> None:
            async with open_disk((seed, "d")) as disk:
                await disk.write(0, os.urandom(SIZE))

        trio.run(fill)
        for rtt in rtts:
            metric = report.metric(
                f"durable flush of {WRITES} small writes, {rtt} ms round trip",
                "ms",
                higher_is_better=False,
                baseline="raw 4 KiB PUT",
            ).name
            with DelayProxy(s3.ports[3], rtt / 2e3) as proxy:
                endpoint = proxy.endpoint if rtt else s3.endpoint
                objects = S3ObjectStore("commit", "disks/", endpoint_url=endpoint)
                for _ in range(repeats):
                    report.add(metric, "raw 4 KiB PUT", _put_ms(objects, count))
                    for case, pack_size in (
                        ("lanekit Disk", 4 << 20),
                        ("lanekit Disk, packs sent before the segment", 128 << 10),
                    ):
                        ms = trio.run(_flush_ms, objects, "d", count, pack_size)
                        report.add(metric, case, ms)
                objects.close()
        seed.close()
    report.notes.append(
        "The older order (packs of at most 128 KiB, so a flush's 256 KiB of writes never "
        "waits for it) uploads the packs first, then the segment, then the head: three "
        "round trips. The default sends pack and segment together: two. On loopback the "
        "server's own CPU (two cores, shared) is most of a PUT, so overlapping gains "
        "little there; the delayed cases show what it gains where the distance dominates."
    )
    return report
