"""The ``lanekit`` command line. Errors are mapped to messages and exit codes here, once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import BlockStoreError, LeaseHeld
from blockstore.concurrency import first_failure
from blockstore.lease import lease_is_live, read_lease
from vfs import FSError, MountError
from vm import VMError

from .cli_s3 import add_parsers as add_s3_parsers
from .cli_vm import add_parsers as add_vm_parsers
from .config import lanekit_home, parse_size, serve_until_signalled

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BUSY = 75  # EX_TEMPFAIL: try again once the holder is gone


class CLIError(Exception):
    """A user-facing error with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# ---------------------------------------------------------------- disk


def _run(fn: Callable[[], Any]) -> Any:
    return trio.run(fn)


def cmd_disk_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else 0
    if not size and not args.base:
        raise CLIError("give --size (or --base to size the disk like its base image)", EXIT_USAGE)
    if args.base and not size:
        size = (os.path.getsize(args.base) + 511) // 512 * 512

    async def main() -> Any:
        return await blockstore.create(
            args.url,
            size,
            block_size=parse_size(args.block_size),
            base=args.base,
            s3_endpoint=args.s3_endpoint,
        )

    _print_json(_run(main))
    return 0


def _objects(args: argparse.Namespace, url: str | None = None) -> tuple[Any, str, str | None]:
    return blockstore.resolve(url or args.url, args.s3_endpoint)


def cmd_disk_info(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args)
    if tag:
        raise CLIError("disk info takes a disk URL, not a checkpoint", EXIT_USAGE)
    _print_json(blockstore.disk_info(objects, name))
    return 0


def cmd_disk_checkpoint(args: argparse.Namespace) -> int:
    objects, name, _ = _objects(args)
    head = blockstore.checkpoint_disk(objects, name, args.tag)
    _print_json({"disk": name, "checkpoint": args.tag, "generation": head.generation})
    return 0


def cmd_disk_fork(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args, args.source)
    if tag is None:
        raise CLIError("fork needs a checkpoint: lanekit disk fork URL@TAG NEW_URL", EXIT_USAGE)
    new_objects, new_name, _ = _objects(args, args.new_url)
    if new_objects.describe() != objects.describe():
        raise CLIError("a fork must live in the same store as its parent (objects are shared)")
    head = blockstore.fork_disk(objects, name, tag, new_name)
    _print_json({"disk": new_name, "parent": head.parent, "size": head.size})
    return 0


def cmd_disk_gc(args: argparse.Namespace) -> int:
    objects = blockstore.open_store(args.store_url, s3_endpoint=args.s3_endpoint)
    report = blockstore.collect_garbage(objects, grace=args.grace, dry_run=args.dry_run)
    _print_json(
        {
            "heads_and_checkpoints": report.heads,
            "live_segments": report.live_segments,
            "live_packs": report.live_packs,
            "deleted": len(report.deleted),
            "spared_young": report.spared_young,
            "dry_run": args.dry_run,
        }
    )
    return 0


def cmd_disk_export(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with blockstore.open_disk(
            args.url, writable=False, base=args.base, s3_endpoint=args.s3_endpoint
        ) as disk:
            out = Path(args.file)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, disk.size)
                chunk = 4 << 20
                for offset in range(0, disk.size, chunk):
                    n = min(chunk, disk.size - offset)
                    runs = await disk.extents(offset, n)
                    if all(flags & blockstore.ZERO_FLAG for _, flags in runs):
                        continue
                    data = await disk.read(offset, n)
                    await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
                await trio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
            return disk.size

    size = _run(main)
    _print_json({"exported": args.url, "file": args.file, "size": size})
    return 0


def cmd_disk_import(args: argparse.Namespace) -> int:
    src = Path(args.file)
    size = (src.stat().st_size + 511) // 512 * 512

    async def main() -> None:
        await blockstore.create(
            args.url, size, block_size=parse_size(args.block_size), s3_endpoint=args.s3_endpoint
        )
        async with blockstore.open_disk(args.url, s3_endpoint=args.s3_endpoint) as disk:
            fd = os.open(src, os.O_RDONLY)
            try:
                chunk = 4 << 20
                for offset in range(0, size, chunk):
                    data = await trio.to_thread.run_sync(os.pread, fd, chunk, offset)
                    if data.count(0) == len(data):
                        continue
                    await disk.write(offset, data + bytes(-len(data) % 512))
            finally:
                os.close(fd)

    _run(main)
    _print_json({"imported": args.file, "disk": args.url, "size": size})
    return 0


def cmd_disk_release(args: argparse.Namespace) -> int:
    objects, name, _ = _objects(args)
    lease, _ = read_lease(objects, name)
    if lease is not None and lease_is_live(lease) and not args.force:
        raise LeaseHeld(name, lease["holder"], lease["since"], lease["renewed"] + lease["ttl"])
    previous = blockstore.force_release(objects, name)
    _print_json({"disk": name, "released": previous is not None, "previous": previous})
    return 0


def _store_stats(disk: blockstore.Disk) -> dict[str, Any]:
    stats: dict[str, Any] = dict(vars(disk.stats))
    store_stats = getattr(disk.store, "stats", None)
    if store_stats is not None:
        stats.update({f"store_{k}": v for k, v in vars(store_stats).items()})
    return stats


def _run_disk_service(
    args: argparse.Namespace,
    start: Callable[[blockstore.Disk, trio.TaskStatus[None]], Awaitable[None]],
    ready: str,
    done: str,
) -> int:
    """Hold the disk open for a service until SIGTERM/SIGINT (or until the service ends on
    its own, e.g. unmounted from outside), then flush, release and report the counters."""
    stats: dict[str, Any] = {}

    async def main() -> None:
        async with blockstore.open_disk(
            args.url,
            writable=not args.read_only,
            base=args.base,
            force=args.force,
            s3_endpoint=args.s3_endpoint,
            cache_bytes=parse_size(args.cache),
        ) as disk:
            await serve_until_signalled(
                lambda task_status: start(disk, task_status),
                lambda _: print(ready, flush=True),
            )
            await disk.close()
            stats.update(_store_stats(disk))

    _run(main)
    print(done, flush=True)
    print(f"stats: {json.dumps(stats, sort_keys=True)}", flush=True)
    return 0


def cmd_disk_serve(args: argparse.Namespace) -> int:
    from blockstore.serve import serve_device

    name = blockstore.resolve(args.url, args.s3_endpoint)[1]

    async def start(disk: blockstore.Disk, task_status: trio.TaskStatus[None]) -> None:
        async def started(_: str) -> None:
            task_status.started()

        await serve_device(disk, args.nbd, name=name, on_ready=started)

    mode = "read-only" if args.read_only else "read-write"
    return _run_disk_service(
        args,
        start,
        f"serving {args.url} ({mode}) on nbd {args.nbd}",
        "stopped: flushed and released",
    )


def cmd_disk_mount(args: argparse.Namespace) -> int:
    from blockstore.serve.fusefile import clear_dead_fuse_mount, mount_disk_file

    mountpoint = os.path.abspath(args.mountpoint)
    if notice := clear_dead_fuse_mount(mountpoint):
        print(notice, file=sys.stderr)
    if not os.path.isdir(mountpoint):
        raise CLIError(f"mount point {mountpoint} is not a directory", EXIT_USAGE)

    async def start(disk: blockstore.Disk, task_status: trio.TaskStatus[None]) -> None:
        await mount_disk_file(disk, mountpoint, task_status=task_status)

    return _run_disk_service(
        args, start, f"mounted {args.url} at {mountpoint}/disk", "unmounted: flushed and released"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job, on the embedded local-directory store."""
    home = lanekit_home()
    store = home / "disks"
    store.mkdir(parents=True, exist_ok=True)
    url = f"file://{store}/demo"

    async def main() -> dict[str, Any]:
        try:
            await blockstore.create(url, 1 << 30)
        except blockstore.DiskExists:
            pass
        async with blockstore.open_disk(url) as disk:
            await disk.write(0, b"lanekit demo block\n".ljust(4096, b"\0"))
            await disk.flush()
        objects, name, _ = blockstore.resolve(url)
        return blockstore.disk_info(objects, name)

    print(f"disk {url}:")
    _print_json(_run(main))
    return 0


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark

    return run_benchmark(args.name, quick=args.quick)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lanekit", description="Durable agent sandboxes.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = p.add_subparsers(dest="command", required=True)

    add_s3_parsers(sub)

    disk = sub.add_parser("disk", help="copy-on-write disks").add_subparsers(
        dest="disk_command", required=True
    )

    def disk_cmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        c = disk.add_parser(name, help=help)
        c.add_argument("--s3-endpoint", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
        c.set_defaults(func=func)
        return c

    c = disk_cmd("create", cmd_disk_create, "create a disk")
    c.add_argument("url", help="file:///DIR/NAME or s3://BUCKET/PREFIX/NAME")
    c.add_argument("--size", help="size, e.g. 10G (default: the base image's size)")
    c.add_argument("--base", help="read-only base image (raw file)")
    c.add_argument("--block-size", default="64K", help="block size (default 64K)")
    c = disk_cmd("info", cmd_disk_info, "show a disk's committed state as JSON")
    c.add_argument("url")
    c = disk_cmd("checkpoint", cmd_disk_checkpoint, "name the committed state")
    c.add_argument("url")
    c.add_argument("tag")
    c = disk_cmd("fork", cmd_disk_fork, "new disk from a checkpoint (no copying)")
    c.add_argument("source", help="URL@TAG")
    c.add_argument("new_url")
    c = disk_cmd("gc", cmd_disk_gc, "delete objects no disk or checkpoint references")
    c.add_argument("store_url", help="file:///DIR or s3://BUCKET/PREFIX")
    c.add_argument("--grace", type=float, default=3600.0, help="spare objects younger (s)")
    c.add_argument("--dry-run", action="store_true")
    c = disk_cmd("export", cmd_disk_export, "write a disk or checkpoint to a raw file")
    c.add_argument("url", help="URL or URL@TAG")
    c.add_argument("file")
    c.add_argument("--base", help="the disk's base image, if it has one")
    c = disk_cmd("import", cmd_disk_import, "create a disk from a raw file")
    c.add_argument("file")
    c.add_argument("url")
    c.add_argument("--block-size", default="64K")
    c = disk_cmd("release", cmd_disk_release, "release a disk's lease")
    c.add_argument("url")
    c.add_argument("--force", action="store_true", help="break a live holder's lease")

    c = disk_cmd("serve", cmd_disk_serve, "serve a disk over NBD until SIGTERM/SIGINT")
    c.add_argument("url")
    c.add_argument("--nbd", required=True, help="unix:PATH or tcp:127.0.0.1:PORT")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--base", help="the disk's base image, if it has one")
    c.add_argument("--force", action="store_true", help="take over a live writer's lease")
    c.add_argument("--cache", default="128M", help="clean block cache budget (default 128M)")

    c = disk_cmd("mount", cmd_disk_mount, "show a disk as MOUNTPOINT/disk over FUSE")
    c.add_argument("url")
    c.add_argument("mountpoint")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--base", help="the disk's base image, if it has one")
    c.add_argument("--force", action="store_true", help="take over a live writer's lease")
    c.add_argument("--cache", default="128M", help="clean block cache budget (default 128M)")

    add_vm_parsers(sub)

    d = sub.add_parser("demo", help="create a disk in $LANEKIT_HOME and show its info")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark side by side with its peers")
    b.add_argument("name")
    b.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="lanekit: %(levelname)s: %(message)s",
    )
    try:
        try:
            code: int = args.func(args)
        except BaseExceptionGroup as group:  # an error from inside a trio nursery
            raise first_failure(group) from None
        return code
    except CLIError as e:
        print(f"lanekit: error: {e}", file=sys.stderr)
        return e.code
    except LeaseHeld as e:
        print(f"lanekit: error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except (BlockStoreError, VMError, FSError, MountError, ValueError, OSError) as e:
        print(f"lanekit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
