"""The audit trail: one event per decision, to a JSON-lines file and to live watchers.

A denial is recorded when it is made; an allowed flow when it ends, with the bytes it
carried each way (``up``: guest to upstream). The file is written by a service task in
batches from a worker thread, never from the event loop; a watcher that falls behind
loses events rather than slowing the sandbox (``AuditStream.dropped`` counts them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

WATCHER_BUFFER = 4096
FILE_BUFFER = 65536


@dataclasses.dataclass(frozen=True)
class AuditEvent:
    """``kind``: ``tcp``, ``http``, ``dns``, ``inbound`` or ``secret``; ``verdict``:
    ``allow``, ``deny`` or ``error`` (allowed, but upstream failed); ``reason``: the rule
    or the reason that decided."""

    time: float
    sandbox: str
    kind: str
    src: str
    dst: str
    hostname: str | None
    verdict: str
    reason: str
    bytes_up: int = 0
    bytes_down: int = 0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)


class AuditStream:
    """Live audit events: ``async for event in stream``; ends when the sandbox's network
    stops or :meth:`aclose` is called."""

    def __init__(self, audit: Audit) -> None:
        self._audit = audit
        self._send, self._receive = trio.open_memory_channel[AuditEvent](WATCHER_BUFFER)
        self.dropped = 0

    def _offer(self, event: AuditEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass

    def __aiter__(self) -> AuditStream:
        return self

    async def __anext__(self) -> AuditEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._audit._watchers.discard(self)
        self._send.close()

    async def __aenter__(self) -> AuditStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Audit:
    def __init__(self, sandbox: str, path: Path | None) -> None:
        self.sandbox = sandbox
        self.path = path
        self._watchers: set[AuditStream] = set()
        self._to_file, self._from_events = trio.open_memory_channel[AuditEvent](FILE_BUFFER)
        self.counts: dict[str, int] = {}
        self.lost = 0

    def record(self, kind: str, src: str, dst: str, hostname: str | None, verdict: str,
               reason: str, up: int = 0, down: int = 0,
               detail: dict[str, Any] | None = None) -> AuditEvent:  # fmt: skip
        event = AuditEvent(
            time.time(), self.sandbox, kind, src, dst, hostname, verdict, reason, up, down,
            detail or {},
        )  # fmt: skip
        key = f"{kind}:{verdict}"
        self.counts[key] = self.counts.get(key, 0) + 1
        for watcher in list(self._watchers):
            watcher._offer(event)
        if self.path is not None:
            try:
                self._to_file.send_nowait(event)
            except trio.WouldBlock:
                self.lost += 1
            except trio.ClosedResourceError:
                pass
        return event

    def watch(self) -> AuditStream:
        stream = AuditStream(self)
        self._watchers.add(stream)
        return stream

    def close(self) -> None:
        """End every watcher's stream and the file writer (after what it holds)."""
        for watcher in list(self._watchers):
            watcher._send.close()
        self._watchers.clear()
        self._to_file.close()

    async def write_file(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Service task: append events to the log in batches until :meth:`close`."""
        if self.path is None:
            task_status.started()
            return
        path = self.path
        await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
        f = await trio.to_thread.run_sync(lambda: open(path, "a", encoding="utf-8"))  # noqa: SIM115
        task_status.started()
        try:
            async for first in self._from_events:
                batch = [first.to_json()]
                while True:
                    try:
                        batch.append(self._from_events.receive_nowait().to_json())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                text = "\n".join(batch) + "\n"
                await trio.to_thread.run_sync(_append, f, text)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(f.close)


def _append(f: Any, text: str) -> None:
    f.write(text)
    f.flush()
