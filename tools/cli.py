"""The ``lanekit`` command line. Errors are mapped to messages and exit codes here, once."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

from blockstore import BlockStoreError, Fenced, LeaseHeld
from vm import VMError

from . import progress
from .cli_disk import add_parsers as add_disk_parsers
from .cli_disk import print_json
from .cli_lane import add_parsers as add_lane_parsers
from .cli_lane import add_volume_parsers
from .cli_s3 import add_parsers as add_s3_parsers
from .cli_vm import add_parsers as add_vm_parsers
from .config import EXIT_BUSY, EXIT_ERROR, CLIError, lanekit_home
from .stopping import terminate_like_interrupt


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job, on the embedded local-directory store."""
    import trio

    import blockstore

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
    print_json(trio.run(main))
    return 0


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark

    return run_benchmark(args.name, quick=args.quick)


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lanekit", description="Durable agent sandboxes.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bars or phase lines (they only ever go to a terminal)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    add_s3_parsers(sub)

    add_disk_parsers(sub)
    add_vm_parsers(sub)
    add_lane_parsers(sub)
    add_volume_parsers(sub)

    d = sub.add_parser("demo", help="create a disk in $LANEKIT_HOME and show its info")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark side by side with its peers")
    b.add_argument("name")
    b.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    b.set_defaults(func=cmd_bench)
    return p


def _reported_errors() -> tuple[type[Exception], ...]:
    """The errors a command reports in one line. A package the command never imported
    raised none of them, so its error classes are looked at only if it is loaded: every
    command need not pay for loading pyfuse3 (``lane exec`` runs once per command)."""
    errors: list[type[Exception]] = [BlockStoreError, VMError, ValueError, OSError]
    if "vfs" in sys.modules:
        from vfs import FSError, MountError

        errors += [FSError, MountError]
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="lanekit: %(levelname)s: %(message)s",
    )
    terminate_like_interrupt()
    try:
        try:
            code: int = args.func(args)
        except BaseExceptionGroup as group:  # an error from inside a trio nursery
            from blockstore.concurrency import first_failure

            raise first_failure(group) from None
        return code
    except CLIError as e:
        print(f"lanekit: error: {e}", file=sys.stderr)
        return e.code
    except LeaseHeld as e:
        print(f"lanekit: error: {e}", file=sys.stderr)
        return EXIT_BUSY
    except Fenced as e:
        print(f"lanekit: fenced: another host took this disk over ({e})", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if not isinstance(e, _reported_errors()):
            raise
        print(f"lanekit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The ``lanekit`` command: main(), then an exit that skips the garbage collector's
    final passes over everything imported (numpy, boto3, trio: 25-50 ms of a command's
    exit). Interpreter shutdown still runs: atexit handlers, thread joins, stdio flushes."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
