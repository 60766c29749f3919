"""A lane in its object store: its definition, its root disk, and who runs it.

Layout, next to the lane's disks and images in the same store::

    lanes/<name>/definition    JSON (written once, with If-None-Match)
    lanes/<name>/ended         JSON: why the run with lease epoch N ended cleanly
    disks/lane.<name>/...      the lane's root disk: its lease says who runs the lane

The lease on the root disk is the truth about where a lane runs: the supervisor that
boots the lane holds it (taken and renewed by the block store, fenced, epoch-numbered).
A holder that died on this host is recognised as dead (``blockstore.identity``), so a
lane whose supervisor was killed shows as crashed at once (a held lease nobody renews),
and the next start takes over.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import blockstore
from blockstore import ObjectStore
from blockstore.layout import lease_key
from blockstore.lease import holder_is_dead, lease_is_live, read_lease
from blockstore.objectstore import put_new

from ..net import NetworkConfig
from ..registry import ImageEntry
from ..volumes import defined_names
from .errors import LaneError, LaneNotFound, check_lane_name

PREFIX = "lanes/"


def root_disk_name(lane: str) -> str:
    return f"lane.{lane}"


def _definition_key(name: str) -> str:
    return f"{PREFIX}{name}/definition"


@dataclasses.dataclass(frozen=True)
class LaneVolume:
    """A volume of the lane's store, mounted at ``path`` at every start of the lane."""

    name: str
    path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class LaneMount:
    """A directory of the host that starts the lane, at ``path`` in the guest (virtiofs).
    It is the host's, not the store's: it must exist wherever the lane starts."""

    host_path: str
    path: str
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class LaneDefinition:
    """What a lane is, the same on every host: its image (by digest), its size, labels, and
    the network it gets (a plain dict handed to the sandbox once networking lands)."""

    name: str
    image: ImageEntry
    cpus: int = 1
    memory_mib: int = 512
    disk_size: int | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    network: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: float = 0.0
    volumes: tuple[LaneVolume, ...] = ()
    max_duration: float | None = None
    """Seconds a start may run before its supervisor stops it cleanly (None: no limit)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Environment of every command run in the lane (a command's own variables win)."""
    mounts: tuple[LaneMount, ...] = ()
    forked_from: dict[str, str] | None = None
    """``{"lane": NAME, "checkpoint": TAG}`` for a lane made by a fork."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image.to_json(),
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disk_size": self.disk_size,
            "labels": dict(self.labels),
            "network": dict(self.network),
            "created": self.created,
            "volumes": [dataclasses.asdict(v) for v in self.volumes],
            "max_duration": self.max_duration,
            "env": dict(self.env),
            "mounts": [dataclasses.asdict(m) for m in self.mounts],
            "forked_from": None if self.forked_from is None else dict(self.forked_from),
        }

    @classmethod
    def from_json(cls, data: Any) -> LaneDefinition:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return cls(
            name=str(data["name"]),
            image=ImageEntry.from_json(data["image"]),
            cpus=int(data.get("cpus", 1)),
            memory_mib=int(data.get("memory_mib", 512)),
            disk_size=None if data.get("disk_size") is None else int(data["disk_size"]),
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
            network=dict(data.get("network") or {}),
            created=float(data.get("created", 0.0)),
            volumes=tuple(
                LaneVolume(str(v["name"]), str(v["path"]), bool(v.get("read_only", False)))
                for v in data.get("volumes") or ()
            ),
            max_duration=None if data.get("max_duration") is None else float(data["max_duration"]),
            env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
            mounts=tuple(
                LaneMount(str(m["host_path"]), str(m["path"]), bool(m.get("read_only", False)))
                for m in data.get("mounts") or ()
            ),
            forked_from=(
                None
                if data.get("forked_from") is None
                else {str(k): str(v) for k, v in data["forked_from"].items()}
            ),
        )


def write_definition(objects: ObjectStore, definition: LaneDefinition) -> None:
    """Store a new lane's definition (blocking); LaneError if the name is taken."""
    check_lane_name(definition.name)
    if definition.image.digest is None:
        raise LaneError(f"image {definition.image.id!r} is not built: a lane needs its digest")
    body = json.dumps(
        {**definition.to_json(), "created": definition.created or time.time()}, sort_keys=True
    ).encode()
    if not put_new(objects, _definition_key(definition.name), body):
        raise LaneError(f"a lane named {definition.name!r} exists in {objects.describe()}")


def read_definition(objects: ObjectStore, name: str) -> LaneDefinition:
    check_lane_name(name)
    try:
        data = objects.get(_definition_key(name)).data
    except blockstore.ObjectNotFound:
        raise LaneNotFound(f"no lane named {name!r} in {objects.describe()}") from None
    try:
        definition = LaneDefinition.from_json(json.loads(data))
        if definition.name != name:
            raise ValueError(f"it names lane {definition.name!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise LaneError(f"lane {name!r}: its definition is unreadable ({exc})") from None
    return definition


def list_lane_names(objects: ObjectStore) -> list[str]:
    return defined_names(objects, PREFIX)


def delete_definition(objects: ObjectStore, name: str) -> None:
    objects.delete(_definition_key(name))


def runner(objects: ObjectStore, name: str) -> dict[str, Any] | None:
    """Who runs the lane now, by its root disk's lease: the holder (host, pid, ...) with
    the lease's epoch, or None if nobody does (never started, stopped, or its holder is
    dead or expired)."""
    lease, _ = read_lease(objects, root_disk_name(name))
    if lease is None or not lease_is_live(lease):
        return None
    return {**lease["holder"], "epoch": lease["epoch"], "since": lease["since"]}


def root_lease(objects: ObjectStore, name: str) -> dict[str, Any] | None:
    """The lease on the lane's root disk as stored (None if it never ran), with ``live``:
    a held lease that is not live is a crashed run's (its holder died or lost the store)."""
    lease, _ = read_lease(objects, root_disk_name(name))
    if lease is None:
        return None
    return {**lease, "live": lease_is_live(lease)}


def release_dead_lease(objects: ObjectStore, disk: str, process: str) -> int | None:
    """Release the lease on ``disk`` if the dead process ``process`` (``PID:START``) of
    this host still holds it: a supervisor that was killed cannot release it itself, and
    its lane would show crashed. The epoch released, or None (another holder's lease, or
    none held)."""
    lease, etag = read_lease(objects, disk)
    if (
        lease is None
        or lease["state"] != "held"
        or lease["holder"].get("process") != process
        or not holder_is_dead(lease["holder"])
    ):
        return None
    released = json.dumps(dict(lease, state="released")).encode()
    try:
        objects.put(lease_key(disk), released, if_match=etag)
    except blockstore.PreconditionFailed:  # taken over meanwhile: not ours to release
        return None
    return int(lease["epoch"])


def _ended_key(name: str) -> str:
    return f"{PREFIX}{name}/ended"


def write_ended(objects: ObjectStore, name: str, epoch: int, reason: str) -> None:
    """Why the run with lease ``epoch`` ended cleanly (shown by ``lane ls`` while the lease
    still carries that epoch, so a newer run never shows an older run's reason)."""
    body = {"epoch": epoch, "reason": reason, "at": time.time()}
    objects.put(_ended_key(name), json.dumps(body, sort_keys=True).encode())


def read_ended(objects: ObjectStore, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(objects.get(_ended_key(name)).data)
    except (blockstore.ObjectNotFound, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("reason"), str) else None


def delete_ended(objects: ObjectStore, name: str) -> None:
    objects.delete(_ended_key(name))


def storable_network(network: NetworkConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The network as the definition stores it (checked by making it a config first)."""
    if network is None:
        return {}
    config = network if isinstance(network, NetworkConfig) else NetworkConfig.from_dict(network)
    if config.callback is not None:
        raise LaneError(
            "a lane's network is stored with it: use rules (--allow), not a Python policy"
        )
    if config.secrets:
        raise LaneError(
            "a lane's network is stored in its store, and secrets are not: give them to "
            "sandboxes you boot yourself (Sandbox(network=...)), not to a lane"
        )
    return config.to_dict() if config.enabled else {}
