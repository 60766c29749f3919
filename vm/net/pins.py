"""DNS pins: which addresses this sandbox's DNS answered for which names, and until when.

Host names in rules and policies are trusted only through pins: a flow to an address is
"to api.example.com" only if this sandbox asked for api.example.com and was answered with
that address. A pin lasts at least as long as the answer's TTL, and at least
:data:`MIN_PIN_SECONDS` (clients cache answers longer than they are told to).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

MIN_PIN_SECONDS = 300.0
MAX_PINS = 65536


class Pins:
    def __init__(
        self, min_seconds: float = MIN_PIN_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._min = min_seconds
        self._clock = clock
        self._by_ip: dict[str, dict[str, float]] = {}

    def add(self, names: Iterable[str], ips: Iterable[str], ttl: float) -> None:
        expires = self._clock() + max(float(ttl), self._min)
        for ip in ips:
            entry = self._by_ip.setdefault(ip, {})
            for name in names:
                entry[name] = max(entry.get(name, 0.0), expires)
        if len(self._by_ip) > MAX_PINS:
            self._expire()

    def names_for(self, ip: str) -> tuple[str, ...]:
        """The names ``ip`` is pinned to now, sorted."""
        entry = self._by_ip.get(ip)
        if not entry:
            return ()
        now = self._clock()
        return tuple(sorted(name for name, expires in entry.items() if expires > now))

    def is_pinned(self, name: str, ip: str) -> bool:
        return name in self.names_for(ip)

    def snapshot(self) -> dict[str, list[str]]:
        """Every live pin, as name -> addresses."""
        now = self._clock()
        out: dict[str, list[str]] = {}
        for ip, entry in self._by_ip.items():
            for name, expires in entry.items():
                if expires > now:
                    out.setdefault(name, []).append(ip)
        return {name: sorted(ips) for name, ips in sorted(out.items())}

    def _expire(self) -> None:
        now = self._clock()
        for ip in list(self._by_ip):
            entry = {n: e for n, e in self._by_ip[ip].items() if e > now}
            if entry:
                self._by_ip[ip] = entry
            else:
                del self._by_ip[ip]
