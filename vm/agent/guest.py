"""The lanekit guest agent: runs processes and moves files for the host, over one port.

It runs inside the guest under the runtime's own Python (started by the guest init with
``-S``; builtins, ``struct`` and its sibling modules only, so it starts in a quarter
of a second under TCG). One thread, one epoll loop: the virtio-serial port, every child's
pipes or PTY, a SIGCHLD wake-up pipe and the files being streamed.

Memory stays bounded whatever the peers do: a channel is read only while the host's
window has room, so a child that floods stdout blocks in its write(2) instead of growing
a buffer here; stdin beyond the window the agent announced is a protocol error.

The host may go away and come back (a virtio-serial port reads EOF and polls HUP while
no host is connected): processes keep running, their unacknowledged output is kept, and a
new session attaches to them by stream id and receives it again.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.py would import enum
import errno
import os
import select
import sys
import time

from . import guest_files as files
from . import guest_spawn as spawning
from . import protocol as P
from .guest_io import PORT_WRITE, Outbox, Retained

CGROUP_ROOT = "/sys/fs/cgroup/lanekit"
PORT_RETRY = 0.05
DRAIN_IDLE = 0.1
"""After a process exits, its pipes are read until EOF or until they have been silent this
long (a background child may hold them open for good)."""
OUT_HIGH = 2 << 20
LEAVE_AFTER = 0.05
"""Seconds the agent stays in the cgroup of a command it started (see spawning.leave)."""
TIDY_BACKLOG = 64
"""Ended commands' cgroups that wait for an empty outbox; past this many, they go anyway."""
READ_CHUNK = 256 << 10
PORT_READS = 256
MAX_RETIRED = 256
IN = select.EPOLLIN
OUT = select.EPOLLOUT


class OutChannel:
    """Bytes going to the host from ``fd`` (stdout, stderr, a file being read)."""

    def __init__(self, channel: int, fd: int, window: int) -> None:
        self.channel = channel
        self.fd = fd
        self.sent = 0
        self.consumed = 0
        self.limit = window
        self.retained = Retained()
        self.at_eof = False
        self.eof_sent = False
        self.last_data = time.monotonic()

    def room(self) -> int:
        return self.limit - self.sent


class InChannel:
    """Bytes from the host going to ``fd`` (a child's stdin, a file being written)."""

    def __init__(self, fd: int, window: int) -> None:
        self.fd = fd
        self.window = window
        self.received = 0
        self.written = 0
        self.announced = 0
        self.buffer = bytearray()
        self.eof_at: int | None = None
        self.broken = False
        self.error = ""


class Stream:
    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.outs: dict[int, OutChannel] = {}
        self.stdin: InChannel | None = None


class Proc(Stream):
    def __init__(self, sid: int, pid: int, argv: list[str], tty: int | None) -> None:
        super().__init__(sid)
        self.pid = pid
        self.argv = argv
        self.tty = tty
        self.status: int | None = None
        self.exited_at = 0.0
        self.deadline: float | None = None
        self.timed_out = False
        self.cgroup: str | None = None
        self.done = False


class FileRead(Stream):
    pass


class FileWrite(Stream):
    def __init__(self, sid: int, path: str) -> None:
        super().__init__(sid)
        self.path = path


class Agent:
    def __init__(self, port: int, socket_mode: bool = False) -> None:
        self.port = port
        self.socket_mode = socket_mode
        self.ep = select.epoll()
        self.masks: dict[int, int] = {}
        self.always: dict[int, int] = {}
        self.owners: dict[int, Stream] = {}
        self.streams: dict[int, Stream] = {}
        self.by_pid: dict[int, Proc] = {}
        self.retired: list[int] = []
        self.cgroups_left: list[str] = []
        self.spare_cgroup: str | None = None
        self.tidy = False
        """Cgroups to remove and a spare to make, once the exit that freed one is sent."""
        self.leave_at: float | None = None
        self.out = Outbox()
        self.reader = P.FrameReader()
        self.connected = True
        self.port_blocked = False
        self.retry_at: float | None = None
        self.session = os.urandom(8).hex()
        self.cgroups = not socket_mode and self._init_cgroups()
        os.set_blocking(port, False)
        os.set_inheritable(port, False)  # a child holding it would outlive our session
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake = wake_r
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
        self.want(wake_r, IN)
        self.send(P.frame(P.ALIVE, 0, P.pack({"session": self.session})))

    # ------------------------------------------------------------- plumbing

    @staticmethod
    def _init_cgroups() -> bool:
        try:
            os.makedirs(CGROUP_ROOT, exist_ok=True)
            return os.path.exists(CGROUP_ROOT + "/cgroup.procs")
        except OSError:
            return False

    def want(self, fd: int, mask: int) -> None:
        """Make ``fd``'s epoll interest ``mask`` (0: none). Regular files, which epoll
        refuses, are always ready: the loop serves them on every turn."""
        if fd in self.always:
            self.always[fd] = mask
            return
        current = self.masks.get(fd, 0)
        if current == mask:
            return
        if mask == 0:
            self.ep.unregister(fd)
            del self.masks[fd]
        elif current == 0:
            try:
                self.ep.register(fd, mask)
            except PermissionError:
                self.always[fd] = mask
                return
            self.masks[fd] = mask
        else:
            self.ep.modify(fd, mask)
            self.masks[fd] = mask

    def forget_fd(self, fd: int) -> None:
        if fd in self.masks:
            self.want(fd, 0)
        self.always.pop(fd, None)
        self.owners.pop(fd, None)
        try:
            os.close(fd)
        except OSError:
            pass

    def send(self, *pieces: bytes | memoryview) -> None:
        if self.connected:
            self.out.put(*pieces)

    def reply(self, sid: int, value: object) -> None:
        self.send(P.message(P.REPLY, sid, {"ok": value}))

    def fail(self, sid: int, kind: str, message: str) -> None:
        self.send(P.message(P.REPLY, sid, {"error": {"kind": kind, "message": message}}))

    def event(self, sid: int, value: dict[str, object]) -> None:
        self.send(P.message(P.EVENT, sid, value))

    # ------------------------------------------------------------- the loop

    def run(self) -> None:
        while True:
            self.update_interest()
            ready = [(fd, mask) for fd, mask in self.always.items() if mask]
            events = self.ep.poll(0 if ready else self.next_timeout()) + ready
            for fd, mask in events:
                if fd == self.port:
                    self.on_port(mask)
                elif fd == self.wake:
                    self.on_wake()
                else:
                    owner = self.owners.get(fd)
                    if owner is not None:
                        self.on_stream_fd(owner, fd, mask)
            self.on_timers()
            if self.out and not self.port_blocked and self.connected and self.retry_at is None:
                self.flush_port()  # now: waiting for the port's EPOLLOUT costs a turn
            if self.tidy and (not self.out or len(self.cgroups_left) > TIDY_BACKLOG):
                self.tidy_cgroups()

    def next_timeout(self) -> float:
        now = time.monotonic()
        soon = now + 5.0
        for at in (self.retry_at, self.leave_at):
            if at is not None:
                soon = min(soon, at)
        for s in self.streams.values():
            if isinstance(s, Proc):
                if s.deadline is not None and not s.timed_out:
                    soon = min(soon, s.deadline)
                if s.status is not None and not s.done:
                    soon = min(soon, now + DRAIN_IDLE / 2)
        return max(0.0, soon - now)

    def update_interest(self) -> None:
        if self.connected and self.retry_at is None:
            self.want(self.port, IN | (OUT if self.out else 0))
        busy = self.out.size > OUT_HIGH or not self.connected
        wanted: dict[int, int] = {}
        for s in self.streams.values():
            for ch in s.outs.values():
                if not ch.at_eof:
                    readable = not busy and ch.room() > 0
                    wanted[ch.fd] = wanted.get(ch.fd, 0) | (IN if readable else 0)
            inc = s.stdin
            if inc is not None and not inc.broken and inc.fd >= 0:
                wanted[inc.fd] = wanted.get(inc.fd, 0) | (OUT if inc.buffer else 0)
        for fd, mask in wanted.items():
            self.want(fd, mask)

    def on_stream_fd(self, stream: Stream, fd: int, mask: int) -> None:
        if mask & OUT:
            self.write_in(stream)
        if mask & (IN | select.EPOLLHUP | select.EPOLLERR):
            for out in stream.outs.values():
                if out.fd == fd:
                    self.read_out(stream, out)

    # ------------------------------------------------------------- the port

    def on_port(self, mask: int) -> None:
        if mask & select.EPOLLIN:
            # A virtio-serial read returns one guest buffer (a page): read on until the
            # port is drained, then parse, rather than a turn of the loop per page.
            got = False
            for _ in range(PORT_READS):
                try:
                    data = os.read(self.port, 1 << 20)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self.disconnected()
                    return
                self.reader.feed(data)
                got = True
            if got:
                self.dispatch_frames()
        elif mask & (select.EPOLLHUP | select.EPOLLERR):
            self.disconnected()
            return
        if mask & OUT:
            self.port_blocked = False
            if self.out:
                self.flush_port()

    def flush_port(self) -> None:
        """Write queued frames until the port would block."""
        try:
            self.out.write_to(self.port)
        except BlockingIOError:
            self.port_blocked = True
        except OSError:
            self.disconnected()

    def disconnected(self) -> None:
        if self.socket_mode:
            sys.exit(0)
        self.connected = False
        self.port_blocked = False
        self.out.clear()
        self.reader.reset()
        self.want(self.port, 0)
        self.retry_at = time.monotonic() + PORT_RETRY
        for sid in [sid for sid, s in self.streams.items() if not isinstance(s, Proc)]:
            self.close_stream(sid)

    def dispatch_frames(self) -> None:
        while True:
            try:
                frames = self.reader.frames()
            except P.ProtocolError as exc:
                self.reader.resync()
                print(f"lanekit-agent: {exc}; waiting for a new session", file=sys.stderr)
                continue
            if not frames:
                return
            for kind, sid, payload in frames:
                try:
                    self.on_frame(kind, sid, payload)
                except P.ProtocolError as exc:
                    self.event(sid, {"event": "error", "message": f"protocol error: {exc}"})

    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == P.HELLO:
            self.on_hello(sid, P.parse_message(payload))
        elif kind == P.CALL:
            self.on_call(sid, P.parse_message(payload))
        elif kind == P.CONTROL:
            self.on_control(sid, P.parse_message(payload))
        elif kind == P.DATA:
            self.on_data(sid, *P.parse_data(payload))
        elif kind == P.WINDOW:
            self.on_window(sid, *P.parse_window(payload))
        elif kind == P.EOF:
            self.on_eof(sid, *P.parse_eof(payload))

    def on_hello(self, sid: int, hello: dict[str, object]) -> None:
        versions = hello.get("versions")
        ok = isinstance(versions, list) and P.VERSION in versions
        running = []
        for s in self.streams.values():
            if isinstance(s, Proc):
                running.append(
                    {"stream": s.sid, "pid": s.pid, "argv": s.argv, "exited": s.status is not None}
                )
        answer: dict[str, object] = {
            "magic": P.HELLO_MAGIC,
            "version": P.VERSION,
            "nonce": hello.get("nonce"),
            "session": self.session,
            "processes": running,
            "pid": os.getpid(),
        }
        if not ok:
            answer["error"] = f"the guest agent speaks protocol {P.VERSION}, not {versions}"
        for s in list(self.streams.values()):
            if not isinstance(s, Proc):
                self.close_stream(s.sid)
        self.send(P.message(P.HELLO, sid, answer))

    def on_timers(self) -> None:
        now = time.monotonic()
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self.connected = True
            self.want(self.port, IN)
        if self.leave_at is not None and now >= self.leave_at:
            self.leave_at = None
            spawning.leave()
        for s in list(self.streams.values()):
            if not isinstance(s, Proc):
                continue
            if s.deadline is not None and not s.timed_out and now >= s.deadline:
                s.timed_out = True
                self.kill_tree(s)
            if s.status is not None and not s.done:
                self.maybe_finish(s, now)

    # ------------------------------------------------------------- calls

    def on_call(self, sid: int, call: dict[str, object]) -> None:
        op = call.get("op")
        if sid in self.streams and op != "attach":
            self.fail(sid, "busy", f"stream {sid} is in use")
            return
        try:
            if op == "spawn":
                self.spawn(sid, call)
            elif op == "attach":
                self.attach(sid, call)
            elif op == "read":
                self.start_read(sid, call)
            elif op == "write":
                self.start_write(sid, call)
            elif op == "sync":
                os.sync()
                self.reply(sid, None)
            elif op == "set_time":  # after a resume: the clock stood still while paused
                time.clock_settime(time.CLOCK_REALTIME, float(call["seconds"]))  # type: ignore[arg-type]
                self.reply(sid, None)
            elif op == "ping":
                self.reply(sid, {"uptime": _uptime()})
            elif op == "poweroff":
                self.reply(sid, None)
                self.flush_all()
                os.execv("/lanekit/poweroff", ["/lanekit/poweroff"])
            elif isinstance(op, str) and op in files.OPERATIONS:
                self.reply(sid, files.OPERATIONS[op](call))
            else:
                self.fail(sid, "unsupported", f"unknown operation {op!r}")
        except files.Refused as exc:
            self.fail(sid, "refused", str(exc))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            self.fail(sid, name, exc.strerror or str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            self.fail(sid, "invalid", f"invalid arguments for {op}: {exc}")

    def flush_all(self) -> None:
        try:
            self.out.drain_blocking(self.port)
        except OSError:
            pass

    def on_control(self, sid: int, control: dict[str, object]) -> None:
        stream = self.streams.get(sid)
        op = control.get("op")
        if op == "release":
            if isinstance(stream, Proc) and stream.done:
                self.drop(stream)
            return
        if op == "close":
            if stream is not None and not isinstance(stream, Proc):
                self.close_stream(sid)
            return
        if not isinstance(stream, Proc) or stream.status is not None:
            return
        if op == "signal":
            sig = control.get("signal")
            if isinstance(sig, int) and 0 < sig < 65:
                target = stream.pid
                if stream.tty is not None:
                    try:
                        target = os.tcgetpgrp(stream.tty)
                    except OSError:
                        pass
                try:
                    os.killpg(target, sig)
                except OSError:
                    pass
        elif op == "kill":
            self.kill_tree(stream)
        elif op == "resize" and stream.tty is not None:
            rows, cols = control.get("rows"), control.get("cols")
            if isinstance(rows, int) and isinstance(cols, int):
                spawning.set_size(stream.tty, rows, cols)

    # ------------------------------------------------------------- processes

    def spawn(self, sid: int, call: dict[str, object]) -> None:
        argv = call.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise files.Refused("argv must be a non-empty list of text")
        env = call.get("env") or {}
        if not isinstance(env, dict):
            raise files.Refused("env must be a dict")
        try:
            user = spawning.resolve_user(call.get("user"))
        except spawning.Refused as exc:
            raise files.Refused(str(exc)) from None
        window = int(call.get("window") or P.DEFAULT_WINDOW)  # type: ignore[call-overload]
        size = None
        if call.get("tty"):
            size = (int(call.get("rows") or 24), int(call.get("cols") or 80))  # type: ignore[call-overload]
        cgroup, self.spare_cgroup = self.spare_cgroup or self.new_cgroup(), None
        try:
            started = spawning.start(
                argv,
                {str(k): str(v) for k, v in env.items()},
                str(call.get("cwd") or "/"),
                user,
                size,
                call.get("stdin", "pipe") != "none",
                cgroup,
            )
        except BaseException:
            self.retire_cgroup(cgroup)
            raise
        if started.cgroup is None:
            self.retire_cgroup(cgroup)  # not entered: the command is not in it
        else:
            self.leave_at = time.monotonic() + LEAVE_AFTER
        proc = Proc(sid, started.pid, argv, started.tty)
        proc.cgroup = started.cgroup
        timeout = call.get("timeout")
        if isinstance(timeout, int | float) and timeout > 0:
            proc.deadline = time.monotonic() + float(timeout)
        for ch, fd in started.outs.items():
            os.set_blocking(fd, False)
            proc.outs[ch] = OutChannel(ch, fd, window)
            self.owners[fd] = proc
        if started.stdin >= 0:
            os.set_blocking(started.stdin, False)
            proc.stdin = InChannel(started.stdin, window)
            self.owners[started.stdin] = proc
        self.streams[sid] = proc
        self.by_pid[started.pid] = proc
        self.reply(sid, {"pid": started.pid, "window": window if started.stdin >= 0 else 0})

    def attach(self, sid: int, call: dict[str, object]) -> None:
        proc = self.streams.get(sid)
        if not isinstance(proc, Proc):
            raise files.Refused(f"no process on stream {sid}")
        offsets = call.get("offsets") or {}
        if not isinstance(offsets, dict):
            raise files.Refused("offsets must be a dict")
        window = int(call.get("window") or P.DEFAULT_WINDOW)  # type: ignore[call-overload]
        start: dict[str, object] = {}
        for ch, out in proc.outs.items():
            wanted = offsets.get(str(ch), 0)
            begin = max(int(wanted), out.consumed)
            begin = min(begin, out.sent)
            start[str(ch)] = begin
            out.consumed = begin
            out.retained.consumed(begin)
        stdin = proc.stdin
        self.reply(
            sid,
            {
                "pid": proc.pid,
                "from": start,
                "stdin_offset": stdin.received if stdin else 0,
                "exited": proc.status is not None,
            },
        )
        for out in proc.outs.values():
            out.limit = out.consumed + window
            offset = out.consumed
            for piece in out.retained.pieces():
                self.send(*P.data_frame_parts(sid, out.channel, offset, piece))
                offset += len(piece)
            if out.eof_sent:
                self.send(P.eof_frame(sid, out.channel, out.sent))
        if stdin is not None:
            self.send(P.window_frame(sid, P.STDIN, stdin.written, stdin.window))
        if proc.done:
            self.send_exit(proc)

    def read_out(self, stream: Stream, out: OutChannel) -> None:
        """Read what the window allows, until the fd is drained."""
        for _ in range(8):
            if not self._read_once(stream, out):
                return

    def _read_once(self, stream: Stream, out: OutChannel) -> bool:
        room = out.room()
        if room <= 0 or out.at_eof or self.out.size > OUT_HIGH:
            return False
        try:
            data = os.read(out.fd, min(room, READ_CHUNK))
        except BlockingIOError:
            return False
        except OSError:  # EIO: the PTY's other side is closed
            data = b""
        if not data:
            out.at_eof = True
            self.want(out.fd, 0)
            out.eof_sent = True
            self.send(P.eof_frame(stream.sid, out.channel, out.sent))
            if isinstance(stream, FileRead):
                self.close_stream(stream.sid)
            return False
        out.retained.add(data)
        self.send(*P.data_frame_parts(stream.sid, out.channel, out.sent, data))
        out.sent += len(data)
        out.last_data = time.monotonic()
        if self.out.size >= PORT_WRITE:
            self.flush_port()  # now, rather than on the next turn of the loop
        return len(data) == READ_CHUNK

    def write_in(self, stream: Stream) -> None:
        inc = stream.stdin
        if inc is None or not inc.buffer or inc.fd < 0:
            return
        try:
            n = os.write(inc.fd, inc.buffer[: 1 << 16])
        except BlockingIOError:
            return
        except OSError as exc:
            inc.broken = True  # the reader is gone (or the disk full): what comes is discarded
            inc.error = exc.strerror or str(exc)
            n = len(inc.buffer)
            self.want(inc.fd, 0)
        del inc.buffer[:n]
        inc.written += n
        self.stdin_progress(stream, inc)

    def stdin_progress(self, stream: Stream, inc: InChannel) -> None:
        if inc.written - inc.announced >= inc.window // 2 or not inc.buffer:
            inc.announced = inc.written
            self.send(P.window_frame(stream.sid, P.STDIN, inc.written, inc.window))
        if inc.eof_at is not None and inc.written >= inc.eof_at and inc.fd >= 0:
            self.finish_in(stream, inc)

    def finish_in(self, stream: Stream, inc: InChannel) -> None:
        if isinstance(stream, FileWrite):
            self.finish_write(stream, inc)
            return
        if isinstance(stream, Proc) and stream.tty is not None:
            os.write(inc.fd, b"\x04")  # ^D: a terminal has no other end-of-file
            inc.fd = -1
            return
        self.forget_fd(inc.fd)
        inc.fd = -1

    def on_data(self, sid: int, channel: int, offset: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        inc = stream.stdin if stream is not None else None
        if inc is None or channel != P.STDIN:
            return  # a stream that ended meanwhile
        if offset > inc.received:
            raise P.ProtocolError(f"stdin of stream {sid} skips from {inc.received} to {offset}")
        data = data[inc.received - offset :]
        if inc.received + len(data) > inc.written + inc.window:
            raise P.ProtocolError(f"stdin of stream {sid} overruns its window")
        inc.received += len(data)
        if inc.broken or inc.fd < 0:
            inc.written = inc.received
            self.stdin_progress(stream, inc)  # type: ignore[arg-type]
            return
        inc.buffer += data
        self.write_in(stream)  # type: ignore[arg-type]

    def on_eof(self, sid: int, channel: int, offset: int) -> None:
        stream = self.streams.get(sid)
        inc = stream.stdin if stream is not None else None
        if inc is None or channel != P.STDIN or inc.eof_at is not None:
            return
        inc.eof_at = offset
        if inc.written >= offset:
            self.finish_in(stream, inc)  # type: ignore[arg-type]

    def on_window(self, sid: int, channel: int, consumed: int, window: int) -> None:
        stream = self.streams.get(sid)
        out = stream.outs.get(channel) if stream is not None else None
        if out is None:
            return
        consumed = min(max(consumed, out.consumed), out.sent)
        out.retained.consumed(consumed)
        out.consumed = consumed
        out.limit = consumed + window

    def on_wake(self) -> None:
        try:
            while os.read(self.wake, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is not None:
                proc.status = status
                proc.exited_at = time.monotonic()

    def maybe_finish(self, proc: Proc, now: float) -> None:
        if not self.connected:
            return  # what is still in the pipes goes to the next session
        for out in proc.outs.values():
            if out.at_eof:
                continue
            self.read_out(proc, out)
            if out.at_eof:
                continue
            idle = now - max(out.last_data, proc.exited_at)
            if idle < DRAIN_IDLE or (out.room() <= 0 and self.connected):
                return
            out.at_eof = True
            out.eof_sent = True
            self.send(P.eof_frame(proc.sid, out.channel, out.sent))
        proc.done = True
        self.close_fds(proc)
        self.retire_cgroup(proc.cgroup)
        proc.cgroup = None
        self.send_exit(proc)

    def send_exit(self, proc: Proc) -> None:
        status = proc.status or 0
        if os.WIFSIGNALED(status):
            code, sig = None, os.WTERMSIG(status)
        else:
            code, sig = os.WEXITSTATUS(status), None
        self.event(
            proc.sid,
            {"event": "exited", "code": code, "signal": sig, "timed_out": proc.timed_out},
        )

    def kill_tree(self, proc: Proc) -> None:
        if proc.cgroup is not None and spawning.leave(proc.cgroup):
            try:
                with open(proc.cgroup + "/cgroup.kill", "w") as f:
                    f.write("1")
                return
            except OSError:
                pass
        try:
            os.killpg(proc.pid, _signal.SIGKILL)
        except OSError:
            pass

    def new_cgroup(self) -> str | None:
        if not self.cgroups:
            return None
        path = f"{CGROUP_ROOT}/c{os.urandom(6).hex()}"
        try:
            os.mkdir(path)
        except OSError:
            return None
        return path

    def retire_cgroup(self, path: str | None) -> None:
        if path is not None:
            self.cgroups_left.append(path)
            self.tidy = True

    def tidy_cgroups(self) -> None:
        """Off the round trip: remove the cgroups of ended commands (those with processes
        left are kept for a later try), and make the next command's ahead."""
        self.tidy = False
        left = []
        for path in self.cgroups_left:
            try:
                spawning.leave(path)
                os.rmdir(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    left.append(path)
        self.cgroups_left = left[-1000:]
        if spawning.inside() is None:
            self.leave_at = None
        if self.spare_cgroup is None:
            self.spare_cgroup = self.new_cgroup()

    def drop(self, proc: Proc) -> None:
        self.streams.pop(proc.sid, None)

    # ------------------------------------------------------------- files

    def start_read(self, sid: int, call: dict[str, object]) -> None:
        fd, size = files.open_for_read(call)
        os.set_blocking(fd, False)
        stream = FileRead(sid)
        window = int(call.get("window") or P.DEFAULT_WINDOW)  # type: ignore[call-overload]
        stream.outs[P.STDOUT] = OutChannel(P.STDOUT, fd, window)
        self.owners[fd] = stream
        self.streams[sid] = stream
        self.reply(sid, {"size": size})
        # Read now: epoll would wait for a writer on a FIFO that never had one.
        self.read_out(stream, stream.outs[P.STDOUT])

    def start_write(self, sid: int, call: dict[str, object]) -> None:
        fd = files.open_for_write(call)
        stream = FileWrite(sid, files.absolute(call))
        window = int(call.get("window") or P.DEFAULT_WINDOW)  # type: ignore[call-overload]
        stream.stdin = InChannel(fd, window)
        self.owners[fd] = stream
        self.streams[sid] = stream
        self.reply(sid, {"window": window})

    def finish_write(self, stream: FileWrite, inc: InChannel) -> None:
        try:
            if inc.broken:
                raise OSError(errno.EIO, inc.error or "a write to the file failed")
            os.fsync(inc.fd)
            result: dict[str, object] = {"event": "closed", "size": inc.written}
        except OSError as exc:
            result = {"event": "error", "message": f"{stream.path}: {exc.strerror or exc}"}
        self.forget_fd(inc.fd)
        inc.fd = -1
        self.streams.pop(stream.sid, None)
        self.event(stream.sid, result)

    def close_stream(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self.close_fds(stream)

    def close_fds(self, stream: Stream) -> None:
        """Close a stream's fds once each (a PTY's one fd serves two channels)."""
        fds = {out.fd for out in stream.outs.values() if out.fd >= 0}
        if stream.stdin is not None and stream.stdin.fd >= 0:
            fds.add(stream.stdin.fd)
            stream.stdin.fd = -1
        for out in stream.outs.values():
            out.fd = -1
            out.at_eof = True
        for fd in fds:
            self.forget_fd(fd)


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main(argv: list[str]) -> None:
    """``agent PORT`` (a device path) or ``agent --fd N`` (a socket, for host tests)."""
    if len(argv) == 2 and argv[0] == "--fd":
        Agent(int(argv[1]), socket_mode=True).run()
        return
    if len(argv) != 1:
        print("usage: agent PORT | agent --fd FD", file=sys.stderr)
        sys.exit(2)
    fd = os.open(argv[0], os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    Agent(fd).run()


if __name__ == "__main__":
    main(sys.argv[1:])
