"""DNS pins: which addresses this sandbox's DNS answered for which names, and until when.

Host names in rules and policies are trusted only through pins: a flow to an address is
"to api.example.com" only if this sandbox asked for api.example.com and was answered with
that address. A pin lasts at least as long as the answer's TTL, and at least
:data:`MIN_PIN_SECONDS` (clients cache answers longer than they are told to), but no
longer than :data:`MAX_PIN_SECONDS`.

The guest chooses the names it asks for, so pins are bounded: at most
:data:`MAX_NAMES_PER_IP` names per address (a guest looping over fresh names that all
resolve to one address, as wildcard DNS services do, would otherwise grow one address's
names forever, and every flow to it would sort them) and :data:`MAX_PINS` in all. Past a
bound the pins answered longest ago go first: the guest's own flood evicts its own oldest
answers, never a newer one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

MIN_PIN_SECONDS = 300.0
MAX_PIN_SECONDS = 86400.0
"""A day, as resolvers cap the TTLs they cache (unbound's cache-max-ttl)."""
MAX_NAMES_PER_IP = 64
MAX_PINS = 65536


class Pins:
    def __init__(
        self,
        min_seconds: float = MIN_PIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_names_per_ip: int = MAX_NAMES_PER_IP,
        max_pins: int = MAX_PINS,
    ) -> None:
        self._min = min_seconds
        self._clock = clock
        self._max_per_ip = max_names_per_ip
        self._max = max_pins
        self._by_ip: dict[str, dict[str, float]] = {}
        """Per address, its names and their expiry, in the order they were answered."""
        self._answered: dict[tuple[str, str], None] = {}
        """Every (address, name), in the order they were answered: the eviction order."""

    def __len__(self) -> int:
        return len(self._answered)

    def add(self, names: Iterable[str], ips: Iterable[str], ttl: float) -> None:
        seconds = min(max(float(ttl), self._min), max(MAX_PIN_SECONDS, self._min))
        expires = self._clock() + seconds
        names = list(names)
        for ip in ips:
            entry = self._by_ip.setdefault(ip, {})
            for name in names:
                # Answered again: it moves to the end of both orders.
                old = entry.pop(name, 0.0)
                entry[name] = max(old, expires)
                self._answered.pop((ip, name), None)
                self._answered[(ip, name)] = None
            while len(entry) > self._max_per_ip:
                self._drop(ip, next(iter(entry)))
        while len(self._answered) > self._max:
            self._drop(*next(iter(self._answered)))

    def _drop(self, ip: str, name: str) -> None:
        del self._answered[(ip, name)]
        entry = self._by_ip[ip]
        del entry[name]
        if not entry:
            del self._by_ip[ip]

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
