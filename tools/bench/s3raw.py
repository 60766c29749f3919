"""Raw S3 throughput of the SeaweedFS server: the ceiling for every storage benchmark.

Cases: boto3 called directly (the ceiling), and the same requests through our
S3ObjectStore layer (its overhead should be nil), both with 8 threads.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from blockstore import S3ObjectStore

from ..s3server import S3Server
from .harness import Report

THREADS = 8


def _timed(fn: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(fn, range(count)))
    return time.perf_counter() - start


Op = Callable[[int], object]


def _cases(
    client: Any, store: S3ObjectStore, prefix: str, payload: bytes
) -> dict[str, tuple[Op, Op]]:
    def boto_put(i: int) -> object:
        return client.put_object(Bucket="bench", Key=f"raw/{prefix}/{i}", Body=payload)

    def boto_get(i: int) -> object:
        return client.get_object(Bucket="bench", Key=f"raw/{prefix}/{i}")["Body"].read()

    def ours_put(i: int) -> object:
        return store.put(f"{prefix}/{i}", payload)

    def ours_get(i: int) -> object:
        return store.get(f"{prefix}/{i}")

    return {"boto3": (boto_put, boto_get), "S3ObjectStore": (ours_put, ours_get)}


def run(*, quick: bool = False) -> Report:
    report = Report(
        "s3",
        f"Raw S3 PUT/GET of the SeaweedFS fixture server on loopback, {THREADS} threads; "
        "boto3 directly (the ceiling) vs our S3ObjectStore layer.",
    )
    repeats = 1 if quick else 3
    total = (8 if quick else 128) << 20
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-s3-") as tmp:
        server = S3Server(Path(tmp))
        with server:
            client = server.client()
            client.create_bucket(Bucket="bench")
            store = S3ObjectStore("bench", "ours", client=client)
            for size, label in ((64 << 10, "64KiB"), (1 << 20, "1MiB")):
                count = max(8, total // size)
                payload = os.urandom(size)
                put_mb = report.metric(f"PUT {label}", "MB/s", baseline="boto3")
                get_mb = report.metric(f"GET {label}", "MB/s", baseline="boto3")
                put_ops = report.metric(f"PUT {label} ops", "req/s", baseline="boto3")
                get_ops = report.metric(f"GET {label} ops", "req/s", baseline="boto3")
                for rep in range(repeats):
                    cases = _cases(client, store, f"{label}/{rep}", payload)
                    for case, (put, get) in cases.items():
                        t = _timed(put, count)
                        report.add(put_mb.name, case, count * size / t / 1e6)
                        report.add(put_ops.name, case, count / t)
                        t = _timed(get, count)
                        report.add(get_mb.name, case, count * size / t / 1e6)
                        report.add(get_ops.name, case, count / t)
    report.notes.append(f"{total >> 20} MiB per metric per run, {repeats} runs.")
    return report
