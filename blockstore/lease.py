"""The single-writer lease, with fencing.

The lease object is created with If-None-Match (nobody holds it) or replaced with If-Match
of the version we read (expired, released, or forced): both are atomic in the store, so two
hosts racing for a disk cannot both win. Each acquisition takes a new epoch greater than any
seen before; the writer then commits a head carrying that epoch, which changes the head's
etag, so a fenced writer's next If-Match commit fails. Checks on the lease alone would leave
a window between check and write; the head commit closes it.

Expiry compares the holder's renewal time with the local clock: hosts' clocks must agree to
within a fraction of the TTL.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import Fenced, LeaseHeld, ObjectNotFound, PreconditionFailed
from .layout import lease_key
from .objectstore import ObjectStore

DEFAULT_TTL = 30.0


@dataclass
class Holder:
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "id": self.id}


def read_lease(objects: ObjectStore, disk: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = objects.get(lease_key(disk))
    except ObjectNotFound:
        return None, None
    return json.loads(obj.data), obj.etag


def lease_is_live(state: dict[str, Any] | None, now: float | None = None) -> bool:
    if state is None or state.get("state") != "held":
        return False
    return (now or time.time()) < float(state["renewed"]) + float(state["ttl"])


class Lease:
    """One writer's hold on a disk. Methods block: call them from a worker thread."""

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
        self._etag: str | None = None
        self.lost = False

    def _body(self, state: str = "held") -> bytes:
        return json.dumps(
            {
                "holder": self.holder.as_dict(),
                "epoch": self.epoch,
                "since": self.since,
                "renewed": self.renewed,
                "ttl": self.ttl,
                "state": state,
            }
        ).encode()

    def acquire(self, min_epoch: int, *, force: bool = False) -> int:
        """Take the lease with an epoch above ``min_epoch`` and any previous holder's."""
        key = lease_key(self.disk)
        for _attempt in range(5):
            current, etag = read_lease(self.objects, self.disk)
            if current is not None and not force and lease_is_live(current):
                if current["holder"].get("id") == self.holder.id:
                    return self.epoch
                raise LeaseHeld(
                    self.disk,
                    current["holder"],
                    float(current["since"]),
                    float(current["renewed"]) + float(current["ttl"]),
                )
            previous = int(current["epoch"]) if current else 0
            self.epoch = max(previous, min_epoch) + 1
            self.since = self.renewed = time.time()
            try:
                if etag is None:
                    self._etag = self.objects.put(key, self._body(), if_none_match=True)
                else:
                    self._etag = self.objects.put(key, self._body(), if_match=etag)
            except PreconditionFailed:
                if self._is_ours():
                    return self.epoch
                continue
            self.lost = False
            return self.epoch
        current, _ = read_lease(self.objects, self.disk)
        holder = current["holder"] if current else {}
        raise LeaseHeld(self.disk, holder, float(current["since"]) if current else 0.0, 0.0)

    def _is_ours(self) -> bool:
        """After an ambiguous conditional put: did our own write land?"""
        try:
            obj = self.objects.get(lease_key(self.disk))
        except ObjectNotFound:
            return False
        state = json.loads(obj.data)
        if state["holder"].get("id") == self.holder.id and state["epoch"] == self.epoch:
            self._etag = obj.etag
            return True
        return False

    def renew(self) -> None:
        """Extend the lease; raises Fenced if another writer took it."""
        if self.lost:
            raise Fenced(f"disk {self.disk!r}: this writer's lease was taken over")
        previous = self.renewed
        self.renewed = time.time()
        try:
            self._etag = self.objects.put(
                lease_key(self.disk), self._body(), if_match=self._etag or "-"
            )
        except PreconditionFailed:
            if self._is_ours():
                return
            self.renewed = previous
            self.lost = True
            current, _ = read_lease(self.objects, self.disk)
            who = current["holder"] if current else "nobody (released)"
            raise Fenced(
                f"disk {self.disk!r}: this writer's lease (epoch {self.epoch}) was taken over "
                f"by {who}; it can no longer commit"
            ) from None

    def expired_locally(self, margin: float = 0.0) -> bool:
        return time.time() + margin >= self.renewed + self.ttl

    def release(self) -> None:
        """Mark the lease released so the next writer need not wait for the TTL."""
        if self.lost or self._etag is None:
            return
        try:
            self.objects.put(lease_key(self.disk), self._body("released"), if_match=self._etag)
        except PreconditionFailed:
            self.lost = True
        self._etag = None


def force_release(objects: ObjectStore, disk: str) -> dict[str, Any] | None:
    """Break whatever lease is on the disk (the holder gets fenced at its next commit)."""
    current, etag = read_lease(objects, disk)
    if current is None or etag is None:
        return None
    current = dict(current, state="released")
    objects.put(lease_key(disk), json.dumps(current).encode(), if_match=etag)
    return current
