"""A TCP proxy that holds every byte back a fixed time in each direction: the loopback S3
server made to answer like one some milliseconds away (these machines have no netem).

Bytes keep their order and are never merged or split beyond what TCP does anyway; only
their delivery waits, so a request costs the added round trip, not less, not more.
"""

from __future__ import annotations

import contextlib
import math
import threading
from types import TracebackType

import trio


class DelayProxy:
    """Listens on 127.0.0.1:``port`` (chosen at start) and forwards to ``target_port``."""

    def __init__(self, target_port: int, one_way: float) -> None:
        self.target_port = target_port
        self.one_way = one_way
        self.port = 0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(30) or not self.port:
            raise RuntimeError("the delay proxy did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(30)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._cancel:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            self._ready.set()
            await trio.serve_listeners(self._handle, listeners)
        self._ready.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Forward ``source`` to ``sink``, each chunk ``one_way`` seconds after it came."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def deliver() -> None:
            async for due, data in receive:
                await trio.sleep_until(due)
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sink.send_eof()
                    return
                await sink.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            while True:
                data = await source.receive_some(1 << 16)
                send.send_nowait((trio.current_time() + self.one_way, data))
                if not data:
                    break
