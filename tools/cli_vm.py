"""``lanekit image``, ``lanekit vm`` and ``lanekit vfs``: the sandbox half of the command line."""

from __future__ import annotations

import argparse
import functools
import gc
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import blockstore
from vm import Healthcheck, ImageEntry, ProbeResult, Registry
from vm.errors import VMError
from vm.images import RECIPES, ImageStore, check_digest, not_built_message
from vm.registry import validate_id
from vm.state import state_paths

from . import progress
from .cli_net import NETWORK_HELP, add_network_arguments, network_from_args
from .config import lanekit_home, parse_size
from .stopping import Stopper, run_stoppable, serve_until_stopped
from .vmrun import RunOptions, run_in_sandbox

if TYPE_CHECKING:
    from vm.launcher import Mount

DEFAULT_HEALTHCHECK = ("/lanekit/busybox", "true")

VM_RUN_DESCRIPTION = """\
Boot IMAGE in a microVM, run one command in it, stream its stdout and stderr here as it
runs, and stop the VM when it ends. Its exit code is lanekit's. stdin is passed on when it
is not a terminal (a pipe or a file, until its end); with -i it is passed on always.

Signals: the first SIGINT or SIGTERM goes to the command; if it has not ended within 10 s,
the sandbox is stopped cleanly (the guest syncs and powers off, the root disk is flushed
and its lease released). A second SIGINT or SIGTERM stops at once: the guest is killed,
so what it had not synced is lost; the root disk is still flushed and released."""

VM_RUN_EPILOG = """\
exit codes:
  0-125     the command's own exit code
  126, 127  the command could not be run (no such directory; not found)
  128+N     the command was ended by signal N (130: SIGINT, 137: SIGKILL or --timeout)
  1         lanekit failed (the message says why); 2: bad arguments
  75        the root disk is in use by another sandbox (see --wait and --force)

examples:
  lanekit vm run --image shell -- echo hello
  lanekit vm run -it --image shell -- sh
  echo data | lanekit vm run --image shell -- sha256sum
  lanekit vm run --image python --disk file:///var/lib/lanes/web --mount /src=$PWD:ro \\
      --cwd /src --env DEBUG=1 --timeout 600 -- python3 -m pytest
  lanekit vm run --image shell --disk file:///var/lib/lanes/web@before-upgrade -- ls /"""


def _state() -> tuple[Registry, ImageStore]:
    registry, images, _ = state_paths(lanekit_home())
    images.on_phase = progress.phase
    return registry, images


def _argv(text: str, what: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise VMError(f"{what}: {exc}") from None
    return argv


# ---------------------------------------------------------------- image


def _pin(registry: Registry, image_id: str, digest: str, description: str) -> ImageEntry:
    """Point ``image_id`` at an image, registering it with default settings if new."""
    if not registry.has(image_id):
        registry.register(
            ImageEntry(
                id=image_id,
                image=f"lanekit/{image_id}:latest",
                healthcheck=Healthcheck(DEFAULT_HEALTHCHECK),
                default_entrypoint=("sh", "-c"),
                description=description,
            )
        )
    return registry.pin(image_id, digest)


def cmd_image_build(args: argparse.Namespace) -> int:
    registry, images = _state()
    size = parse_size(args.size) if args.size else None
    sources = [bool(args.recipe), bool(args.from_dir), bool(args.from_oci), bool(args.debian)]
    if sum(sources) != 1:
        raise VMError("give exactly one of RECIPE, --from-dir, --from-oci, --debian")
    image_id = args.id or args.recipe
    if image_id is None:
        raise VMError("--id is required when building from a directory, OCI image or suite")
    if not registry.has(image_id):
        validate_id(image_id)  # before spending time on the build
    if args.recipe:
        meta = images.build_recipe(args.recipe, size=size)
    elif args.from_dir:
        meta = images.build_from_dir(Path(args.from_dir), size=size)
    elif args.from_oci:
        meta = images.build_from_oci(Path(args.from_oci), size=size)
    else:
        meta = images.build_debian(args.debian, args.packages or (), size=size)
    entry = _pin(registry, image_id, meta.digest, f"built from {meta.source.get('kind')}")
    print(f"{entry.id} {entry.pinned_reference} ({meta.size >> 20} MiB)")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    registry, images = _state()
    rows = [("ID", "REFERENCE", "DIGEST", "BUILT", "HEALTH")]
    for status in registry.statuses():
        digest = status.digest or "-"
        built = "yes" if status.digest and images.has(status.digest) else "no"
        if status.healthy:
            health = f"healthy ({status.last_healthy_at})"
        elif status.last_error:
            health = f"unhealthy: {status.last_error[:60]}"
        else:
            health = "unknown"
        shown = f"sha256:{digest}" if status.digest else "-"
        rows.append((status.id, status.image, shown, built, health))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def cmd_image_register(args: argparse.Namespace) -> int:
    registry, _ = _state()
    entry = ImageEntry(
        id=args.id,
        image=args.ref,
        healthcheck=Healthcheck(
            _argv(args.healthcheck, "--healthcheck"), args.expect_exit, args.timeout_ms
        ),
        default_entrypoint=_argv(args.entrypoint, "--entrypoint"),
        description=args.description or "",
    )
    entry = registry.register(entry)
    print(f"registered {entry.id} -> {entry.image}")
    return 0


def _digest_of(registry: Registry, name: str) -> str:
    if registry.has(name):
        entry = registry.lookup(name)
        if entry.digest is None:
            raise VMError(not_built_message(entry))
        return entry.digest
    return check_digest(name)


def cmd_image_push(args: argparse.Namespace) -> int:
    from vm import transfer

    registry, images = _state()
    digest = _digest_of(registry, args.image)
    objects = blockstore.open_store(args.store, s3_endpoint=args.s3_endpoint)
    with progress.byte_bar(f"push sha256:{digest[:12]}") as update:
        sent = trio.run(transfer.push, images, digest, objects, update)
    what = f"{sent >> 20} MiB of data" if sent else "already there"
    print(f"pushed sha256:{digest} to {args.store} ({what})")
    return 0


def cmd_image_pull(args: argparse.Namespace) -> int:
    from vm import transfer

    registry, images = _state()
    if args.id:
        validate_id(args.id)
    objects = blockstore.open_store(args.store, s3_endpoint=args.s3_endpoint)
    digest = check_digest(args.digest)
    with progress.byte_bar(f"pull sha256:{digest[:12]}") as update:
        meta = trio.run(transfer.pull, images, digest, objects, update)
    if args.id:
        _pin(registry, args.id, meta.digest, "pulled")
    print(f"pulled sha256:{meta.digest}")
    return 0


def cmd_image_check(args: argparse.Namespace) -> int:
    from vm.launcher import Sandbox

    registry, _ = _state()
    ids = [args.id] if args.id else [e.id for e in registry.list() if e.digest]

    async def probe(entry: ImageEntry) -> ProbeResult:
        sandbox = Sandbox(entry.id, home=lanekit_home(), build_missing=False)
        async with sandbox.boot() as machine:
            await machine.wait_healthy()
        return ProbeResult(entry.healthcheck.expected_exit_code)

    statuses = trio.run(registry.run_healthchecks, probe, ids)
    failed = 0
    for status in statuses:
        if status.id in ids:
            state = "healthy" if status.healthy else f"UNHEALTHY: {status.last_error}"
            failed += not status.healthy
            print(f"{status.id}: {state}")
    return 1 if failed else 0


# ---------------------------------------------------------------- vm


def parse_mount(spec: str) -> Mount:
    import vfs
    from vm.launcher import Mount

    guest, sep, source = spec.partition("=")
    if not sep or not guest or not source:
        raise VMError(f"--mount {spec!r}: use GUEST=memory or GUEST=HOSTDIR[:ro]")
    read_only = source.endswith(":ro")
    source = source.removesuffix(":ro").removesuffix(":rw")
    if source == "memory":
        return Mount(guest, vfs.MemoryFS(), read_only)
    return Mount(guest, Path(source), read_only)


def command_options(args: argparse.Namespace) -> RunOptions:
    """The command to run and how, from the arguments of :func:`add_command_arguments`
    (``vm run`` and ``lane exec`` share them)."""
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise VMError(f"give the command to run after --, e.g. {args.example} -- sh")
    env = {}
    for item in args.env or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VMError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    if args.timeout is not None and not args.timeout > 0:
        raise VMError(f"--timeout {args.timeout:g}: give a positive number of seconds")
    if not args.cwd.startswith("/"):
        raise VMError(f"--cwd {args.cwd!r}: give an absolute guest path, e.g. /workspace")
    return RunOptions(
        command=command,
        env=env,
        cwd=args.cwd,
        user=args.user,
        timeout=args.timeout,
        tty=args.tty,
        interactive=args.interactive or args.stdin,
    )


def cmd_vm_run(args: argparse.Namespace) -> int:
    from vm.launcher import Sandbox

    run = command_options(args)
    if args.wait is not None and not args.wait >= 0:  # NaN too
        raise VMError(f"--wait {args.wait:g}: give a number of seconds, 0 or more")
    mounts = [parse_mount(m) for m in args.mount or ()]
    sandbox = Sandbox(
        args.image,
        cpus=args.cpus,
        memory_mib=args.memory,
        disk=args.disk,
        accel=args.accel,
        s3_endpoint=args.s3_endpoint,
        force=args.force,
        lease_wait=args.wait,
        notice=lambda line: print(f"lanekit: {line}", file=sys.stderr, flush=True),
        network=network_from_args(args),
    )
    code: int = trio.run(run_in_sandbox, sandbox, mounts, run)
    return code


# ---------------------------------------------------------------- vfs


def cmd_vfs_mount(args: argparse.Namespace) -> int:
    import vfs
    from blockstore.serve.fusefile import clear_dead_fuse_mount

    if notice := clear_dead_fuse_mount(args.mountpoint):
        print(notice, file=sys.stderr)
    fs: vfs.Filesystem
    if args.max_inodes is not None and args.max_inodes < 1:
        raise VMError(f"--max-inodes {args.max_inodes}: give a positive number of inodes")
    if args.memory:
        fs = vfs.MemoryFS(
            copy_from=args.seed,
            max_bytes=parse_size(args.max_bytes) if args.max_bytes else None,
            max_inodes=args.max_inodes,
        )
    else:
        if args.seed:
            raise VMError("--seed goes with --memory")
        fs = vfs.PassthroughFS(args.passthrough, read_only=args.read_only)
    if args.read_only and args.memory:
        fs = vfs.ReadOnlyFS(fs)

    # A server process holds many small objects and few cycles: keep the collector from
    # rescanning them all while requests wait.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    def ready(where: Path) -> None:
        print(f"mounted {where}; Ctrl-C, SIGTERM or umount unmounts", flush=True)

    stopper = Stopper(
        "unmounting",
        "exiting at once; the kernel drops the mount when this process is gone, and "
        "writes still on their way are lost",
    )
    serve = functools.partial(vfs.serve, fs, args.mountpoint)
    run_stoppable(lambda s: serve_until_stopped(s, serve, ready), stopper)
    print("unmounted", flush=True)
    return 0


def add_command_arguments(c: argparse.ArgumentParser, example: str) -> None:
    """How a command runs in a guest (see :func:`command_options`)."""
    c.add_argument("--cwd", default="/", help="absolute guest directory to run in (default /)")
    c.add_argument("--env", action="append", metavar="KEY=VALUE", help="repeatable")
    c.add_argument("--user", help="run as this guest user: a name, a uid, or uid:gid")
    c.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="kill the command and everything it started after this long (exit 137)",
    )  # fmt: skip
    c.add_argument(
        "-t", "--tty", action="store_true",
        help="give the command a terminal (raw mode here, window size kept in step)",
    )  # fmt: skip
    c.add_argument(
        "-i", "--interactive", action="store_true",
        help="keep stdin open and pass it on even when it is a terminal",
    )  # fmt: skip
    c.add_argument("--stdin", action="store_true", help=argparse.SUPPRESS)  # older spelling of -i
    c.set_defaults(example=example)


def add_parsers(sub: Any) -> None:
    image = sub.add_parser("image", help="sandbox images: build, register, list").add_subparsers(
        dest="image_command", required=True
    )
    c = image.add_parser("build", help="build an image and pin its registry entry to it")
    c.add_argument("recipe", nargs="?", choices=sorted(RECIPES), help="a built-in recipe")
    c.add_argument("--from-dir", help="a host directory tree")
    c.add_argument("--from-oci", help="an OCI image layout or docker save tarball")
    c.add_argument("--debian", metavar="SUITE", help="debootstrap --variant=minbase SUITE")
    c.add_argument("--packages", nargs="*", help="extra Debian packages")
    c.add_argument("--id", help="registry id (default: the recipe's)")
    c.add_argument("--size", help="disk size (default: the content plus room to work)")
    c.set_defaults(func=cmd_image_build)
    c = image.add_parser("list", help="registered images with digests and health")
    c.set_defaults(func=cmd_image_list)
    c = image.add_parser("register", help="add an image to the allow-list")
    c.add_argument("--id", required=True)
    c.add_argument("--ref", required=True, help="image reference, e.g. team/tool:1")
    c.add_argument("--healthcheck", required=True, help="argv, shell-quoted")
    c.add_argument("--expect-exit", type=int, default=0)
    c.add_argument("--timeout-ms", type=int, default=5000)
    c.add_argument("--entrypoint", default="sh -c", help="default entrypoint argv")
    c.add_argument("--description")
    c.set_defaults(func=cmd_image_register)
    for name, func, help in (
        ("push", cmd_image_push, "upload an image by digest"),
        ("pull", cmd_image_pull, "download an image by digest"),
    ):
        c = image.add_parser(name, help=help)
        c.add_argument("image" if name == "push" else "digest", help="id or sha256 digest")
        c.add_argument("--store", required=True, help="file:///DIR or s3://BUCKET/PREFIX")
        c.add_argument("--s3-endpoint", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
        if name == "pull":
            c.add_argument("--id", help="register (or re-pin) this id to the pulled image")
        c.set_defaults(func=func)
    c = image.add_parser("check", help="boot images and run their healthchecks")
    c.add_argument("id", nargs="?")
    c.set_defaults(func=cmd_image_check)

    vmp = sub.add_parser("vm", help="microVM sandboxes").add_subparsers(
        dest="vm_command", required=True
    )
    c = vmp.add_parser(
        "run",
        help="boot an image, run one command, stream its output",
        description=VM_RUN_DESCRIPTION,
        epilog=VM_RUN_EPILOG + "\n\n" + NETWORK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--image", required=True, help="registered image id (see `lanekit image list`)")
    c.add_argument(
        "--disk",
        help="durable root disk URL (file:///DIR/NAME or s3://BUCKET/PREFIX/NAME), created "
        "from the image on first use; URL@TAG boots a checkpoint as a throwaway copy "
        "(its writes are discarded when the sandbox stops). Default: an ephemeral disk",
    )
    c.add_argument(
        "--mount", action="append", metavar="GUEST=SOURCE",
        help="GUEST=memory (an in-memory filesystem) or GUEST=HOSTDIR[:ro]; repeatable",
    )  # fmt: skip
    c.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
    c.add_argument("--memory", type=int, default=512, help="guest memory in MiB (default 512)")
    add_command_arguments(c, "lanekit vm run --image shell")
    c.add_argument(
        "--force", action="store_true",
        help="take the root disk over from a dead or unreachable holder (fences it)",
    )  # fmt: skip
    c.add_argument(
        "--wait", type=float, metavar="SECONDS",
        help="if the root disk is in use, wait this long for its lease to end",
    )  # fmt: skip
    c.add_argument("--accel", choices=("kvm", "tcg"), help="default: KVM if it works, else TCG")
    c.add_argument("--s3-endpoint", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
    add_network_arguments(c)
    c.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    c.set_defaults(func=cmd_vm_run)

    vfsp = sub.add_parser("vfs", help="host-implemented filesystems").add_subparsers(
        dest="vfs_command", required=True
    )
    c = vfsp.add_parser("mount", help="serve a filesystem on MOUNTPOINT until Ctrl-C")
    kind = c.add_mutually_exclusive_group(required=True)
    kind.add_argument("--memory", action="store_true", help="an in-memory filesystem")
    kind.add_argument("--passthrough", metavar="HOSTDIR", help="a confined host directory")
    c.add_argument("--seed", metavar="DIR", help="copy DIR into the memory filesystem")
    c.add_argument("--read-only", action="store_true")
    c.add_argument("--max-bytes", help="memory filesystem size limit, e.g. 1G")
    c.add_argument("--max-inodes", type=int)
    c.add_argument("mountpoint")
    c.set_defaults(func=cmd_vfs_mount)
