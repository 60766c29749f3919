"""The supervisor's agent relay: many clients (``lane exec``, ``Lane.connect()``) share the
supervisor's one session with the guest agent.

A client speaks the agent protocol to the relay's socket as it would to qemu's. The relay
answers its HELLO itself and passes every other frame through unchanged: the guest's frames
on a stream a client opened go back to that client only (``AgentSession.tap``). Flow control
is end to end (the client's WINDOW frames reach the guest), so the relay holds at most a
window per stream. A client that goes away leaves its processes running in the guest.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..agent import AgentSession
from ..agent import protocol as P

PASSTHROUGH = frozenset({P.CONTROL, P.DATA, P.WINDOW, P.EOF})


class _Client:
    """One relayed client: what the guest sends on its streams, queued for its socket."""

    def __init__(self) -> None:
        self.outgoing, self.queued = trio.open_memory_channel[bytes](math.inf)
        self.streams: set[int] = set()

    def deliver(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == P.ALIVE:
            self.streams.clear()  # the agent restarted: the client says HELLO again
        with contextlib.suppress(trio.ClosedResourceError):
            self.outgoing.send_nowait(P.frame(kind, sid, payload))

    def lost(self, error: BaseException) -> None:
        self.outgoing.close()


async def bind_unix(path: Path) -> trio.SocketListener:
    """A listening unix socket only its owner may connect to (0600 from its creation)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve_relay(
    path: Path,
    session: Callable[[], Awaitable[AgentSession]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent relay on ``path`` until cancelled."""
    listener = await bind_unix(path)

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await _relay(stream, await session())

    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(handle, [listener], handler_nursery=nursery)


async def _relay(stream: trio.SocketStream, session: AgentSession) -> None:
    client = _Client()
    session.listen(client)
    try:
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                async with client.queued:
                    async for data in client.queued:
                        await stream.send_all(data)
                nursery.cancel_scope.cancel()  # the session ended

            nursery.start_soon(write)
            reader = P.FrameReader()
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                try:
                    reader.feed(data)
                    for kind, sid, payload in reader.frames():
                        await _from_client(client, session, kind, sid, payload)
                except P.ProtocolError:
                    break
            nursery.cancel_scope.cancel()
    finally:
        session.unlisten(client)
        for sid in client.streams:
            session.untap(sid, client)
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _from_client(
    client: _Client, session: AgentSession, kind: int, sid: int, payload: bytes
) -> None:
    if kind == P.HELLO:
        hello = P.parse_message(payload)
        await session.wait_ready()
        answer = {
            "magic": P.HELLO_MAGIC,
            "version": P.VERSION,
            "nonce": hello.get("nonce"),
            "session": session.guest_session,
            "processes": [],
            "pid": session.agent_pid,
        }
        client.deliver(P.HELLO, 0, P.pack(answer))
    elif kind == P.CALL:
        if sid not in client.streams:
            if session.in_use(sid):
                error = {"error": {"kind": "busy", "message": f"stream {sid} is in use"}}
                client.deliver(P.REPLY, sid, P.pack(error))
                return
            session.tap(sid, client)
            client.streams.add(sid)
        await session.send_frame(P.frame(kind, sid, payload))
    elif kind in PASSTHROUGH and sid in client.streams:
        await session.send_frame(P.frame(kind, sid, payload))
