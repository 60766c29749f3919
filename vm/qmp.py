"""A small QMP client (qemu's JSON control protocol on a unix socket), for trio code.

Every boot gets a QMP socket in its runtime directory (``qmp.sock``); a lane's supervisor
uses it to pause the guest and move its memory through qemu's migration stream. One
command at a time; events that arrive between replies are kept for :meth:`QMP.events`.
File descriptors go to qemu with ``getfd`` (SCM_RIGHTS on the socket), which is how an
``fd:`` migration gets its pipe.
"""

from __future__ import annotations

import array
import json
import socket
from pathlib import Path
from typing import Any

import trio

from .errors import VMError

GREETING_TIMEOUT = 10.0


class QMPError(VMError):
    """qemu refused a QMP command (``klass`` is qemu's error class), or the socket broke."""

    def __init__(self, message: str, klass: str = "") -> None:
        super().__init__(message)
        self.klass = klass


class QMP:
    """A QMP session: ``await QMP.connect(path)``, then :meth:`execute`."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = b""
        self._lock = trio.Lock()
        self.events: list[dict[str, Any]] = []
        self.version: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: Path | str, timeout: float = GREETING_TIMEOUT) -> QMP:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with trio.fail_after(timeout):
                while True:
                    try:
                        await sock.connect(str(path))
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        await trio.sleep(0.02)
                qmp = cls(sock)
                greeting = await qmp._message()
                qmp.version = greeting.get("QMP", {}).get("version", {})
                await qmp.execute("qmp_capabilities")
        except trio.TooSlowError:
            sock.close()
            raise QMPError(f"qemu's QMP socket {path} did not answer within {timeout:.0f} s")
        except BaseException:
            sock.close()
            raise
        return qmp

    def close(self) -> None:
        self._sock.close()

    async def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                data = await self._sock.recv(65536)
            except OSError as exc:
                raise QMPError(f"qemu's QMP socket broke: {exc}") from None
            if not data:
                raise QMPError("qemu closed its QMP socket (did it exit?)")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            value = json.loads(line)
        except ValueError:
            raise QMPError(f"qemu sent something that is not JSON: {line[:200]!r}") from None
        if not isinstance(value, dict):
            raise QMPError(f"qemu sent a QMP message that is not an object: {line[:200]!r}")
        return value

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, fd: int | None = None
    ) -> Any:
        """Run ``command``; its ``return`` value. ``fd`` travels with it (for ``getfd``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        async with self._lock:
            try:
                view = memoryview(data)
                if fd is not None:
                    fds = array.array("i", [fd]).tobytes()
                    sent = await self._sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                    )
                    view = view[sent:]
                while view:
                    view = view[await self._sock.send(view) :]
            except OSError as exc:
                raise QMPError(f"qemu's QMP socket broke: {exc}") from None
            while True:
                message = await self._message()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QMPError(
                        f"qemu refused {command}: {error.get('desc', error)}",
                        str(error.get("class", "")),
                    )
                return message.get("return")

    async def send_fd(self, fd: int, name: str) -> None:
        """Give qemu a file descriptor under ``name`` (``fd:NAME`` in a migration URI)."""
        await self.execute("getfd", {"fdname": name}, fd=fd)
