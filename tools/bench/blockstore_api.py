"""The block store at the Python API level, side by side with the raw S3 ceiling.

Same SeaweedFS server, same run: sequential write+flush (incompressible and
half-compressible data), cold sequential read, random 4 KiB reads and writes, and the
requests and bytes stored per GiB written.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import S3ObjectStore, create_disk, open_disk

from ..s3server import S3Server
from .harness import Report

CHUNK = 1 << 20


def _half_compressible(n: int, rng: random.Random) -> bytes:
    """Like real filesystems: every 4 KiB holds 2 KiB of noise and 2 KiB of zeros."""
    return b"".join(rng.randbytes(2048) + bytes(2048) for _ in range(n // 4096))


def _raw_s3(client: Any, bucket: str, total: int, payload: bytes) -> tuple[float, float]:
    keys = [f"raw/{i}" for i in range(total // len(payload))]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=payload), keys))
    write = total / (time.perf_counter() - start) / 1e6
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), keys))
    read = total / (time.perf_counter() - start) / 1e6
    return write, read


async def _lanekit(
    objects: S3ObjectStore, name: str, data: list[bytes], rng: random.Random
) -> dict[str, float]:
    total = len(data) * CHUNK
    size = total + (64 << 20)
    create_disk(objects, name, size)
    out: dict[str, float] = {}
    async with open_disk((objects, name)) as disk:
        start = time.perf_counter()
        for i, chunk in enumerate(data):
            await disk.write(i * CHUNK, chunk)
        await disk.flush()
        out["write"] = total / (time.perf_counter() - start) / 1e6
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        gib = total / (1 << 30)
        out["puts_per_gib"] = store.stats.puts / gib
        out["stored_per_gib"] = store.head.stored_bytes / gib / (1 << 20)
    async with open_disk((objects, name), writable=False) as disk:
        store = disk.store
        assert isinstance(store, blockstore.ObjectBlockStore)
        start = time.perf_counter()
        for i in range(len(data)):
            await disk.read(i * CHUNK, CHUNK)
        out["cold_read"] = total / (time.perf_counter() - start) / 1e6
        out["gets_per_gib"] = store.stats.gets / gib
    nblocks = total // 4096
    async with open_disk((objects, name), writable=False) as disk:
        offsets = [rng.randrange(nblocks) * 4096 for _ in range(500)]
        start = time.perf_counter()

        async def reader(part: list[int]) -> None:
            for off in part:
                await disk.read(off, 4096)

        async with trio.open_nursery() as nursery:
            for j in range(16):
                nursery.start_soon(reader, offsets[j::16])
        out["rand_read_iops"] = len(offsets) / (time.perf_counter() - start)
    async with open_disk((objects, name), force=True) as disk:
        offsets = [rng.randrange(nblocks) * 4096 for _ in range(2000)]
        start = time.perf_counter()
        for off in offsets:
            await disk.write(off, rng.randbytes(4096))
        await disk.flush()
        out["rand_write_iops"] = len(offsets) / (time.perf_counter() - start)
    return out


def run(*, quick: bool = False) -> Report:
    total = (32 if quick else 512) << 20
    repeats = 1 if quick else 2
    report = Report(
        "blockstore",
        f"Block store API (Disk on ObjectBlockStore, 64 KiB blocks, 4 MiB packs) vs raw S3 "
        f"(boto3, 1 MiB objects, 8 threads) on the same SeaweedFS; {total >> 20} MiB per run.",
    )
    report.metric("write+flush incompressible", "MB/s", baseline="raw S3 PUT")
    report.metric("write+flush half-compressible", "MB/s", baseline="raw S3 PUT")
    report.metric("cold sequential read", "MB/s", baseline="raw S3 GET")
    report.metric("random 4K read (cold, 16 readers)", "IOPS", baseline=None)
    report.metric("random 4K write + flush", "IOPS", baseline=None)
    report.metric("PUTs per GiB written", "requests", higher_is_better=False, baseline=None)
    report.metric("GETs per GiB read", "requests", higher_is_better=False, baseline=None)
    report.metric("bytes stored per GiB written", "MiB", higher_is_better=False, baseline=None)
    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-bs-") as tmp, S3Server(Path(tmp)) as srv:
        client = srv.client()
        for rep in range(repeats):
            bucket = f"bench-{rep}"
            client.create_bucket(Bucket=bucket)
            payload = os.urandom(CHUNK)
            w, r = _raw_s3(client, bucket, total, payload)
            report.add("write+flush incompressible", "raw S3 PUT", w)
            report.add("write+flush half-compressible", "raw S3 PUT", w)
            report.add("cold sequential read", "raw S3 GET", r)
            objects = S3ObjectStore(bucket, "lanes", client=client)
            for kind, gen in (
                ("incompressible", lambda: os.urandom(CHUNK)),
                ("half-compressible", lambda: _half_compressible(CHUNK, rng)),
            ):
                data = [gen() for _ in range(total // CHUNK)]
                res = trio.run(_lanekit, objects, f"{kind}-{rep}", data, rng)
                case = f"lanekit ({kind})"
                report.add(f"write+flush {kind}", "lanekit Disk", res["write"])
                report.add("PUTs per GiB written", case, res["puts_per_gib"])
                report.add("bytes stored per GiB written", case, res["stored_per_gib"])
                if kind == "incompressible":
                    report.add("cold sequential read", "lanekit Disk", res["cold_read"])
                    report.add("GETs per GiB read", case, res["gets_per_gib"])
                    report.add(
                        "random 4K read (cold, 16 readers)", "lanekit Disk", res["rand_read_iops"]
                    )
                    report.add("random 4K write + flush", "lanekit Disk", res["rand_write_iops"])
    report.notes.append(
        "s3backer stores one object per block: at its 256 KiB blocks that is 4096 PUTs per GiB "
        "(before retries); the served-disk benchmark measures it side by side."
    )
    return report
