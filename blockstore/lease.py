"""The single-writer lease, with fencing.

The lease object is created with If-None-Match (nobody holds it) or replaced with If-Match
of the version we read (expired, released, forced, or its holder is dead): both are atomic
in the store, so two hosts racing for a disk cannot both win. Each acquisition takes a new
epoch greater than any seen before; the writer then commits a head carrying that epoch,
which changes the head's etag, so a fenced writer's next If-Match commit fails. Checks on
the lease alone would leave a window between check and write; the head commit closes it.

Every lease write can land and lose its reply: each names its holder by a random id, so
after an error the lease is read back and a write of our own is recognised, not taken for
another writer's.

Expiry compares the holder's renewal time with the local clock: hosts' clocks must agree to
within a fraction of the TTL. A holder on this host (same boot id and pid namespace) whose
process is gone, or whose pid now belongs to another process, is dead: its lease is free.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    BlockStoreError,
    CorruptMetadata,
    Fenced,
    LeaseHeld,
    ObjectNotFound,
    PreconditionFailed,
)
from .identity import host_identity, process_identity
from .layout import lease_key
from .objectstore import ObjectStore

DEFAULT_TTL = 30.0
CONFIRM_FRACTION = 1 / 30
"""A writer reconfirms its lease (a renewal: a conditional put, so also a check) before a
commit when it last confirmed it longer than this fraction of the TTL ago, so a writer that
was taken over stops within about a second at the default TTL, not at its next renewal."""
EXPIRY_MARGIN = 1 / 4
"""A writer whose lease is this close (as a fraction of the TTL) to expiring by its own
clock renews before it commits."""


@dataclass
class Holder:
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host_id: str | None = field(default_factory=host_identity)
    process: str | None = field(default_factory=lambda: process_identity(os.getpid()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "id": self.id,
            "host_id": self.host_id,
            "process": self.process,
        }


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def parse_lease(data: bytes, where: str) -> dict[str, Any]:
    try:
        state = json.loads(data)
    except ValueError as e:
        raise CorruptMetadata(where, f"unreadable lease: {e}") from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("holder"), dict)
        or type(state.get("epoch")) is not int
        or state["epoch"] < 0
        or not all(_number(state.get(k)) for k in ("since", "renewed", "ttl"))
        or state.get("state") not in ("held", "released")
    ):
        raise CorruptMetadata(where, "unreadable lease: fields missing or invalid")
    return state


def read_lease(objects: ObjectStore, disk: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = objects.get(lease_key(disk))
    except ObjectNotFound:
        return None, None
    return parse_lease(obj.data, lease_key(disk)), obj.etag


def _read_any(
    objects: ObjectStore, disk: str
) -> tuple[dict[str, Any] | None, str | None, CorruptMetadata | None]:
    """The lease, its etag, and why it is unreadable if it is."""
    try:
        obj = objects.get(lease_key(disk))
    except ObjectNotFound:
        return None, None, None
    try:
        return parse_lease(obj.data, lease_key(disk)), obj.etag, None
    except CorruptMetadata as e:
        return None, obj.etag, e


def holder_is_dead(holder: dict[str, Any]) -> bool:
    """True only for a holder that ran on this host (same boot id and pid namespace) and
    whose process is gone or whose pid now names another process. Hostnames and pids alone
    prove nothing: machines share hostnames and containers share a kernel."""
    here = host_identity()
    if here is None or holder.get("host_id") != here:
        return False
    pid, process = holder.get("pid"), holder.get("process")
    if type(pid) is not int or not isinstance(process, str):
        return False
    return process_identity(pid) != process


def lease_is_live(state: dict[str, Any] | None, now: float | None = None) -> bool:
    """Held, unexpired, and not held by a process known to be dead."""
    if state is None or state.get("state") != "held":
        return False
    if (now or time.time()) >= float(state["renewed"]) + float(state["ttl"]):
        return False
    return not holder_is_dead(state["holder"])


class Lease:
    """One writer's hold on a disk. Methods block: call them from one worker thread at a
    time (the block store serialises them)."""

    def __init__(
        self,
        objects: ObjectStore,
        disk: str,
        ttl: float = DEFAULT_TTL,
        holder: Holder | None = None,
    ) -> None:
        self.objects = objects
        self.disk = disk
        self.ttl = ttl
        self.holder = holder or Holder()
        self.epoch = 0
        self.since = 0.0
        self.renewed = 0.0
        """The renewal time the store holds (others judge expiry by it)."""
        self.confirmed = -math.inf
        """When (time.monotonic) the store last showed the lease to be ours."""
        self._etag: str | None = None
        self._uncertain = False
        """A write of ours may or may not have landed: read the lease before the next."""
        self.lost = False
        self.expired = False
        """Not confirmed for a whole TTL (the store unreachable): others may have taken the
        lease, so it is never renewed again, even when the store answers."""

    @property
    def key(self) -> str:
        return lease_key(self.disk)

    def _body(self, state: str, renewed: float) -> bytes:
        return json.dumps(
            {
                "holder": self.holder.as_dict(),
                "epoch": self.epoch,
                "since": self.since,
                "renewed": renewed,
                "ttl": self.ttl,
                "state": state,
            }
        ).encode()

    def _adopt(self, current: dict[str, Any] | None, etag: str | None, any_epoch: bool) -> bool:
        """If ``current`` is our lease, held, take its version as ours."""
        if (
            current is None
            or etag is None
            or current["state"] != "held"
            or current["holder"].get("id") != self.holder.id
            or not (any_epoch or current["epoch"] == self.epoch)
        ):
            return False
        self.epoch = current["epoch"]
        self.since = float(current["since"])
        self.renewed = float(current["renewed"])
        self._etag = etag
        self.confirmed = time.monotonic()
        self._uncertain = False
        self.lost = False
        return True

    def _resolve(self) -> bool:
        """Read the lease after a write whose outcome is unknown: still ours?"""
        current, etag = read_lease(self.objects, self.disk)
        if self._adopt(current, etag, any_epoch=False):
            return True
        self.lost = True
        self._uncertain = False
        return False

    def acquire(self, min_epoch: int, *, force: bool = False) -> int:
        """Take the lease with an epoch above ``min_epoch`` and any previous holder's."""
        error: Exception | None = None
        for _attempt in range(6):
            current, etag, unreadable = _read_any(self.objects, self.disk)
            if unreadable is not None and not force:
                raise CorruptMetadata(
                    unreadable.key, f"{unreadable.reason} (a forced open replaces it)"
                )
            if self._adopt(current, etag, any_epoch=True):
                return self.epoch  # an earlier try of ours landed
            if current is not None and not force and lease_is_live(current):
                raise LeaseHeld(
                    self.disk,
                    current["holder"],
                    float(current["since"]),
                    float(current["renewed"]) + float(current["ttl"]),
                )
            previous = int(current["epoch"]) if current else 0
            self.epoch = max(previous, min_epoch) + 1
            stamp = self.since = time.time()
            try:
                if etag is None:
                    new_etag = self.objects.put(
                        self.key, self._body("held", stamp), if_none_match=True
                    )
                else:
                    new_etag = self.objects.put(self.key, self._body("held", stamp), if_match=etag)
            except PreconditionFailed:
                continue  # another writer, or our own retried request: look again
            except Exception as e:
                error = e  # it may have landed: look again (raises if the store is down)
                self._uncertain = True
                continue
            self._etag, self.renewed = new_etag, stamp
            self.confirmed = time.monotonic()
            self._uncertain = self.lost = False
            return self.epoch
        if error is not None:
            raise error
        current, _ = read_lease(self.objects, self.disk)
        holder = current["holder"] if current else {}
        raise LeaseHeld(self.disk, holder, float(current["since"]) if current else 0.0, 0.0)

    def _fenced(self) -> Fenced:
        try:
            current, _ = read_lease(self.objects, self.disk)
        except Exception:
            current = None
        who = current["holder"] if current and current["state"] == "held" else "nobody"
        return Fenced(
            f"disk {self.disk!r}: this writer's lease (epoch {self.epoch}) was taken over "
            f"(now held by {who}); it can no longer commit"
        )

    def expire(self) -> Fenced:
        """Give the lease up for good after a whole TTL without confirmation."""
        self.expired = True
        return Fenced(
            f"disk {self.disk!r}: this writer could not renew its lease (epoch {self.epoch}) "
            f"for longer than its TTL ({self.ttl:g} s): the store was unreachable, so another "
            "host may have taken the disk over; it never commits again"
        )

    def renew(self) -> None:
        """Extend the lease; raises Fenced if another writer took it, or if it expired
        before this renewal (see ``expired``)."""
        if self.expired or self.expired_locally():
            raise self.expire()
        if self.lost:
            raise self._fenced()
        if self._uncertain and not self._resolve():
            raise self._fenced()
        stamp = time.time()
        try:
            etag = self.objects.put(self.key, self._body("held", stamp), if_match=self._etag or "-")
        except Exception as e:
            self._uncertain = True
            try:
                ours = self._resolve()
            except Exception:
                if isinstance(e, PreconditionFailed):
                    raise
                raise e from None
            if ours:
                return  # landed, or not but still ours: either way confirmed just now
            raise self._fenced() from None
        self._etag, self.renewed = etag, stamp
        self.confirmed = time.monotonic()

    def expired_locally(self, margin: float = 0.0) -> bool:
        return time.time() + margin >= self.renewed + self.ttl

    def needs_confirmation(self) -> bool:
        """Whether a commit must reconfirm the lease first (see CONFIRM_FRACTION)."""
        return (
            self._uncertain
            or self.lost
            or time.monotonic() - self.confirmed >= self.ttl * CONFIRM_FRACTION
            or self.expired_locally(margin=self.ttl * EXPIRY_MARGIN)
        )

    def release(self) -> None:
        """Mark the lease released so the next writer need not wait for the TTL."""
        if self.lost or self.expired:
            return
        if self._uncertain and not self._resolve():
            return
        if self._etag is None:
            return
        for _attempt in range(3):
            try:
                self.objects.put(
                    self.key, self._body("released", self.renewed), if_match=self._etag
                )
                break
            except Exception:
                current, etag = read_lease(self.objects, self.disk)
                if current is None or current["holder"].get("id") != self.holder.id:
                    self.lost = True
                    break
                if current["state"] == "released":
                    break  # ours landed
                self._etag = etag  # still held by us: a renewal of ours landed; again
        self._etag = None


def force_release(objects: ObjectStore, disk: str) -> dict[str, Any] | None:
    """Break whatever lease is on the disk (the holder gets fenced at its next commit).
    An unreadable lease is replaced too: the head's epoch still fences its writer."""
    key = lease_key(disk)
    for _attempt in range(3):
        try:
            obj = objects.get(key)
        except ObjectNotFound:
            return None
        try:
            current = parse_lease(obj.data, key)
        except CorruptMetadata:
            current = {"holder": {}, "epoch": 0, "since": 0.0, "renewed": 0.0, "ttl": 0.0}
        if current.get("state") == "released":
            return current
        released = dict(current, state="released")
        try:
            objects.put(key, json.dumps(released).encode(), if_match=obj.etag)
            return released
        except Exception:
            continue  # it may have landed, or the holder renewed: look again
    raise BlockStoreError(f"disk {disk!r}: its lease kept changing; try again")
