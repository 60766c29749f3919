"""The host side of the guest agent: one session over the VM's virtio-serial port.

A session multiplexes any number of calls, processes and file transfers on one socket
(qemu's end of the port). One reader task dispatches frames to the stream they belong to;
the consumer of a stream grants the guest more window as it takes data, so a slow
consumer slows the guest's producer instead of growing memory here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import trio

from ..errors import GuestAgentError
from . import protocol as P

HELLO_TIMEOUT = 30.0
CHANNEL_NUMBERS = {"stdout": P.STDOUT, "stderr": P.STDERR}


class TaskSpawner(Protocol):
    """Where the session's reader task runs: a nursery, or ``Services``."""

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None: ...


class Tap(Protocol):
    """Raw frames of streams this session does not own (a relay for other clients: a
    lane's supervisor shares its one session with every ``lane exec``)."""

    def deliver(self, kind: int, sid: int, payload: bytes) -> None:
        """A frame from the guest on a tapped stream (or ALIVE: the agent restarted)."""

    def lost(self, error: BaseException) -> None:
        """The session is gone; no frame comes any more."""


@dataclasses.dataclass(frozen=True)
class ExecEvent:
    """One event of a running command: ``kind`` is "stdout", "stderr" or "exited"."""

    kind: str
    data: bytes = b""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False


@dataclasses.dataclass(frozen=True)
class GuestProcess:
    """A process the agent runs, as a new session finds it (for :meth:`attach`)."""

    stream: int
    pid: int
    argv: tuple[str, ...]
    exited: bool


def guest_os_error(path: str, error: Mapping[str, Any]) -> Exception:
    """An agent's error reply as the OSError subclass it names (FileNotFoundError, ...)."""
    kind = str(error.get("kind", ""))
    message = str(error.get("message", "the guest agent refused"))
    code = getattr(errno, kind, None) if kind.startswith("E") else None
    if code is not None:
        return OSError(code, message, path)
    return GuestAgentError(message)


class _Stream:
    """What the session knows of one stream id."""

    def __init__(self, sid: int, window: int) -> None:
        self.sid = sid
        self.window = window
        self.replies_in, self.replies = trio.open_memory_channel[dict[str, Any]](1)
        # Bounded by flow control: the guest never sends past a window per channel.
        self.events_in, self.events = trio.open_memory_channel[tuple[Any, ...]](float("inf"))
        self.received = {P.STDOUT: 0, P.STDERR: 0}
        self.consumed = {P.STDOUT: 0, P.STDERR: 0}
        self.announced = {P.STDOUT: 0, P.STDERR: 0}
        self.stdin_sent = 0
        self.stdin_limit = 0
        self.stdin_room = trio.Event()
        self.error: BaseException | None = None
        self.first_reply: Any = None
        self.ended = False
        """The process exited: what is still written to its stdin goes nowhere."""

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.events_in.send_nowait(("error", error))
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            self.replies_in.send_nowait({"error": {"kind": "lost", "message": str(error)}})
        self.stdin_room.set()


class AgentSession:
    """A session with the guest agent; ``await open(nursery)`` before use."""

    def __init__(self, socket_path: str, *, window: int = P.DEFAULT_WINDOW) -> None:
        self.socket_path = socket_path
        self.window = window
        self.guest_session: str | None = None
        self.agent_pid: int | None = None
        self.processes: list[GuestProcess] = []
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._streams: dict[int, _Stream] = {}
        self._ready = trio.Event()
        self._nonce = ""
        self._dead: BaseException | None = None
        self._next_sid = random.randrange(1, 1 << 30)
        self._closed = trio.Event()
        self._reading = False
        self._taps: dict[int, Tap] = {}
        self._listeners: list[Tap] = []

    @property
    def alive(self) -> bool:
        return self._dead is None and self._stream is not None

    async def open(
        self,
        tasks: TaskSpawner,
        *,
        timeout: float = HELLO_TIMEOUT,
        stream: trio.SocketStream | None = None,
    ) -> None:
        """Connect (or use ``stream``) and say HELLO; returns when the agent has answered
        (the guest may still be booting: the HELLO waits in qemu's socket until the agent
        opens its port)."""
        deadline = trio.current_time() + timeout  # qemu makes its socket as it starts
        while stream is None:
            try:
                stream = await trio.open_unix_socket(self.socket_path)
            except OSError as exc:
                if trio.current_time() >= deadline:  # a socket left with nobody listening
                    raise GuestAgentError(
                        f"cannot connect to the guest agent at {self.socket_path} within "
                        f"{timeout:.0f} s: {exc.strerror or exc}"
                    ) from None
                await trio.sleep(0.01)
        self._stream = stream
        tasks.start_soon(self._read_loop)
        self._reading = True
        try:
            await self._hello()
            with trio.move_on_after(timeout):
                await self._ready.wait()
            if self._dead is not None:
                raise self._dead
            if not self._ready.is_set():
                raise GuestAgentError(f"the guest agent did not answer within {timeout:.0f} s")
        except BaseException:
            await self.aclose()  # qemu serves one client: a half-open one blocks the next
            raise

    async def aclose(self) -> None:
        self._die(GuestAgentError("the session with the guest agent was closed"))
        await self._close_stream()
        if self._reading:
            await self._closed.wait()

    async def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _hello(self) -> None:
        self._nonce = os.urandom(8).hex()
        await self._send(P.message(P.HELLO, 0, {"versions": [P.VERSION], "nonce": self._nonce}))

    # ------------------------------------------------------------ frames in

    async def _read_loop(self) -> None:
        reader = P.FrameReader()
        try:
            stream = self._stream
            if stream is None:
                return  # closed before this task first ran
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    raise GuestAgentError("the guest agent's channel closed (did the VM stop?)")
                reader.feed(data)
                for kind, sid, payload in reader.frames():
                    await self._on_frame(kind, sid, payload)
        except P.ProtocolError as exc:
            self._die(GuestAgentError(f"the guest agent sent something invalid: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._die(GuestAgentError(f"the guest agent's channel broke: {exc}"))
        except GuestAgentError as exc:
            self._die(exc)
        finally:
            await self._close_stream()  # a dead session lets go of qemu's one client slot
            self._closed.set()

    async def _on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == P.HELLO:
            hello = P.parse_message(payload)
            if hello.get("nonce") != self._nonce:
                return  # an answer to an earlier HELLO
            if hello.get("magic") != P.HELLO_MAGIC:
                raise P.ProtocolError("the HELLO answer is not from a lanekit agent")
            if "error" in hello:
                raise GuestAgentError(f"{hello['error']}: rebuild the guest runtime")
            self.guest_session = str(hello.get("session"))
            pid = hello.get("pid")
            self.agent_pid = pid if isinstance(pid, int) else None
            self.processes = [
                GuestProcess(int(p["stream"]), int(p["pid"]), tuple(p["argv"]), bool(p["exited"]))
                for p in hello.get("processes") or []  # type: ignore[attr-defined]
            ]
            self._ready.set()
            return
        if kind == P.ALIVE:
            if self._ready.is_set():
                self._ready = trio.Event()
                for lost in list(self._streams.values()):
                    lost.fail(GuestAgentError("the guest agent restarted; this call was lost"))
                self._streams.clear()
                self._taps.clear()
                for listener in self._listeners:
                    listener.deliver(kind, sid, payload)
                await self._hello()
            return
        tap = self._taps.get(sid)
        if tap is not None:
            tap.deliver(kind, sid, payload)
            return
        # Parsed before the stream is looked up: garbage is an error wherever it is sent.
        message = P.parse_message(payload) if kind in (P.REPLY, P.EVENT) else None
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream this session gave up on
        if kind == P.REPLY:
            assert message is not None
            with contextlib.suppress(trio.WouldBlock):
                stream.replies_in.send_nowait(message)
        elif kind == P.EVENT:
            stream.events_in.send_nowait(("event", message))
        elif kind == P.DATA:
            channel, offset, data = P.parse_data(payload)
            if channel == P.STDIN:
                raise P.ProtocolError("the guest sent data on stdin")
            have = stream.received[channel]
            if offset > have:
                stream.events_in.send_nowait(("gap", channel, offset - have))
            data = data[max(0, have - offset) :]
            stream.received[channel] = max(have, offset + len(data))
            if data:
                stream.events_in.send_nowait(("data", channel, data))
        elif kind == P.EOF:
            channel, _ = P.parse_eof(payload)
            stream.events_in.send_nowait(("eof", channel))
        elif kind == P.WINDOW:
            channel, consumed, window = P.parse_window(payload)
            if channel == P.STDIN:
                stream.stdin_limit = max(stream.stdin_limit, consumed + window)
                stream.stdin_room.set()
        else:
            raise P.ProtocolError(f"the guest sent a frame of kind {kind}")

    def _die(self, error: BaseException) -> None:
        if self._dead is None:
            self._dead = error
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()
        self._taps.clear()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.lost(error)
        self._ready.set()

    # ------------------------------------------------------------ frames out

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            stream = self._stream  # closed, maybe, while this waited for the lock
            if stream is None:
                raise self._dead or GuestAgentError("not connected to the guest agent")
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                error = GuestAgentError(f"the guest agent's channel broke: {exc}")
                self._die(error)
                raise error from None

    def _new_stream(self, sid: int | None = None) -> _Stream:
        while sid is None:
            candidate = self._next_sid
            self._next_sid = self._next_sid % ((1 << 31) - 1) + 1
            if candidate not in self._taps:  # a relayed client's stream
                sid = candidate
        stream = _Stream(sid, self.window)
        self._streams[sid] = stream
        return stream

    async def _ready_or_raise(self) -> None:
        await self._ready.wait()
        if self._dead is not None:
            raise self._dead

    # ------------------------------------------------------------ relaying

    async def wait_ready(self) -> None:
        """Until the agent has answered this session's HELLO (again, after a restart)."""
        await self._ready_or_raise()

    def listen(self, listener: Tap) -> None:
        """Tell ``listener`` of agent restarts (ALIVE) and of the session's end."""
        if self._dead is not None:
            listener.lost(self._dead)
        else:
            self._listeners.append(listener)

    def unlisten(self, listener: Tap) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def in_use(self, sid: int) -> bool:
        """Whether a stream id is this session's own or already tapped."""
        return sid in self._streams or sid in self._taps

    def tap(self, sid: int, tap: Tap) -> None:
        """Hand the guest's frames of stream ``sid`` to ``tap`` from now on."""
        self._taps[sid] = tap

    def untap(self, sid: int, tap: Tap) -> None:
        if self._taps.get(sid) is tap:
            del self._taps[sid]

    async def send_frame(self, data: bytes) -> None:
        """Send an already framed message to the guest (a relay's client's frame)."""
        await self._send(data)

    async def _start(self, op: str, args: Mapping[str, Any], sid: int | None = None) -> _Stream:
        """Send a CALL on a new (or given) stream and wait for its first reply."""
        await self._ready_or_raise()
        for _ in range(8):
            stream = self._new_stream(sid)
            await self._send(P.message(P.CALL, stream.sid, {"op": op, **args}))
            reply = await stream.replies.receive()
            error = reply.get("error")
            if error is None:
                stream.first_reply = reply.get("ok")
                return stream
            self._streams.pop(stream.sid, None)
            if stream.error is not None:
                raise stream.error
            if error.get("kind") == "busy" and sid is None:
                continue  # the id is taken by a process of an earlier session
            raise guest_os_error(str(args.get("path", "")), error)
        raise GuestAgentError("no free stream id in the guest agent")

    async def call(self, op: str, **args: Any) -> Any:
        """A one-shot operation (stat, listdir, mkdir, ...); its reply's value."""
        stream = await self._start(op, args)
        self._streams.pop(stream.sid, None)
        return stream.first_reply

    # ------------------------------------------------------------ processes

    async def spawn(
        self,
        argv: Iterable[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        stdin: str = "pipe",
        timeout: float | None = None,
    ) -> ExecHandle:
        args = {
            "argv": list(argv), "env": dict(env), "cwd": cwd, "user": user, "tty": tty,
            "rows": rows, "cols": cols, "stdin": stdin, "timeout": timeout,
            "window": self.window,
        }  # fmt: skip
        stream = await self._start("spawn", args)
        started = stream.first_reply
        stream.stdin_limit = int(started.get("window") or 0)
        return ExecHandle(self, stream, int(started["pid"]), tty)

    async def attach(self, sid: int, offsets: Mapping[str, int] | None = None) -> ExecHandle:
        """A process started by an earlier session. ``offsets`` ({"stdout": n, "stderr":
        m}): how much of each the caller already has; output resumes there (by default,
        from the oldest output the guest still keeps: what no session acknowledged)."""
        wanted = {str(CHANNEL_NUMBERS[k]): int(v) for k, v in (offsets or {}).items()}
        stream = await self._start("attach", {"window": self.window, "offsets": wanted}, sid=sid)
        info = stream.first_reply
        for key, offset in (info.get("from") or {}).items():
            stream.received[int(key)] = stream.consumed[int(key)] = int(offset)
            stream.announced[int(key)] = int(offset)
        stream.stdin_sent = int(info.get("stdin_offset") or 0)
        return ExecHandle(self, stream, int(info["pid"]), False)

    async def _consumed(self, stream: _Stream, channel: int, n: int) -> None:
        stream.consumed[channel] += n
        if stream.consumed[channel] - stream.announced[channel] >= stream.window // 2:
            stream.announced[channel] = stream.consumed[channel]
            await self._send(
                P.window_frame(stream.sid, channel, stream.consumed[channel], stream.window)
            )

    async def _control(self, stream: _Stream, op: str, **args: Any) -> None:
        if stream.error is not None:
            raise stream.error
        await self._send(P.message(P.CONTROL, stream.sid, {"op": op, **args}))

    async def _write_stdin(self, stream: _Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while stream.stdin_limit <= stream.stdin_sent and not stream.ended:
                if stream.error is not None:
                    raise stream.error
                stream.stdin_room = trio.Event()
                if stream.stdin_limit <= stream.stdin_sent:
                    await stream.stdin_room.wait()
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                raise BrokenPipeError(errno.EPIPE, "the command has exited: its stdin is closed")
            n = min(len(view), stream.stdin_limit - stream.stdin_sent, P.DATA_CHUNK)
            await self._send(P.data_frame(stream.sid, P.STDIN, stream.stdin_sent, view[:n]))
            stream.stdin_sent += n
            view = view[n:]

    async def _close_stdin(self, stream: _Stream) -> None:
        if stream.error is None and not stream.ended:
            await self._send(P.eof_frame(stream.sid, P.STDIN, stream.stdin_sent))

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.sid, None)

    # ------------------------------------------------------------ files

    async def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's content as it streams from the guest (use with ``aclosing``)."""
        stream = await self._start("read", {"path": path, "window": self.window})
        finished = False
        try:
            while True:
                item = await stream.events.receive()
                if item[0] == "data":
                    await self._consumed(stream, item[1], len(item[2]))
                    yield item[2]
                elif item[0] == "eof":
                    finished = True
                    return
                elif item[0] == "error":
                    raise item[1]
                elif item[0] == "gap":
                    raise GuestAgentError(f"{path}: the guest dropped {item[2]} bytes")
        finally:
            self._forget(stream)
            if not finished and stream.error is None:
                with trio.CancelScope(shield=True), contextlib.suppress(GuestAgentError):
                    await self._send(P.message(P.CONTROL, stream.sid, {"op": "close"}))

    async def write_file(
        self, path: str, chunks: Iterable[bytes] | AsyncIterator[bytes], **options: Any
    ) -> int:
        """Stream ``chunks`` into a guest file (created, truncated, appended or exclusive:
        see ``guest_files.open_for_write``); returns the bytes written, once fsynced."""
        if isinstance(chunks, bytes | bytearray | memoryview):
            chunks = [bytes(chunks)]
        stream = await self._start("write", {"path": path, "window": self.window, **options})
        stream.stdin_limit = int(stream.first_reply["window"])
        done = False
        try:
            if isinstance(chunks, AsyncIterator):
                async for chunk in chunks:
                    await self._write_stdin(stream, chunk)
            else:
                for chunk in chunks:
                    await self._write_stdin(stream, chunk)
            await self._close_stdin(stream)
            done = True
            while True:
                item = await stream.events.receive()
                if item[0] == "error":
                    raise item[1]
                if item[0] == "event":
                    event = item[1]
                    if event.get("event") == "closed":
                        return int(event["size"])
                    raise OSError(errno.EIO, str(event.get("message")), path)
        finally:
            self._forget(stream)
            if not done and stream.error is None:
                with trio.CancelScope(shield=True), contextlib.suppress(GuestAgentError):
                    await self._send(P.message(P.CONTROL, stream.sid, {"op": "close"}))


class ExecStdin:
    """A running command's stdin: ``await write(data)``, ``await close()``."""

    def __init__(self, session: AgentSession, stream: _Stream) -> None:
        self._session = session
        self._stream = stream
        self.closed = False

    async def write(self, data: bytes | str) -> None:
        if self.closed:
            raise GuestAgentError("stdin is closed")
        await self._session._write_stdin(
            self._stream, data.encode() if isinstance(data, str) else data
        )

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._session._close_stdin(self._stream)


class ExecHandle:
    """A command running in the guest: iterate it for events, or ``wait()``/``collect()``.

    Output not consumed holds the command back (it blocks in its write), so a caller that
    only wants the exit status calls ``wait()``, which reads and discards the output.
    """

    def __init__(self, session: AgentSession, stream: _Stream, pid: int, tty: bool) -> None:
        self._session = session
        self._stream = stream
        self.pid = pid
        self.tty = tty
        self.stream_id = stream.sid
        self.stdin = ExecStdin(session, stream)
        self.exit: ExecEvent | None = None
        self.lost_bytes = 0
        self._eofs: set[int] = set()

    def __aiter__(self) -> ExecHandle:
        return self

    async def __anext__(self) -> ExecEvent:
        if self.exit is not None:
            raise StopAsyncIteration
        while True:
            item = await self._stream.events.receive()
            tag = item[0]
            if tag == "data":
                await self._session._consumed(self._stream, item[1], len(item[2]))
                return ExecEvent("stdout" if item[1] == P.STDOUT else "stderr", item[2])
            if tag == "eof":
                self._eofs.add(item[1])
            elif tag == "gap":
                self.lost_bytes += item[2]
            elif tag == "error":
                raise item[1]
            elif tag == "event":
                event = item[1]
                if event.get("event") == "exited":
                    return await self._exited(event)
                if event.get("event") == "error":
                    raise GuestAgentError(str(event.get("message")))

    async def _exited(self, event: Mapping[str, Any]) -> ExecEvent:
        sig = event.get("signal")
        code = 128 + int(sig) if sig is not None else int(event.get("code") or 0)
        self.exit = ExecEvent(
            "exited", exit_code=code, signal=sig, timed_out=bool(event.get("timed_out"))
        )
        self._stream.ended = True
        self._stream.stdin_room.set()
        self._session._forget(self._stream)
        with contextlib.suppress(GuestAgentError):  # the guest may forget the process now
            await self._session._send(P.message(P.CONTROL, self._stream.sid, {"op": "release"}))
        return self.exit

    async def wait(self) -> ExecEvent:
        """Until the command exits (its output is read and discarded)."""
        async for _ in self:
            pass
        assert self.exit is not None
        return self.exit

    async def collect(self) -> tuple[ExecEvent, bytes, bytes]:
        """Until the command exits: (its exit event, all of stdout, all of stderr)."""
        out: list[bytes] = []
        err: list[bytes] = []
        async for event in self:
            if event.kind == "stdout":
                out.append(event.data)
            elif event.kind == "stderr":
                err.append(event.data)
        assert self.exit is not None
        return self.exit, b"".join(out), b"".join(err)

    async def signal(self, sig: int) -> None:
        """Send ``sig`` to the command's process group (a PTY's foreground group)."""
        if not 0 < int(sig) < 65:
            raise GuestAgentError(f"{sig} is not a signal number (1-64)")
        await self._session._control(self._stream, "signal", signal=int(sig))

    async def kill(self) -> None:
        """SIGKILL the command and everything it started (its cgroup)."""
        await self._session._control(self._stream, "kill")

    async def resize(self, rows: int, cols: int) -> None:
        if not self.tty:
            raise GuestAgentError("resize needs a command started with tty=True")
        if not (0 < rows <= 10000 and 0 < cols <= 10000):
            raise GuestAgentError(f"terminal size {rows}x{cols} is out of range")
        await self._session._control(self._stream, "resize", rows=rows, cols=cols)
