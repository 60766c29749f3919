"""What one NBD server lets its clients hold: bytes in flight, connections, handshake time.

Bytes in flight bound the server's memory: a request's data (a read's length, a write's
payload) counts from when the request is read until its reply has been sent, so a client that
stops reading replies stops being read once its share is used, and costs no more than that.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import trio

MiB = 1 << 20


@dataclass(frozen=True)
class NBDLimits:
    """Limits of one :class:`~blockstore.serve.NBDServer` (all its listeners together)."""

    max_request: int = 32 * MiB
    """Largest read or write, advertised to clients as the maximum block size."""
    max_in_flight: int = 64
    """Requests one connection may have under way at once."""
    connection_bytes: int = 32 * MiB
    """Bytes in flight per connection: what a client that stops reading replies can pin."""
    server_bytes: int = 256 * MiB
    """Bytes in flight over all connections."""
    max_connections: int = 16
    """Connections open at once (in handshake or transmission); more are refused."""
    handshake_timeout: float | None = 10.0
    """Seconds from accepting a connection to the end of option haggling; None: no limit.
    There is no idle timeout once transmission starts: an idle VM disk may sit for hours."""

    def __post_init__(self) -> None:
        if self.max_request < 1 or self.max_in_flight < 1 or self.max_connections < 1:
            raise ValueError("NBD limits: max_request, max_in_flight, max_connections must be >= 1")
        if self.connection_bytes < self.max_request:
            raise ValueError(
                f"NBD limits: connection_bytes ({self.connection_bytes}) must admit one request "
                f"of max_request ({self.max_request}) bytes"
            )
        if self.server_bytes < self.connection_bytes:
            raise ValueError(
                f"NBD limits: server_bytes ({self.server_bytes}) must be at least "
                f"connection_bytes ({self.connection_bytes})"
            )
        if self.handshake_timeout is not None and not self.handshake_timeout > 0:
            raise ValueError(
                f"NBD limits: handshake_timeout must be positive, not {self.handshake_timeout}"
            )


class ByteBudget:
    """Bytes that may be held at once, within a ``parent`` budget if given (a connection's
    share of the server's). Waiters are served first come, first served, so a big request
    is not starved by a stream of small ones."""

    def __init__(self, capacity: int, parent: ByteBudget | None = None) -> None:
        if parent is not None and parent.parent is not None:
            raise ValueError("budgets nest one level deep")
        self.capacity = capacity
        self.parent: ByteBudget | None = parent
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, trio.Event]] = collections.deque()

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes here and in the parent if they are free now. The fast path, run
        for every request: no coroutine, no scheduler round, few calls."""
        used = self.used + n
        if self._waiters or used > self.capacity:
            return n == 0
        parent = self.parent
        if parent is not None:
            parent_used = parent.used + n
            if parent._waiters or parent_used > parent.capacity:
                return n == 0
            parent.used = parent_used
            if parent_used > parent.peak:
                parent.peak = parent_used
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes here and in the parent, waiting until they are free; if
        cancelled, nothing is taken."""
        if n > self.capacity:
            raise ValueError(f"{n} bytes can never fit a budget of {self.capacity}")
        if self.try_acquire(n):
            return
        await self._acquire_here(n)
        if self.parent is not None:
            try:
                await self.parent.acquire(n)
            except BaseException:
                self._release_here(n)
                raise

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiters:
            self._grant()
        parent = self.parent
        if parent is not None:
            parent.used -= n
            if parent._waiters:
                parent._grant()

    async def _acquire_here(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.capacity:
            self._take(n)
            return
        entry = (n, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self._release_here(n)
            else:
                self._waiters.remove(entry)
                self._grant()
            raise

    def _release_here(self, n: int) -> None:
        self.used -= n
        if self._waiters:
            self._grant()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, event = self._waiters.popleft()
            self._take(n)
            event.set()
