"""``lanekit disk``: create, inspect, checkpoint, fork, move and serve disks."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import blockstore
from blockstore import LeaseHeld, ObjectStore
from blockstore.lease import lease_is_live, read_lease
from blockstore.objectstore import fsync_dir
from blockstore.sparse import data_ranges

from . import progress
from .config import EXIT_USAGE, CLIError, parse_size
from .stopping import Stopper, run_stoppable, serve_until_stopped

CHUNK = 4 << 20


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _objects(args: argparse.Namespace, url: str | None = None) -> tuple[Any, str, str | None]:
    return blockstore.resolve(url or args.url, args.s3_endpoint)


def _existing(objects: ObjectStore, name: str) -> None:
    """DiskNotFound (naming the store) unless the disk exists."""
    blockstore.disk_info(objects, name)


def cmd_disk_create(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args)
    if tag is not None:
        raise CLIError(
            f"{args.url}: a new disk has no checkpoints; create {name} without @{tag}, "
            f"or make a disk of a checkpoint with `lanekit disk fork URL@TAG NEW_URL`",
            EXIT_USAGE,
        )
    if args.base is not None and not args.base:
        raise CLIError("--base needs the path of a raw image file", EXIT_USAGE)
    size = parse_size(args.size) if args.size else 0
    if not size and not args.base:
        raise CLIError("give --size (or --base to size the disk like its base image)", EXIT_USAGE)
    if args.base and not size:
        size = (os.path.getsize(args.base) + 511) // 512 * 512
    if args.base:
        progress.phase(f"hashing the base image {args.base}")
    info = trio.run(
        lambda: blockstore.create(
            (objects, name), size, block_size=parse_size(args.block_size), base=args.base
        )
    )
    print_json(info)
    return 0


def cmd_disk_info(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args)
    if tag:
        raise CLIError("disk info takes a disk URL, not a checkpoint", EXIT_USAGE)
    print_json(blockstore.disk_info(objects, name))
    return 0


def cmd_disk_checkpoint(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args)
    if tag is not None:
        raise CLIError(
            f"disk checkpoint takes the disk's URL and the new tag: "
            f"lanekit disk checkpoint URL {args.tag} (without @{tag})",
            EXIT_USAGE,
        )
    head = blockstore.checkpoint_disk(objects, name, args.tag)
    print_json({"disk": name, "checkpoint": args.tag, "generation": head.generation})
    return 0


def cmd_disk_fork(args: argparse.Namespace) -> int:
    objects, name, tag = _objects(args, args.source)
    if tag is None:
        raise CLIError("fork needs a checkpoint: lanekit disk fork URL@TAG NEW_URL", EXIT_USAGE)
    new_objects, new_name, new_tag = _objects(args, args.new_url)
    if new_tag is not None:
        raise CLIError(
            f"a fork is a new disk: name it without @{new_tag} (checkpoint it afterwards)",
            EXIT_USAGE,
        )
    if new_objects.describe() != objects.describe():
        raise CLIError("a fork must live in the same store as its parent (objects are shared)")
    head = blockstore.fork_disk(objects, name, tag, new_name)
    print_json({"disk": new_name, "parent": head.parent, "size": head.size})
    return 0


def cmd_disk_gc(args: argparse.Namespace) -> int:
    if not args.grace >= 0:  # NaN included
        raise CLIError(
            f"--grace {args.grace:g}: give 0 or more seconds (objects younger than the "
            "grace are spared, which keeps writers running meanwhile safe)",
            EXIT_USAGE,
        )
    objects = blockstore.open_store(args.store_url, s3_endpoint=args.s3_endpoint)
    if not blockstore.list_disks(objects):
        raise CLIError(f"no disks in {objects.describe()}: is the store URL right?")
    progress.phase(f"collecting garbage in {objects.describe()}")
    report = blockstore.collect_garbage(objects, grace=args.grace, dry_run=args.dry_run)
    print_json(
        {
            "heads_and_checkpoints": report.heads,
            "live_segments": report.live_segments,
            "live_packs": report.live_packs,
            "deleted": len(report.deleted),
            "spared_young": report.spared_young,
            "temporary_deleted": getattr(report, "temporary_deleted", 0),
            "dry_run": args.dry_run,
        }
    )
    return 0


def cmd_disk_export(args: argparse.Namespace) -> int:
    """A regular file is written beside the target and renamed over it once complete and
    synced: an export that fails (the disk is too big for the file system, the store
    went away) leaves what was there. A device is written in place."""
    out = Path(args.file)
    in_place = out.exists() and not out.is_file()

    async def main(update: Callable[[int, int], None]) -> int:
        async with blockstore.open_disk(
            args.url, writable=False, base=args.base, s3_endpoint=args.s3_endpoint
        ) as disk:
            target = out if in_place else out.with_name(f".{out.name}.lanekit-export")
            fd = os.open(target, os.O_WRONLY | (0 if in_place else os.O_CREAT | os.O_TRUNC), 0o644)
            try:
                if not in_place:
                    os.ftruncate(fd, disk.size)
                for offset in range(0, disk.size, CHUNK):
                    n = min(CHUNK, disk.size - offset)
                    runs = await disk.extents(offset, n)
                    if in_place or not all(flags & blockstore.ZERO_FLAG for _, flags in runs):
                        data = await disk.read(offset, n)
                        await trio.to_thread.run_sync(os.pwrite, fd, data, offset)
                    update(offset + n, disk.size)
                await trio.to_thread.run_sync(os.fsync, fd)
            except BaseException:
                if not in_place:
                    target.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            if not in_place:
                target.replace(out)
                fsync_dir(out.parent)
            return disk.size

    try:
        with progress.byte_bar(f"export {out.name}") as update:
            size = trio.run(main, update)
    except OSError as exc:  # the store's own errors are not OSErrors
        raise CLIError(f"cannot export to {out}: {exc.strerror or exc}") from None
    print_json({"exported": args.url, "file": args.file, "size": size})
    return 0


def cmd_disk_import(args: argparse.Namespace) -> int:
    """Only the parts of the file that hold data are read (SEEK_DATA/SEEK_HOLE): a 10 GiB
    sparse file with little in it imports in moments. The source is checked before the
    disk is made, and a disk whose import failed is removed: a retry starts clean."""
    src = Path(args.file)
    objects, name, tag = _objects(args, args.url)
    if tag is not None:
        raise CLIError(
            f"{args.url}: an import makes a new disk; name it without @{tag} "
            "(take a checkpoint of it afterwards: lanekit disk checkpoint URL TAG)",
            EXIT_USAGE,
        )
    try:
        with open(src, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CLIError(f"{src}: not a regular file; give a raw disk image file")
            source_size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CLIError(f"cannot read {src}: {exc.strerror or exc}") from None
    size = (source_size + 511) // 512 * 512
    block_size = parse_size(args.block_size)

    async def main(update: Callable[[int, int], None]) -> None:
        await blockstore.create((objects, name), size, block_size=block_size)
        try:
            await fill(update)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(blockstore.delete_disk, objects, name)
            raise

    async def fill(update: Callable[[int, int], None]) -> None:
        async with blockstore.open_disk((objects, name)) as disk:
            fd = os.open(src, os.O_RDONLY)
            try:
                ranges = data_ranges(fd, source_size)
                total, done = sum(n for _, n in ranges), 0
                for start, length in ranges:
                    for offset in range(start, start + length, CHUNK):
                        n = min(CHUNK, start + length - offset)
                        data = await trio.to_thread.run_sync(os.pread, fd, n, offset)
                        if data.count(0) != len(data):
                            pad = bytes(min(-len(data) % 512, size - offset - len(data)))
                            await disk.write(offset, data + pad)
                        done += n
                        update(done, total)
            finally:
                os.close(fd)

    with progress.byte_bar(f"import {src.name}") as update:
        trio.run(main, update)
    print_json({"imported": args.file, "disk": args.url, "size": size})
    return 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def cmd_disk_release(args: argparse.Namespace) -> int:
    objects, name, _ = _objects(args)
    _existing(objects, name)
    lease, _ = read_lease(objects, name)
    live = lease is not None and lease_is_live(lease)
    if live and not args.force:
        assert lease is not None
        raise LeaseHeld(name, lease["holder"], lease["since"], lease["renewed"] + lease["ttl"])
    previous = blockstore.force_release(objects, name)
    if previous is None or lease is None:
        print(f"disk {name!r} had no lease: nothing to release")
        return 0
    holder = lease.get("holder", {})
    who = f"host {holder.get('host')} pid {holder.get('pid')}"
    since = _when(float(lease.get("since", 0)))
    if lease.get("state") != "held":
        print(f"disk {name!r}: its lease was already released (last held by {who})")
    elif live:
        print(
            f"disk {name!r}: broke the live lease of {who}, held since {since}; that writer "
            "is fenced and can no longer commit"
        )
    else:
        print(f"disk {name!r}: released the expired lease of {who}, held since {since}")
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

    async def main(stopper: Stopper) -> None:
        async with blockstore.open_disk(
            args.url,
            writable=not args.read_only,
            base=args.base,
            force=args.force,
            s3_endpoint=args.s3_endpoint,
            cache_bytes=parse_size(args.cache),
        ) as disk:
            await serve_until_stopped(
                stopper,
                lambda task_status: start(disk, task_status),
                lambda _: print(ready, flush=True),
            )
            await disk.close()
            stats.update(_store_stats(disk))

    stopper = Stopper(
        "stopping: flushing the disk and releasing its lease",
        "exiting at once; writes not yet flushed (none acknowledged) are dropped and the "
        "lease expires by itself",
    )
    run_stoppable(main, stopper)
    print(done, flush=True)
    print(f"stats: {json.dumps(stats, sort_keys=True)}", flush=True)
    return 0


def _nbd_limits(args: argparse.Namespace) -> Any:
    from blockstore.serve import NBDLimits

    try:
        return NBDLimits(
            max_connections=args.max_connections,
            handshake_timeout=args.handshake_timeout or None,
            connection_bytes=parse_size(args.connection_budget),
            server_bytes=parse_size(args.server_budget),
        )
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def cmd_disk_serve(args: argparse.Namespace) -> int:
    from blockstore.serve import serve_device

    name = blockstore.resolve(args.url, args.s3_endpoint)[1]
    limits = _nbd_limits(args)

    async def start(disk: blockstore.Disk, task_status: trio.TaskStatus[None]) -> None:
        async def started(_: str) -> None:
            task_status.started()

        await serve_device(disk, args.nbd, name=name, on_ready=started, limits=limits)

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


def add_parsers(sub: Any) -> None:
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
    c = disk_cmd("import", cmd_disk_import, "create a disk from a raw file (holes skipped)")
    c.add_argument("file")
    c.add_argument("url")
    c.add_argument("--block-size", default="64K")
    c = disk_cmd("release", cmd_disk_release, "release a disk's lease")
    c.add_argument("url")
    c.add_argument("--force", action="store_true", help="break a live holder's lease")

    signals = (
        "SIGTERM or SIGINT stops it: the disk is flushed and its lease released; a second "
        "one during that stop exits at once (the lease then expires by itself)"
    )
    c = disk_cmd("serve", cmd_disk_serve, "serve a disk over NBD until SIGTERM/SIGINT")
    c.description = f"Serve a disk over NBD. {signals}."
    c.add_argument("url")
    c.add_argument("--nbd", required=True, help="unix:PATH or tcp:127.0.0.1:PORT")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--base", help="the disk's base image, if it has one")
    c.add_argument("--force", action="store_true", help="take over a live writer's lease")
    c.add_argument("--cache", default="128M", help="clean block cache budget (default 128M)")
    c.add_argument("--max-connections", type=int, default=16, help="default 16")
    c.add_argument(
        "--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
        help="drop a client that has not finished its handshake (default 10; 0: never)",
    )  # fmt: skip
    c.add_argument(
        "--connection-budget", default="32M",
        help="bytes of requests in flight per client (default 32M)",
    )  # fmt: skip
    c.add_argument(
        "--server-budget", default="256M", help="bytes in flight for all clients (default 256M)"
    )

    c = disk_cmd("mount", cmd_disk_mount, "show a disk as MOUNTPOINT/disk over FUSE")
    c.description = f"Show a disk as MOUNTPOINT/disk over FUSE. {signals}; so does an umount."
    c.add_argument("url")
    c.add_argument("mountpoint")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--base", help="the disk's base image, if it has one")
    c.add_argument("--force", action="store_true", help="take over a live writer's lease")
    c.add_argument("--cache", default="128M", help="clean block cache budget (default 128M)")
