"""A client for qemu-guest-agent over the VM's virtio-serial port (a unix socket on the host).

The agent speaks QMP-style JSON lines, one request at a time. The channel can hold stale
bytes (a reply to a request whose caller timed out, or garbage from before the agent
started), so every exchange begins with ``guest-sync-delimited``: the agent answers it
after a 0xFF byte, which marks where a clean reply stream starts.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
from typing import Any

import trio

from vm.errors import GuestAgentError

_MAX_LINE = 64 << 20


class GuestAgent:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._ids = itertools.count(random.randrange(1 << 30))

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def _line(self) -> bytes:
        assert self._stream is not None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > _MAX_LINE:
                raise GuestAgentError("the guest agent sent an over-long reply")
            data = await self._stream.receive_some(1 << 20)
            if not data:
                raise GuestAgentError("the guest agent channel closed")
            self._buffer += data

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._stream is not None
        await self._stream.send_all(json.dumps(message).encode() + b"\n")

    async def _sync_reply(self) -> object:
        """The next line that parses as JSON, read past any 0xFF delimiter; its "return"."""
        while True:
            line = await self._line()
            line = line[line.rfind(b"\xff") + 1 :]
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict):
                return reply.get("return")

    async def _sync(self) -> None:
        """Resynchronise: send a sync, skip everything up to the 0xFF and the matching reply."""
        if self._stream is None:
            self._stream = await trio.open_unix_socket(self.socket_path)
        self._buffer.clear()
        token = await self._send_sync()
        while await self._sync_reply() != token:
            pass

    async def _send_sync(self) -> int:
        assert self._stream is not None
        token = next(self._ids) % (1 << 31)
        await self._stream.send_all(b"\xff")
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        return token

    async def wait_ready(self, interval: float = 0.01) -> None:
        """Until the agent answers (the caller bounds the total wait).

        Until the guest opens its port, what we send is dropped, so a sync is re-sent
        every ``interval`` on one connection; the first answer to any of them means the
        agent is up, and a final clean sync discards the answers still on their way.
        """
        while True:
            try:
                self._stream = await trio.open_unix_socket(self.socket_path)
                break
            except OSError:
                await trio.sleep(interval)
        async with self._lock:
            sent: set[int] = set()
            self._buffer.clear()
            answered = False
            while not answered:
                sent.add(await self._send_sync())
                with trio.move_on_after(interval):
                    while await self._sync_reply() not in sent:
                        pass
                    answered = True
            await self._sync()

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            try:
                if self._stream is None:
                    await self._sync()
                await self._send(message)
                while True:
                    reply = json.loads(await self._line())
                    if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                        break
            except BaseException:
                await self.aclose()  # the reply may still come: never reuse this stream
                raise
        if "error" in reply:
            error = reply["error"]
            raise GuestAgentError(f"{command}: {error.get('desc', error)}")
        return reply["return"]

    # ------------------------------------------------------------ helpers

    async def exec_start(
        self, path: str, args: list[str], env: list[str], stdin: bytes | None
    ) -> int:
        arguments: dict[str, Any] = {
            "path": path,
            "arg": args,
            "env": env,
            "capture-output": True,
        }
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        result = await self.call("guest-exec", arguments)
        return int(result["pid"])

    async def exec_status(self, pid: int) -> dict[str, Any]:
        status: dict[str, Any] = await self.call("guest-exec-status", {"pid": pid})
        for key in ("out-data", "err-data"):
            if key in status:
                status[key] = base64.b64decode(status[key])
        return status

    async def read_file(self, path: str, limit: int = 1 << 30) -> bytes:
        handle = await self.call("guest-file-open", {"path": path, "mode": "rb"})
        try:
            out = bytearray()
            while True:
                chunk = await self.call("guest-file-read", {"handle": handle, "count": 1 << 20})
                out += base64.b64decode(chunk.get("buf-b64", ""))
                if len(out) > limit:
                    raise GuestAgentError(f"{path} is larger than {limit} bytes")
                if chunk.get("eof") or not chunk.get("count"):
                    return bytes(out)
        finally:
            await self.call("guest-file-close", {"handle": handle})

    async def write_file(self, path: str, data: bytes) -> None:
        handle = await self.call("guest-file-open", {"path": path, "mode": "wb"})
        try:
            view = memoryview(data)
            for offset in range(0, len(data), 1 << 20):
                piece = bytes(view[offset : offset + (1 << 20)])
                await self.call(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(piece).decode()},
                )
            await self.call("guest-file-flush", {"handle": handle})
        finally:
            await self.call("guest-file-close", {"handle": handle})
