"""Processes that tests kill: ``python -m tests.workers NAME ARGS...``."""

from __future__ import annotations

import hashlib
import random
import sys

import trio

import blockstore

BS = 4096
BLOCKS = 256


def round_writes(seed: int, k: int) -> list[tuple[int, bytes]]:
    """The writes of round k: deterministic, so the parent can rebuild every flushed state."""
    rng = random.Random(seed * 1_000_003 + k)
    out = []
    for _ in range(rng.randrange(1, 40)):
        off = rng.randrange(BLOCKS * BS - 2 * BS)
        n = rng.randrange(1, 2 * BS)
        fill = bytes([k % 251 + 1]) * 8 + rng.randbytes(8)
        out.append((off, (fill * (n // 16 + 1))[:n]))
    return out


def state_after(seed: int, rounds: int) -> bytes:
    disk = bytearray(BLOCKS * BS)
    for k in range(1, rounds + 1):
        for off, data in round_writes(seed, k):
            disk[off : off + len(data)] = data
    return bytes(disk)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def crash_writer(url: str, seed: int, endpoint: str | None) -> None:
    """Write round after round, flushing each; print 'ack K' once round K is durable."""
    async with blockstore.open_disk(url, force=True, s3_endpoint=endpoint) as disk:
        k = 0
        while True:
            k += 1
            for off, data in round_writes(seed, k):
                await disk.write(off, data)
            await disk.flush()
            print(f"ack {k}", flush=True)


def main() -> None:
    name, *args = sys.argv[1:]
    if name == "crash-writer":
        url, seed = args[0], int(args[1])
        endpoint = args[2] if len(args) > 2 else None
        trio.run(crash_writer, url, seed, endpoint)
    elif name == "hold":
        url = args[0]

        async def hold() -> None:
            async with blockstore.open_disk(url, lease_ttl=float(args[1])):
                print("holding", flush=True)
                await trio.sleep_forever()

        trio.run(hold)
    else:
        raise SystemExit(f"unknown worker {name}")


if __name__ == "__main__":
    main()
