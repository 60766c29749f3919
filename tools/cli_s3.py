"""``lanekit s3``: a local S3 server (SeaweedFS), and the check of any store's conditional
writes (the guarantee leases and fencing rest on)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import blockstore
from blockstore import LocalObjectStore, ObjectStore
from blockstore.probe import VERDICT_KEY

from .config import EXIT_USAGE, CLIError, lanekit_home
from .stopping import SignalCount

CHECK_ATTEMPTS = 3
"""Retries of each request while checking: a wrong endpoint answers within seconds."""


def cmd_s3_serve(args: argparse.Namespace) -> int:
    """Until SIGINT/SIGTERM: the first stops SeaweedFS gracefully (it flushes), a second
    kills it at once. Its children die with this process whatever happens."""
    from .s3server import GRPC_OFFSET, S3Server, S3ServerError

    if args.port is not None and not 1024 <= args.port <= 65535 - GRPC_OFFSET - 1:
        raise CLIError(
            f"--port {args.port}: give a port from 1024 to {65535 - GRPC_OFFSET - 1} "
            f"(SeaweedFS also opens the ports around it and each one +{GRPC_OFFSET})",
            EXIT_USAGE,
        )
    data_dir = Path(args.dir or lanekit_home() / "s3").absolute()
    server = S3Server(data_dir, port=args.port)
    signals = SignalCount(
        "stopping SeaweedFS", "killing SeaweedFS at once (what it had not written is lost)"
    )
    signals.install()
    try:
        try:
            server.start(cancel=signals.first)
        except S3ServerError as e:
            if signals.first.is_set():
                return 130
            raise ChildProcessError(str(e)) from None  # one line, from cli.main
        print(f"SeaweedFS S3 serving {data_dir} at {server.endpoint}")
        print("Use it with:")
        for k, v in server.env.items():
            print(f"  export {k}={v}")
        print("Press Ctrl-C to stop.", flush=True)
        while not signals.sleep_until_first(0.5):
            if server.process is None or server.process.poll() is not None:
                raise ChildProcessError(
                    f"SeaweedFS exited unexpectedly (log: {data_dir / 'weed.log'})"
                )
    finally:
        server.stop(hurry=signals.second)
    print("stopped", flush=True)
    return 0


def _store_to_check(url: str, s3_endpoint: str | None) -> ObjectStore:
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/"):
        try:  # a mistyped directory is reported, not made by the probe's first put
            return LocalObjectStore(parts.path, create=False)
        except blockstore.ObjectNotFound:
            raise FileNotFoundError(
                f"{url}: no such directory (a local store is made by its first `disk create`)"
            ) from None
    return blockstore.open_store(url, s3_endpoint=s3_endpoint, max_attempts=CHECK_ATTEMPTS)


def cmd_s3_check(args: argparse.Namespace) -> int:
    """Probe the store now (a cached verdict is not trusted here) and save a pass."""
    objects = _store_to_check(args.url, args.s3_endpoint)
    try:
        verdict = blockstore.check_conditional_writes(objects, fresh=True)
    finally:
        objects.close()
    if verdict.ok:
        kept = (
            f"verdict saved as {VERDICT_KEY}"
            if verdict.saved
            else f"the verdict could not be saved as {VERDICT_KEY}: each new process probes again"
        )
        print(f"ok: {verdict.store} honours If-None-Match: * and If-Match ({kept})")
        return 0
    print(f"refused: {verdict.refusal()}")
    return 1


def add_parsers(sub: Any) -> None:
    group = sub.add_parser("s3", help="a local S3 server (SeaweedFS); checking a store")
    s3 = group.add_subparsers(dest="s3_command", required=True)
    serve = s3.add_parser(
        "serve",
        help="run SeaweedFS on 127.0.0.1 until Ctrl-C",
        description="Run SeaweedFS on 127.0.0.1. SIGINT or SIGTERM stops it cleanly; a second "
        "one kills it at once. It never outlives this command, even after a kill -9.",
    )
    serve.add_argument("--dir", help="data directory (default $LANEKIT_HOME/s3)")
    serve.add_argument("--port", type=int, help="S3 port (default: a free one)")
    serve.set_defaults(func=cmd_s3_serve)

    check = s3.add_parser(
        "check",
        help="probe a store's conditional writes (If-None-Match, If-Match): exit 0 ok, 1 not",
    )
    check.add_argument("url", help="s3://BUCKET[/PREFIX] or file:///DIR (a store, not a disk)")
    check.add_argument("--s3-endpoint", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
    check.set_defaults(func=cmd_s3_check)
