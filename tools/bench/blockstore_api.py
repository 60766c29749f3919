"""The block store at the Python API level, side by side with the raw S3 ceiling.

Same SeaweedFS server, same run: sequential write+flush (incompressible and
half-compressible data), cold sequential read, random 4 KiB reads, random 4 KiB writes
with a flush every 64 (what a guest's fsync does), the bytes each such durable write
uploads, requests and bytes stored per GiB written; the same small-write and sequential
figures at several block sizes (what the default block size rests on); and the scale of
the block map: resident bytes per stored block, open time and single-block commit time at
10^4, 10^6 and 1.6 * 10^7 stored blocks.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import ObjectBlockStore, S3ObjectStore, create_disk, open_disk

from ..s3server import S3Server
from .harness import Report

CHUNK = 1 << 20
FSYNC_EVERY = 64
SMALL_WRITES = 2000


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


def _store(disk: blockstore.Disk) -> ObjectBlockStore:
    assert isinstance(disk.store, ObjectBlockStore)
    return disk.store


async def _small_writes(
    objects: S3ObjectStore, name: str, nblocks_4k: int, rng: random.Random
) -> dict[str, float]:
    """4 KiB random writes over written data, a flush every FSYNC_EVERY (on a reopened
    disk: the blocks are cold, in S3 only). Uploads counted to the end of compaction."""
    out: dict[str, float] = {}
    async with open_disk((objects, name), force=True) as disk:
        store = _store(disk)
        uploaded = store.stats.bytes_uploaded
        offsets = [rng.randrange(nblocks_4k) * 4096 for _ in range(SMALL_WRITES)]
        start = time.perf_counter()
        for i, off in enumerate(offsets):
            await disk.write(off, rng.randbytes(4096))
            if i % FSYNC_EVERY == FSYNC_EVERY - 1:
                await disk.flush()
        await disk.flush()
        out["iops"] = len(offsets) / (time.perf_counter() - start)
        await disk.compact()
        out["bytes_per_write"] = (store.stats.bytes_uploaded - uploaded) / len(offsets)
        out["gets"] = store.stats.gets
    return out


async def _lanekit(
    objects: S3ObjectStore, name: str, data: list[bytes], rng: random.Random, block_size: int
) -> dict[str, float]:
    total = len(data) * CHUNK
    size = total + (64 << 20)
    create_disk(objects, name, size, block_size=block_size)
    out: dict[str, float] = {}
    async with open_disk((objects, name)) as disk:
        start = time.perf_counter()
        for i, chunk in enumerate(data):
            await disk.write(i * CHUNK, chunk)
        await disk.flush()
        out["write"] = total / (time.perf_counter() - start) / 1e6
        store = _store(disk)
        gib = total / (1 << 30)
        out["puts_per_gib"] = store.stats.puts / gib
        out["stored_per_gib"] = store.head.stored_bytes / gib / (1 << 20)
    async with open_disk((objects, name), writable=False) as disk:
        store = _store(disk)
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
    small = await _small_writes(objects, name, nblocks, rng)
    out["rand_write_iops"] = small["iops"]
    out["bytes_per_small_write"] = small["bytes_per_write"]
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _scale(objects: S3ObjectStore, name: str, stored: int) -> dict[str, float]:
    """A disk of ``stored`` small compressible 4 KiB blocks written through the API; then
    the map's resident size, open times and one-block commits."""
    bs, batch = 4096, 1 << 18
    create_disk(objects, name, stored * bs, block_size=bs)
    store = await ObjectBlockStore.open(objects, name, writable=True, pack_size=64 << 20)
    block = b"\x5a" * bs
    for lo in range(0, stored, batch):
        await store.write_blocks(dict.fromkeys(range(lo, min(stored, lo + batch)), block))
        await store.flush()
        while await store.compact():
            pass
    times = []
    for i in range(7):
        await store.renew_lease()
        start = time.perf_counter()
        await store.write_blocks({(i * 7919) % stored: os.urandom(bs)})
        await store.flush()
        times.append(time.perf_counter() - start)
    await store.release()
    del store
    gc.collect()
    out: dict[str, float] = {"commit_ms": statistics.median(times[2:]) * 1000}
    before = _rss()
    start = time.perf_counter()
    reader = await ObjectBlockStore.open(objects, name, writable=False)
    out["open_ms"] = (time.perf_counter() - start) * 1000
    await reader.load_map()
    out["map_bytes_per_block"] = reader.map_nbytes() / stored
    out["rss_per_block"] = max(0, _rss() - before) / stored
    del reader
    gc.collect()
    return out


def run(*, quick: bool = False) -> Report:
    total = (32 if quick else 512) << 20
    repeats = 1 if quick else 2
    scales = (10_000, 100_000) if quick else (10_000, 1_000_000, 16_000_000)
    block_sizes = (16 << 10, 64 << 10, 256 << 10)
    report = Report(
        "blockstore",
        f"Block store API (Disk on ObjectBlockStore, 4 MiB packs) vs raw S3 (boto3, 1 MiB "
        f"objects, 8 threads) on the same SeaweedFS; {total >> 20} MiB per run, 64 KiB "
        f"blocks unless a case names another. Small writes: {SMALL_WRITES} random 4 KiB "
        f"writes over written data on a reopened disk, a flush every {FSYNC_EVERY}; their "
        "uploads are counted to the end of compaction. Scale: 4 KiB blocks of one "
        "repeated byte written through the API.",
    )
    report.metric("write+flush incompressible", "MB/s", baseline="raw S3 PUT")
    report.metric("write+flush half-compressible", "MB/s", baseline="raw S3 PUT")
    report.metric("cold sequential read", "MB/s", baseline="raw S3 GET")
    report.metric("random 4K read (cold, 16 readers)", "IOPS", baseline=None)
    report.metric(f"random 4K write, flush every {FSYNC_EVERY}", "IOPS", baseline=None)
    report.metric(
        "bytes uploaded per durable 4K random write", "bytes", higher_is_better=False, baseline=None
    )
    report.metric("PUTs per GiB written", "requests", higher_is_better=False, baseline=None)
    report.metric("GETs per GiB read", "requests", higher_is_better=False, baseline=None)
    report.metric("bytes stored per GiB written", "MiB", higher_is_better=False, baseline=None)
    for metric, unit, better in (
        ("map: resident bytes per stored block", "bytes", False),
        ("map: process RSS per stored block", "bytes", False),
        ("open time (read-only)", "ms", False),
        ("single-block commit time", "ms", False),
    ):
        report.metric(metric, unit, higher_is_better=better, baseline=f"{scales[0]:.0e} blocks")
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
                res = trio.run(_lanekit, objects, f"{kind}-{rep}", data, rng, 64 << 10)
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
            data = [os.urandom(CHUNK) for _ in range(total // CHUNK)]
            for bs in block_sizes:
                res = trio.run(_lanekit, objects, f"bs{bs >> 10}k-{rep}", data, rng, bs)
                case = f"lanekit Disk, {bs >> 10} KiB blocks"
                report.add(
                    f"random 4K write, flush every {FSYNC_EVERY}", case, res["rand_write_iops"]
                )
                report.add(
                    "bytes uploaded per durable 4K random write", case, res["bytes_per_small_write"]
                )
                if bs != 64 << 10:
                    report.add("write+flush incompressible", case, res["write"])
                    report.add("cold sequential read", case, res["cold_read"])
                    report.add("GETs per GiB read", case, res["gets_per_gib"])
                    report.add("random 4K read (cold, 16 readers)", case, res["rand_read_iops"])
            if rep == 0:
                for stored in scales:
                    res = trio.run(_scale, objects, f"scale-{stored}", stored)
                    case = f"{stored:.0e} blocks"
                    report.add(
                        "map: resident bytes per stored block", case, res["map_bytes_per_block"]
                    )
                    report.add("map: process RSS per stored block", case, res["rss_per_block"])
                    report.add("open time (read-only)", case, res["open_ms"])
                    report.add("single-block commit time", case, res["commit_ms"])
    report.notes.append(
        "s3backer stores one object per block: at its 256 KiB blocks that is 4096 PUTs per GiB "
        "(before retries); the served-disk benchmark measures it side by side."
    )
    report.notes.append(
        "Resident bytes per stored block: the map's arrays, page and pack tables "
        "(ObjectBlockStore.map_nbytes) with every page loaded; process RSS: the growth of "
        "the reader's RSS while it loads them. Commit time: median of five one-block flushes."
    )
    return report
