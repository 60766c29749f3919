"""``lanekit lane ...``: named durable sandboxes that run detached (see :mod:`vm.lanes`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

import blockstore
from vm import lanes

from .cli_net import add_network_arguments, network_from_args
from .cli_vm import add_command_arguments, command_options
from .config import parse_size
from .vmrun import run_in_machine

if TYPE_CHECKING:
    from vm.lanes import Lane, LaneMount, LaneStatus

LANE_DESCRIPTION = """\
A lane is a named sandbox whose definition and root disk live in an object store
(file:///DIR or s3://BUCKET/PREFIX). `lane start` boots it under a supervisor process that
outlives the command; `lane exec` runs commands in it; `lane stop` powers it off and
releases its disk; `lane pause` saves its memory into the store too, and the next start
resumes its processes where they were. Any host that reaches the store can start a
stopped or paused lane, with everything its guest wrote (`lane start NAME --store URL` on
a host that never saw it). `lane checkpoint` names the state of its root disk and volumes
(running or stopped), and `lane fork NAME@TAG NEW` makes a new lane of a checkpoint.
Who runs a lane is its disk's lease in the store: `lane ls` is right after a crash."""


STORE_VARIABLE = "LANEKIT_STORE"


def _store_args(c: argparse.ArgumentParser, required: bool = False) -> None:
    c.add_argument(
        "--store", default=os.environ.get(STORE_VARIABLE) or None,
        help=f"the store: file:///DIR or s3://BUCKET/PREFIX (default ${STORE_VARIABLE}"
        + (")" if required else ", else the store this host knows the lane from)"),
    )  # fmt: skip
    c.add_argument("--s3-endpoint", help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")


def _required_store(args: argparse.Namespace) -> str:
    if not args.store:
        raise ValueError(f"no store: give --store URL or set {STORE_VARIABLE}")
    return str(args.store)


def _lane(args: argparse.Namespace) -> Lane:
    return lanes.Lane.get(args.name, store=args.store, s3_endpoint=args.s3_endpoint)


def _show(status: LaneStatus) -> str:
    if status.error is not None:
        return f"{status.name}\tunreadable: {status.error}\t{status.store}"
    if status.state != "running":
        return f"{status.name}\t{_state(status)}\t{status.store}"
    where = "here" if status.here else f"host {status.host}"
    return f"{status.name}\trunning ({where}, pid {status.pid})\t{status.store}"


def _state(status: LaneStatus) -> str:
    return f"{status.state} ({status.reason})" if status.reason else status.state


def _when(stamp: float | None) -> str:
    return "-" if not stamp else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


LS_COLUMNS = ("NAME", "STATUS", "HOST", "PID", "SINCE", "IMAGE", "STORE")


def _row(status: LaneStatus) -> tuple[str, ...]:
    if status.error is not None:
        return (status.name, f"unreadable: {status.error}", "-", "-", "-", "-", status.store)
    host = status.host or "-"
    if status.here:
        host += " (here)"
    pid = "-" if status.pid is None else str(status.pid)
    return (status.name, _state(status), host, pid, _when(status.since),
            status.image or "-", status.store)  # fmt: skip


def cmd_lane_create(args: argparse.Namespace) -> int:
    labels = _labels(args.label)
    volumes = []
    for spec in args.volume or ():
        name, sep, path = spec.partition(":")
        read_only = path.endswith(":ro")
        path = path.removesuffix(":ro").removesuffix(":rw")
        if not sep or not name or not path:
            raise ValueError(f"--volume {spec!r}: use NAME:GUEST_PATH[:ro]")
        volumes.append(lanes.LaneVolume(name, path, read_only))
    lane = lanes.Lane.create(
        args.name, args.image, store=_required_store(args), s3_endpoint=args.s3_endpoint,
        env=_pairs(args.env, "--env"), mounts=[_mount(spec) for spec in args.mount or ()],
        cpus=args.cpus, memory_mib=args.memory,
        max_duration=parse_duration(args.max_duration) if args.max_duration else None,
        disk_size=parse_size(args.disk_size) if args.disk_size else None, labels=labels,
        volumes=volumes, network=network_from_args(args),
    )  # fmt: skip
    print(f"lane {lane.name} created in {lane.store} (image {lane.definition.image.id})")
    return 0


def _mount(spec: str) -> LaneMount:
    """``GUEST=HOSTDIR[:ro]``, as ``vm run --mount`` takes it."""
    guest, sep, source = spec.partition("=")
    read_only = source.endswith(":ro")
    source = source.removesuffix(":ro").removesuffix(":rw")
    if not sep or not guest or not source:
        raise ValueError(f"--mount {spec!r}: use GUEST=HOSTDIR[:ro]")
    if source == "memory":
        raise ValueError(
            f"--mount {spec!r}: a lane's mounts are host directories (its durable "
            "storage is its root disk and volumes)"
        )
    return lanes.LaneMount(source, guest, read_only)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``: seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in "smh" else (text, "s")
    try:
        seconds = float(number) * {"s": 1, "m": 60, "h": 3600}[unit]
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 10m or 2h")
    return seconds


def cmd_lane_ls(args: argparse.Namespace) -> int:
    statuses = lanes.Lane.list(
        store=args.store, s3_endpoint=args.s3_endpoint, labels=_labels(args.label)
    )
    if args.json:
        print(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        print("\t".join(LS_COLUMNS))
        for status in statuses:
            print("\t".join(_row(status)))
    return 0


def cmd_lane_start(args: argparse.Namespace) -> int:
    lane = _lane(args)
    if args.attach:
        return lane.run(cold=args.cold, force=args.force)
    print(_show(lane.start(cold=args.cold, force=args.force)))
    return 0


def cmd_lane_resume(args: argparse.Namespace) -> int:
    print(_show(_lane(args).resume()))
    return 0


def cmd_lane_checkpoint(args: argparse.Namespace) -> int:
    record = _lane(args).checkpoint(args.tag)
    how = "running" if record["running"] else "stopped"
    volumes = f" and {len(record['volumes'])} volume(s)" if record["volumes"] else ""
    print(f"lane {args.name}: checkpoint {args.tag} of its root disk{volumes} ({how})")
    return 0


def cmd_lane_fork(args: argparse.Namespace) -> int:
    name, sep, tag = args.source.partition("@")
    if not sep or not name or not tag:
        raise ValueError(f"{args.source!r}: fork a checkpoint, NAME@TAG")
    args.name = name
    fork = _lane(args).fork(tag, args.new_name)
    print(f"lane {fork.name} forked from {name}@{tag} in {fork.store}")
    return 0


def cmd_lane_info(args: argparse.Namespace) -> int:
    print(json.dumps(_lane(args).info(), indent=2, sort_keys=True))
    return 0


def cmd_lane_logs(args: argparse.Namespace) -> int:
    lane = _lane(args)
    if args.follow:
        return _follow(lane)
    found = False
    for what, path in lane.log_paths().items():
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        found = True
        print(f"==> {what} ({path}) <==")
        print(text, end="" if text.endswith("\n") or not text else "\n")
    if not found:
        raise _never_ran_here(lane)
    return 0


def _never_ran_here(lane: Lane) -> ValueError:
    return ValueError(f"lane {lane.name!r} has no logs on this host: it never ran here")


def cmd_lane_pause(args: argparse.Namespace) -> int:
    print(_show(_lane(args).pause()))
    return 0


def cmd_lane_stop(args: argparse.Namespace) -> int:
    print(_show(_lane(args).stop()))
    return 0


def cmd_lane_rm(args: argparse.Namespace) -> int:
    forks = _lane(args).remove()
    kept = f" (its forks {', '.join(forks)} keep everything they share with it)" if forks else ""
    print(f"lane {args.name} removed{kept}")
    return 0


def cmd_lane_exec(args: argparse.Namespace) -> int:
    if "--" in args.cmd:  # options after NAME (argparse hands all of it to REMAINDER)
        cut = args.cmd.index("--")
        args.exec_options.parse_args(args.cmd[:cut], namespace=args)
        args.cmd = args.cmd[cut:]
    run = command_options(args)
    # A lane running here needs no store: no connection to it, and none of its code.
    env = lanes.running_env(args.name, store=args.store)
    connection = _lane(args).connect() if env is None else lanes.connect_running(args.name, env)

    async def main() -> int:
        async with connection as machine:
            return await run_in_machine(machine, run)

    code: int = trio.run(main)
    sys.stdout.flush()
    return code


def _follow(lane: Lane) -> int:
    """The supervisor log as it grows, until no supervisor of the lane runs here."""
    path = lane.log_paths()["supervisor"]
    if not path.exists() and not lane.running_here():
        raise _never_ran_here(lane)
    with open(path, "rb") as log:
        while True:
            running = lane.running_here()
            while chunk := log.read(65536):
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if not running:
                return 0
            time.sleep(0.5)


def add_parsers(sub: Any) -> None:
    lane_commands = sub.add_parser(
        "lane", help="named durable sandboxes that run detached and move between hosts",
        description=LANE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_subparsers(dest="lane_command", required=True)  # fmt: skip

    c = lane_commands.add_parser("create", help="define a lane in a store")
    c.add_argument("name")
    c.add_argument("--image", required=True, help="a registered image built on this host")
    _store_args(c, required=True)
    c.add_argument("--cpus", type=int, default=1)
    c.add_argument("--memory", type=int, default=512, help="guest memory in MiB (default 512)")
    c.add_argument("--disk-size", help="root disk size (default: the image's)")
    c.add_argument("--label", action="append", metavar="KEY=VALUE", help="repeatable")
    c.add_argument(
        "--env", action="append", metavar="KEY=VALUE",
        help="environment of every `lane exec` (its own --env wins); repeatable",
    )  # fmt: skip
    c.add_argument(
        "--mount", action="append", metavar="GUEST=HOSTDIR[:ro]",
        help="a host directory at a guest path (virtiofs) at every start, on whichever host "
        "starts it (it must exist there); a lane with mounts cannot be paused; repeatable",
    )  # fmt: skip
    c.add_argument(
        "--max-duration", metavar="DURATION",
        help="each start runs at most this long (90s, 10m, 2h), then stops cleanly",
    )  # fmt: skip
    c.add_argument(
        "--volume", action="append", metavar="NAME:GUEST_PATH[:ro]",
        help="a volume of the lane's store, mounted at every start; repeatable",
    )  # fmt: skip
    add_network_arguments(c)
    c.set_defaults(func=cmd_lane_create)

    c = lane_commands.add_parser(
        "ls", help="lanes this host knows (or a store's), read from the store"
    )
    _store_args(c)
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--label", action="append", metavar="KEY=VALUE",
        help="only lanes with this label (repeatable: all must match)",
    )  # fmt: skip
    c.set_defaults(func=cmd_lane_ls)

    for name, func, text in (
        ("start", cmd_lane_start, "boot (or resume) a lane under a detached supervisor here"),
        ("resume", cmd_lane_resume, "resume a paused lane here, its processes where they were"),
        ("pause", cmd_lane_pause, "save a lane's memory and disk state in its store, and end"),
        ("stop", cmd_lane_stop, "stop a lane cleanly (guest sync, disk flushed and released)"),
        ("rm", cmd_lane_rm, "delete a stopped lane (definition and root disk)"),
        ("info", cmd_lane_info, "a lane's definition, state, lease, volumes and snapshot (JSON)"),
        ("logs", cmd_lane_logs, "a lane's supervisor log and guest console on this host"),
    ):
        c = lane_commands.add_parser(name, help=text)
        c.add_argument("name")
        _store_args(c)
        if name == "start":
            c.add_argument(
                "--cold", action="store_true",
                help="a paused lane: discard its memory snapshot and boot from its disk",
            )  # fmt: skip
            c.add_argument(
                "--force", action="store_true",
                help="take the lane over at once from a holder on another host that died or "
                "is cut off (it is fenced: it can never write the lane's disks again)",
            )  # fmt: skip
            c.add_argument(
                "--attach", action="store_true",
                help="supervise it in the foreground, its log on stderr; Ctrl-C or SIGTERM "
                "stops it cleanly (again: kill the guest); exit 0 after a clean stop, 130 "
                "if the guest was killed, 1 if it failed",
            )  # fmt: skip
        if name == "logs":
            c.add_argument(
                "--follow", "-f", action="store_true",
                help="print the supervisor log as it grows, until the lane stops here",
            )  # fmt: skip
        c.set_defaults(func=func)

    c = lane_commands.add_parser(
        "checkpoint", help="checkpoint a lane's root disk and volumes (running or stopped)"
    )
    c.add_argument("name")
    c.add_argument("tag")
    _store_args(c)
    c.set_defaults(func=cmd_lane_checkpoint)

    c = lane_commands.add_parser("fork", help="a new lane made of a checkpoint (its disks forked)")
    c.add_argument("source", metavar="NAME@TAG")
    c.add_argument("new_name", metavar="NEW")
    _store_args(c)
    c.set_defaults(func=cmd_lane_fork)

    options = argparse.ArgumentParser(prog="lanekit lane exec NAME", add_help=False)
    _store_args(options)
    add_command_arguments(options, "lanekit lane exec NAME")
    c = lane_commands.add_parser(
        "exec", parents=[options], help="run a command in a running lane, streaming its output"
    )
    c.add_argument("name")
    c.add_argument("cmd", nargs=argparse.REMAINDER, help="[OPTIONS] -- COMMAND [ARG...]")
    c.set_defaults(func=cmd_lane_exec, exec_options=options)


# ---------------------------------------------------------------- volumes


def _labels(items: Any) -> dict[str, str]:
    return _pairs(items, "--label")


def _pairs(items: Any, option: str) -> dict[str, str]:
    pairs = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} {item!r}: use KEY=VALUE")
        pairs[key] = value
    return pairs


def _volume_store(args: argparse.Namespace) -> blockstore.ObjectStore:
    return blockstore.open_store(_required_store(args), s3_endpoint=args.s3_endpoint)


def cmd_volume_create(args: argparse.Namespace) -> int:
    from vm import volumes

    objects = _volume_store(args)
    definition = trio.run(
        volumes.create_volume, objects, args.name, parse_size(args.size), _labels(args.label)
    )
    print(f"volume {args.name} created in {objects.describe()} ({definition['size']} bytes, ext4)")
    return 0


def cmd_volume_ls(args: argparse.Namespace) -> int:
    from vm import volumes

    objects = _volume_store(args)
    for name in volumes.list_volumes(objects):
        print(name)
    return 0


def cmd_volume_info(args: argparse.Namespace) -> int:
    from vm import volumes

    print(json.dumps(volumes.volume_info(_volume_store(args), args.name), indent=2, sort_keys=True))
    return 0


def cmd_volume_rm(args: argparse.Namespace) -> int:
    from vm import volumes

    volumes.remove_volume(_volume_store(args), args.name)
    print(f"volume {args.name} removed (its blocks are freed by `lanekit disk gc`)")
    return 0


def add_volume_parsers(sub: Any) -> None:
    volumes = sub.add_parser(
        "volume", help="named ext4 disks in a store, attached to lanes and sandboxes"
    ).add_subparsers(dest="volume_command", required=True)
    for name, func, text in (
        ("create", cmd_volume_create, "make a volume: a disk holding a fresh ext4 filesystem"),
        ("ls", cmd_volume_ls, "list a store's volumes"),
        ("info", cmd_volume_info, "a volume's size, labels, stored bytes and writer"),
        ("rm", cmd_volume_rm, "delete a volume no sandbox writes"),
    ):
        c = volumes.add_parser(name, help=text)
        if name != "ls":
            c.add_argument("name")
        _store_args(c, required=True)
        if name == "create":
            c.add_argument("--size", required=True, help="e.g. 256M, 4G: also its quota")
            c.add_argument("--label", action="append", metavar="KEY=VALUE")
        c.set_defaults(func=func)
