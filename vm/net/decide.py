"""Policy decisions: what one flow or one DNS query may do (after torkbot's
``network.policy``).

A :class:`Connection` is what the policy sees: the flow's ends, and the host names this
sandbox's DNS answered for the destination (never a name the guest claims). It grants
nothing unless the policy calls an ``accept``. :class:`Decider` runs a configuration's
rules first (the first that matches decides), then the Python callback, then the preset's
default; a callback that raises or runs past its timeout denies (fail closed).
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .addresses import Endpoint
from .config import HttpEdits, NetworkConfig, host_matches, parse_ports, resolver_address
from .errors import NetworkConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RawGrant:
    """The flow's bytes go through as they are (no protocol is looked at)."""


@dataclasses.dataclass(frozen=True)
class DnsGrant:
    """The query is answered by ``resolvers`` (``IP:PORT``; empty: the configured ones)."""

    resolvers: tuple[str, ...] = ()
    allow_private: bool = False


RequestHook = Callable[[Any], Awaitable[None] | None]


@dataclasses.dataclass(frozen=True)
class HttpGrant:
    """The flow is HTTPS to ``names`` (patterns: a name, or ``.suffix``), intercepted: TLS
    ends here with a leaf of the sandbox's CA, each request's Host must equal the SNI and
    the SNI a name pinned to the address; ``edits`` and then ``on_request(request)`` change
    the request on its way upstream (see :class:`vm.net.HttpRequest`)."""

    names: tuple[str, ...]
    edits: HttpEdits = dataclasses.field(default_factory=HttpEdits)
    on_request: RequestHook | None = dataclasses.field(default=None, compare=False)
    raw_fallback: bool = False
    """A flow that turns out not to be TLS goes through raw (set where the interception is
    only for secrets: other protocols to a secret's host keep working, unseen)."""


Grant = RawGrant | DnsGrant | HttpGrant


@dataclasses.dataclass(frozen=True)
class Decision:
    grant: Grant | None
    reason: str

    @property
    def allowed(self) -> bool:
        return self.grant is not None


@dataclasses.dataclass(frozen=True)
class DnsQuestion:
    name: str
    qtype: str
    transport: str


class _Match:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn


class DnsMatch(_Match):
    def __init__(self, conn: Connection, resolvers: tuple[str, ...]) -> None:
        super().__init__(conn)
        self._resolvers = resolvers

    def accept(
        self, resolvers: Sequence[str] | None = None, *, allow_private: bool = False
    ) -> DnsGrant:
        """Answer this query through ``resolvers`` (default: those given to ``match_dns``,
        else the sandbox's); ``allow_private`` lifts DNS rebinding protection for it."""
        chosen = tuple(resolvers) if resolvers is not None else self._resolvers
        grant = DnsGrant(tuple(_resolver(r) for r in chosen), allow_private)
        self._conn._grant(grant)
        return grant


class TcpMatch(_Match):
    def accept(self) -> Grant:
        return self._conn.accept()


class HttpMatch(_Match):
    def __init__(self, conn: Connection, names: tuple[str, ...]) -> None:
        super().__init__(conn)
        self._names = names

    def accept(
        self,
        on_request: RequestHook | None = None,
        *,
        headers: dict[str, str | None] | None = None,
    ) -> HttpGrant:
        """Intercept the flow: ``headers`` are set (``None``: removed) on every request,
        then ``on_request(request)`` (sync or async) may change or deny it."""
        edits = HttpEdits(tuple((headers or {}).items()))
        grant = HttpGrant(self._names, edits, on_request)
        self._conn._grant(grant)
        return grant


def _resolver(spec: str) -> str:
    host, port = resolver_address(spec)
    return f"{host}:{port}"


class Connection:
    """One TCP flow (``transport == "tcp"``) or one DNS query (``dns`` is set), as the
    policy callback sees it. ``src`` is the guest (its port is not visible behind qemu's
    user networking: 0); ``hostnames`` are the names this sandbox's DNS answered with
    ``dst.ip`` (pins), so a name rule cannot be fooled by a Host header or an SNI."""

    def __init__(
        self,
        transport: str,
        src: Endpoint,
        dst: Endpoint,
        hostnames: Sequence[str] = (),
        dns: DnsQuestion | None = None,
    ) -> None:
        self.transport = transport
        self.src = src
        self.dst = dst
        self.hostnames = tuple(hostnames)
        self.dns = dns
        self._lock = threading.Lock()
        self._sealed = False
        self._granted: Grant | None = None
        self._denied: str | None = None

    @property
    def hostname(self) -> str | None:
        """The query's name, or the flow's one trusted name (None if none or several)."""
        if self.dns is not None:
            return self.dns.name
        return self.hostnames[0] if len(self.hostnames) == 1 else None

    def _grant(self, grant: Grant) -> None:
        with self._lock:
            if not self._sealed and self._denied is None:
                self._granted = grant

    def accept(self) -> Grant:
        """Let the flow through as raw transport (a DNS query: answer it as usual)."""
        grant: Grant = DnsGrant() if self.dns is not None else RawGrant()
        self._grant(grant)
        return grant

    def deny(self, reason: str = "denied by the policy") -> None:
        """Deny, with a reason for the audit log (and for the guest, on HTTP flows)."""
        with self._lock:
            if not self._sealed:
                self._denied = str(reason)
                self._granted = None

    def match_dns(
        self, resolver: str | Sequence[str] | Callable[[DnsQuestion], bool] | None = None
    ) -> DnsMatch | None:
        """A DNS query (over UDP or TCP)? ``resolver``: the resolver(s) ``accept()`` uses, or
        a predicate on the question."""
        if self.dns is None:
            return None
        if callable(resolver):
            return DnsMatch(self, ()) if resolver(self.dns) else None
        resolvers = (resolver,) if isinstance(resolver, str) else tuple(resolver or ())
        return DnsMatch(self, tuple(_resolver(r) for r in resolvers))

    def match_tcp(self, spec: str) -> TcpMatch | None:
        """A TCP flow to ``IP[:PORT]`` or ``CIDR[:PORT]``?"""
        if self.dns is not None:
            return None
        address, sep, port = spec.rpartition(":")
        if not sep or "/" in port:
            address, port = spec, ""
        try:
            net = ipaddress.ip_network(address, strict=False)
            ports = parse_ports(port or None)
        except ValueError as exc:
            raise NetworkConfigError(f"match_tcp({spec!r}): {exc}") from None
        ip = self.dst.address
        if ip.version != net.version or ip not in net:
            return None
        if ports is not None and not ports[0] <= self.dst.port <= ports[1]:
            return None
        return TcpMatch(self)

    def match_http(self, host: str | Callable[[str], bool]) -> HttpMatch | None:
        """A TCP flow to an address this sandbox's DNS answered for ``host`` (a name, a
        ``.suffix``, or a predicate on the pinned names)? ``accept()`` intercepts it."""
        if self.dns is not None:
            return None
        if callable(host):
            names = tuple(n for n in self.hostnames if host(n))
        else:
            pattern = host.strip().lower().removesuffix(".")
            names = tuple(n for n in self.hostnames if host_matches(pattern, n))
        return HttpMatch(self, names) if names else None

    def _seal(self) -> tuple[Grant | None, str | None]:
        with self._lock:
            self._sealed = True
            return self._granted, self._denied


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an object with an async __call__)
    )


async def call_hook(
    fn: Callable[[Any], Any], arg: Any, timeout: float, limiter: trio.CapacityLimiter
) -> None:
    """Call a host hook, sync or async, within ``timeout``. A sync hook runs in a worker
    thread (so one that blocks cannot stall the sandbox) and is abandoned past the timeout."""
    with trio.fail_after(timeout):
        if _is_async(fn):
            await fn(arg)
            return
        result = await trio.to_thread.run_sync(fn, arg, abandon_on_cancel=True, limiter=limiter)
        if inspect.isawaitable(result):
            await result


class Decider:
    """Decides flows and queries for one boot from its configuration and callback."""

    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.rules = config.effective_rules()
        self._limiter = trio.CapacityLimiter(16)

    async def decide_flow(self, conn: Connection) -> Decision:
        decision = await self._decide_flow(conn)
        if isinstance(decision.grant, RawGrant):
            # A flow to a secret's host is intercepted, so the secret can be put in.
            names = tuple(
                n for n in conn.hostnames if any(s.allowed_for(n) for s in self.config.secrets)
            )
            if names:
                grant = HttpGrant(names, raw_fallback=True)
                return Decision(grant, f"{decision.reason}; secrets")
        return decision

    async def _decide_flow(self, conn: Connection) -> Decision:
        for rule, where in self.rules:
            if rule.matches_flow(conn.dst.ip, conn.dst.port, conn.hostnames):
                if rule.action == "deny":
                    return Decision(None, where)
                edits = rule.http_edits
                if edits is None:
                    return Decision(RawGrant(), where)
                names = tuple(n for n in conn.hostnames if host_matches(rule.destination, n))
                return Decision(HttpGrant(names, edits), where)
        if self.config.callback is not None:
            decision = await self._ask(conn)
            if isinstance(decision.grant, DnsGrant):
                return Decision(None, "the policy granted a TCP flow DNS")
            return decision
        if self.config.default_action == "allow":
            return Decision(RawGrant(), "allow-all")
        return Decision(None, f"not allowed (preset {self.config.preset}, no rule matched)")

    async def decide_query(self, conn: Connection) -> Decision:
        assert conn.dns is not None
        name = conn.dns.name
        if self.config.is_blocked(name):
            return Decision(None, "blocked domain")
        for rule, where in self.rules:
            if rule.matches_query(name):
                if rule.action == "allow":
                    return Decision(DnsGrant(), where)
                return Decision(None, where)
        if self.config.callback is not None:
            decision = await self._ask(conn)
            if decision.grant is not None and not isinstance(decision.grant, DnsGrant):
                return Decision(None, "the policy granted a DNS query something else than DNS")
            return decision
        if self.config.default_action == "allow":
            return Decision(DnsGrant(), "allow-all")
        return Decision(None, f"DNS not allowed (preset {self.config.preset}, no rule matched)")

    def vouched(self, name: str, ip: str) -> bool:
        """Whether an allow rule names this DNS answer explicitly (rebinding protection)."""
        return any(rule.vouches_for_answer(name, ip) for rule, _ in self.rules)

    async def _ask(self, conn: Connection) -> Decision:
        callback = self.config.callback
        assert callback is not None
        timeout = self.config.callback_timeout
        try:
            await call_hook(callback, conn, timeout, self._limiter)
        except trio.TooSlowError:
            conn._seal()
            log.warning("network policy callback took longer than %g s for %s", timeout, conn.dst)
            return Decision(None, f"the policy took longer than {timeout:g} s")
        except Exception as exc:
            conn._seal()
            log.warning("network policy callback raised for %s: %r", conn.dst, exc)
            return Decision(None, f"the policy raised {type(exc).__name__}: {exc}"[:300])
        granted, denied = conn._seal()
        if denied is not None:
            return Decision(None, f"policy: {denied}")
        if granted is None:
            return Decision(None, "the policy granted nothing")
        return Decision(granted, "policy")


def policy(
    callback: Callable[[Connection], Awaitable[None] | None],
    *,
    timeout: float = 5.0,
    **settings: Any,
) -> NetworkConfig:
    """A network decided by ``callback(conn)`` (sync or async), default deny: a flow or
    query is let through only if the callback calls an ``accept``. ``settings`` are the
    other :class:`NetworkConfig` fields (rules are checked before the callback)."""
    settings.setdefault("preset", "deny")
    return NetworkConfig(callback=callback, callback_timeout=timeout, **settings)
