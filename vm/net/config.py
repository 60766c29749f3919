"""A sandbox's network as a plain value: a preset, ordered first-match rules, DNS settings and
where upstream connections go (after microsandbox's ``NetworkConfig``).

Everything here but the Python callback serialises (:meth:`NetworkConfig.to_dict`), so a
stored definition — a lane's — can carry its network. Values are checked when they are made:
a malformed rule is an error before any boot.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .addresses import GROUPS, NOT_PUBLIC, groups_of
from .errors import NetworkConfigError

PRESETS = ("none", "deny", "public-only", "allow-all")
"""``none``: no network device at all. ``deny``: a device, nothing allowed but what rules or
a policy grant. ``public-only``: the public internet, nothing private, local or reserved.
``allow-all``: everything the egress namespace reaches (the host's own loopback included)."""

ACTIONS = ("allow", "deny")
PROTOCOLS = ("tcp", "dns")
GROUP_NAMES = (*GROUPS, "public")
REBINDING_GROUPS = frozenset(
    {"loopback", "private", "link-local", "metadata", "multicast", "broadcast", "reserved"}
)
"""DNS answers in these classes are rebinding attempts unless a rule allows them."""

NEVER_VOUCHED_BY_SUFFIX = frozenset({"loopback", "link-local", "metadata"})
"""Answers a suffix rule cannot vouch for: whoever controls any name under the suffix
(one subdomain of a shared zone) could point it at the host's own services or the cloud's
metadata endpoint. A rule naming the exact host, or the address, still can."""

VIOLATION_ACTIONS = ("block", "block-and-log", "block-and-terminate")
"""What a secret's placeholder on its way to another host brings about (after microsandbox's
``ViolationAction``): the request is refused in every case; ``block-and-log`` also records a
``secret`` violation (and warns); ``block-and-terminate`` then kills the sandbox."""

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_CALLBACK_TIMEOUT = 5.0

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def normalise_hostname(name: str, what: str = "host name") -> str:
    """Lower case, no trailing dot; letters, digits, ``-`` and ``_`` in dot-separated labels."""
    host = name.strip().lower().removesuffix(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(p) for p in host.split(".")):
        raise NetworkConfigError(f"{what} {name!r} is not a valid DNS name")
    return host


def _is_ip_or_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def parse_ports(text: str | int | None) -> tuple[int, int] | None:
    if text is None:
        return None
    spec = str(text).strip()
    low, sep, high = spec.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise NetworkConfigError(f"port {spec!r}: use a port (443) or a range (8000-9000)")
    if not 1 <= first <= last <= 65535:
        raise NetworkConfigError(f"port {spec!r}: ports are 1-65535, the low one first")
    return first, last


def host_matches(pattern: str, host: str) -> bool:
    """``example.com`` is that name; ``.example.com`` and ``*.example.com`` are the names
    under it (``.example.com`` also the name itself)."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    if pattern.startswith("."):
        return host == pattern[1:] or host.endswith(pattern)
    return host == pattern


@dataclasses.dataclass(frozen=True)
class Rule:
    """One first-match rule. ``destination``: ``*``; an address or CIDR; a name
    (``api.example.com``); a suffix (``.example.com``: the name and all under it); or a class
    (``loopback``, ``private``, ``link-local``, ``metadata``, ``multicast``, ``broadcast``,
    ``documentation``, ``reserved``, ``public``). ``protocol``: ``tcp``, ``dns`` or both.
    Names match only addresses this sandbox's DNS answered for them (pins), and a DNS
    query for the name itself."""

    action: str
    destination: str = "*"
    protocol: str | None = None
    ports: str | None = None
    http: Mapping[str, Any] | None = None
    """Intercept HTTPS to this name: ``{"headers": {NAME: VALUE or None (remove)}}`` are
    set on every request on its way upstream (see :class:`HttpEdits`)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise NetworkConfigError(f"rule action {self.action!r}: use allow or deny")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise NetworkConfigError(f"rule protocol {self.protocol!r}: use tcp or dns")
        if self.ports is not None:
            object.__setattr__(self, "ports", str(self.ports))
            parse_ports(self.ports)
        dest = self.destination.strip()
        if dest in ("*", *GROUP_NAMES):
            pass
        elif _is_ip_or_cidr(dest):
            dest = str(ipaddress.ip_network(dest, strict=False))
        elif dest.startswith("."):
            dest = "." + normalise_hostname(dest[1:], "rule destination")
        else:
            dest = normalise_hostname(dest, "rule destination")
        object.__setattr__(self, "destination", dest)
        if self.http is not None:
            object.__setattr__(self, "http", HttpEdits.from_dict(self.http).to_dict())
            if self.action != "allow" or self.kind not in ("domain", "suffix"):
                raise NetworkConfigError(
                    f"rule {self.describe()}: http= needs an allow rule for a name or a suffix"
                )
            if self.protocol == "dns":
                raise NetworkConfigError(f"rule {self.describe()}: http= is for TCP, not DNS")

    @property
    def http_edits(self) -> HttpEdits | None:
        return None if self.http is None else HttpEdits.from_dict(self.http)

    @property
    def kind(self) -> str:
        """``any``, ``group``, ``cidr``, ``suffix`` or ``domain``."""
        dest = self.destination
        if dest == "*":
            return "any"
        if dest in GROUP_NAMES:
            return "group"
        if dest.startswith("."):
            return "suffix"
        return "cidr" if _is_ip_or_cidr(dest) else "domain"

    def describe(self) -> str:
        parts = [self.action, self.destination]
        if self.protocol:
            parts.append(self.protocol)
        if self.ports:
            parts.append(f"port {self.ports}")
        if self.http is not None:
            parts.append("http")
        return " ".join(parts)

    def matches_flow(self, ip: str, port: int, hostnames: Iterable[str]) -> bool:
        """Whether this rule applies to a TCP flow to ``ip:port`` (pinned to ``hostnames``)."""
        if self.protocol == "dns":
            return False
        ports = parse_ports(self.ports)
        if ports is not None and not ports[0] <= port <= ports[1]:
            return False
        kind = self.kind
        if kind == "any":
            return True
        if kind in ("group", "cidr"):
            return self._matches_address(ip)
        return any(host_matches(self.destination, h) for h in hostnames)

    def _matches_address(self, ip: str) -> bool:
        if self.kind == "group":
            return self.destination in groups_of(ip)
        net = ipaddress.ip_network(self.destination)
        address = ipaddress.ip_address(ip)
        return address.version == net.version and address in net

    def matches_query(self, name: str) -> bool:
        """Whether this rule applies to a DNS query for ``name`` (ports do not apply: a
        rule for ``api.example.com:443`` lets the name be resolved)."""
        if self.protocol == "tcp":
            return False
        kind = self.kind
        if kind == "any":
            return True
        if kind in ("domain", "suffix"):
            return host_matches(self.destination, name)
        return False

    def vouches_for_answer(self, name: str, ip: str) -> bool:
        """An allow rule that names this answer (its name or its address) explicitly, which
        lifts DNS rebinding protection for it."""
        if self.action != "allow" or self.kind == "any":
            return False
        if self.kind == "suffix" and groups_of(ip) & NEVER_VOUCHED_BY_SUFFIX:
            return False
        if self.kind in ("domain", "suffix"):
            return host_matches(self.destination, name)
        return self.protocol != "dns" and self._matches_address(ip)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"([\x21-\x7e\x80-\xff]([\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
"""RFC 9110's field-value, as h11 checks it before sending (an empty value allowed)."""


def check_header(name: str, value: str | None) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise NetworkConfigError(f"HTTP header name {name!r} is not a valid token")
    if value is not None and (not isinstance(value, str) or not _FIELD_VALUE.fullmatch(value)):
        raise NetworkConfigError(
            f"HTTP header {name}: the value must be one line of printable text (Latin-1), "
            "with no space or tab at either end"
        )


@dataclasses.dataclass(frozen=True)
class HttpEdits:
    """Header edits for intercepted requests: set each name to its value (replacing what
    the guest sent), or remove it where the value is ``None``."""

    headers: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        for name, value in self.headers:
            check_header(name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HttpEdits:
        if not isinstance(data, Mapping) or set(data) - {"headers"}:
            raise NetworkConfigError('http= takes {"headers": {NAME: VALUE or None}}')
        headers = data.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise NetworkConfigError('http= takes {"headers": {NAME: VALUE or None}}')
        return cls(tuple((str(k), v) for k, v in headers.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"headers": dict(self.headers)}


@dataclasses.dataclass(frozen=True)
class Secret:
    """A credential the guest never sees (after microsandbox's ``Secret.env``): the guest's
    environment variable ``name`` holds a placeholder, and the proxy puts ``value`` in its
    place in the headers of intercepted HTTPS requests to ``hosts`` (names, ``.suffix``
    for the names under one), nowhere else. ``on_violation``: what the placeholder on its
    way anywhere else brings about, one of :data:`VIOLATION_ACTIONS`."""

    name: str
    value: str
    hosts: tuple[str, ...]
    on_violation: str = "block-and-log"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or ""):
            raise NetworkConfigError(f"secret {self.name!r}: give an environment variable name")
        if not isinstance(self.value, str) or not self.value:
            raise NetworkConfigError(f"secret {self.name}: the value must be a non-empty string")
        check_header("secret", self.value)
        hosts = (self.hosts,) if isinstance(self.hosts, str) else tuple(self.hosts)
        if not hosts:
            raise NetworkConfigError(f"secret {self.name}: name the hosts it is for")
        normal = tuple(
            "." + normalise_hostname(h[1:], "secret host")
            if h.startswith(".")
            else normalise_hostname(h, "secret host")
            for h in hosts
        )
        object.__setattr__(self, "hosts", normal)
        if self.on_violation not in VIOLATION_ACTIONS:
            raise NetworkConfigError(
                f"secret {self.name}: on_violation {self.on_violation!r}: use "
                + ", ".join(VIOLATION_ACTIONS)
            )

    def allowed_for(self, host: str) -> bool:
        return any(host_matches(pattern, host) for pattern in self.hosts)

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, hosts={self.hosts!r}, on_violation={self.on_violation!r})"


@dataclasses.dataclass(frozen=True)
class Publish:
    """A host listener on ``address:host_port`` forwarding to ``guest_port`` in the guest."""

    host_port: int
    guest_port: int
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for port in (self.host_port, self.guest_port):
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise NetworkConfigError(f"published port {port!r}: ports are 1-65535")
        try:
            ipaddress.IPv4Address(self.address)
        except ValueError:
            raise NetworkConfigError(f"publish address {self.address!r} is not an IPv4 address")


def _resolver(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    host, port = (host, port) if sep else (port, "53")
    try:
        ipaddress.IPv4Address(host)
        if not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise NetworkConfigError(f"DNS resolver {text!r}: give an IPv4 address[:port]")
    return f"{host}:{port}"


def resolver_address(spec: str) -> tuple[str, int]:
    host, _, port = _resolver(spec).partition(":")
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """A sandbox's network. Rules are checked first, in order (the first that matches
    decides); then ``callback`` (see :func:`vm.net.policy`), if there is one; then the
    preset. ``dns``: the resolvers that answer (default: the host's). ``publish``: host
    ports forwarded to guest ports (a mapping ``{host_port: guest_port}`` or
    :class:`Publish` values). ``egress_netns``: the network namespace upstream
    connections are made from (a path like ``/run/netns/NAME``; default: the launcher's).
    ``log_path``: a JSON-lines audit log. ``max_connections``: concurrent TCP flows; more are
    refused. ``callback_timeout``: seconds the callback may take before the flow is denied.
    ``secrets``: :class:`Secret` s (HTTPS to their hosts is intercepted to substitute them).
    ``upstream_ca_file``: a PEM bundle trusted, besides the host's store, for the real
    servers of intercepted HTTPS."""

    preset: str = "none"
    rules: tuple[Rule, ...] = ()
    dns: tuple[str, ...] = ()
    block_domains: tuple[str, ...] = ()
    block_domain_suffixes: tuple[str, ...] = ()
    dns_rebind_protection: bool | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    publish: tuple[Publish, ...] = ()
    secrets: tuple[Secret, ...] = ()
    upstream_ca_file: str | None = None
    egress_netns: str | None = None
    log_path: str | None = None
    callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT
    callback: Callable[[Any], Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise NetworkConfigError(f"network preset {self.preset!r}: use {', '.join(PRESETS)}")
        rules = tuple(r if isinstance(r, Rule) else Rule(**r) for r in self.rules)
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "dns", tuple(_resolver(r) for r in self.dns))
        for field in ("block_domains", "block_domain_suffixes"):
            names = tuple(normalise_hostname(n.lstrip("."), field) for n in getattr(self, field))
            object.__setattr__(self, field, names)
        publish = self.publish
        if isinstance(publish, Mapping):
            publish = tuple(Publish(int(h), int(g)) for h, g in publish.items())
        publish = tuple(p if isinstance(p, Publish) else Publish(**p) for p in publish)
        if len({(p.address, p.host_port) for p in publish}) != len(publish):
            raise NetworkConfigError("a host port is published twice")
        object.__setattr__(self, "publish", publish)
        secrets = tuple(s if isinstance(s, Secret) else Secret(**s) for s in self.secrets)
        if len({s.name for s in secrets}) != len(secrets):
            raise NetworkConfigError("two secrets have the same name")
        object.__setattr__(self, "secrets", secrets)
        if not isinstance(self.max_connections, int) or not 1 <= self.max_connections <= 65536:
            raise NetworkConfigError("max_connections must be between 1 and 65536")
        if not self.callback_timeout > 0:
            raise NetworkConfigError("callback_timeout must be a positive number of seconds")
        if self.preset == "none" and (self.rules or self.callback or self.publish or self.secrets):
            raise NetworkConfigError(
                "network preset none has no network device: rules, a policy, secrets and "
                "published ports need another preset (deny, public-only, allow-all)"
            )

    @property
    def enabled(self) -> bool:
        """Whether the sandbox gets a network device."""
        return self.preset != "none"

    @property
    def default_action(self) -> str:
        return "allow" if self.preset == "allow-all" else "deny"

    @property
    def rebind_protection(self) -> bool:
        if self.dns_rebind_protection is not None:
            return self.dns_rebind_protection
        return self.preset != "allow-all"

    def effective_rules(self) -> tuple[tuple[Rule, str], ...]:
        """Every rule in order, each with where it comes from (``rule N`` or the preset)."""
        rules = [(r, f"rule {i + 1}: {r.describe()}") for i, r in enumerate(self.rules)]
        if self.preset == "public-only":
            for group in NOT_PUBLIC:
                rules.append((Rule("deny", group), f"public-only: {group} denied"))
            rules.append((Rule("allow", "*"), "public-only: public internet"))
        return tuple(rules)

    @property
    def may_intercept(self) -> bool:
        """Whether some flow may be intercepted (then the guest must trust the sandbox CA)."""
        return bool(self.secrets or self.callback or any(r.http is not None for r in self.rules))

    def is_blocked(self, name: str) -> bool:
        return name in self.block_domains or any(
            host_matches("." + suffix, name) for suffix in self.block_domain_suffixes
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able); the callback is left out."""
        out = dataclasses.asdict(self)
        out.pop("callback")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        fields = {f.name for f in dataclasses.fields(cls)} - {"callback"}
        unknown = set(data) - fields
        if unknown:
            raise NetworkConfigError(f"unknown network settings: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("rules", "dns", "block_domains", "block_domain_suffixes", "publish",
                    "secrets"):  # fmt: skip
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# ---------------------------------------------------------------- command-line forms


def parse_allow(spec: str) -> Rule:
    """``HOST[:PORT]``, ``.SUFFIX[:PORT]``, ``IP[:PORT]`` or ``CIDR[:PORT]`` as an allow rule."""
    text = spec.strip()
    dest, sep, port = text.rpartition(":")
    if not sep or "/" in port:
        dest, port = text, ""
    if not dest:
        raise NetworkConfigError(f"--allow {spec!r}: use HOST[:PORT] or CIDR[:PORT]")
    try:
        return Rule("allow", dest, ports=port or None)
    except NetworkConfigError as exc:
        raise NetworkConfigError(f"--allow {spec!r}: {exc}") from None


def parse_publish(spec: str) -> Publish:
    """``HOSTPORT:GUESTPORT`` or ``ADDRESS:HOSTPORT:GUESTPORT``."""
    parts = spec.strip().split(":")
    try:
        if len(parts) == 2:
            return Publish(int(parts[0]), int(parts[1]))
        if len(parts) == 3:
            return Publish(int(parts[1]), int(parts[2]), parts[0])
    except ValueError:
        pass
    raise NetworkConfigError(f"--publish {spec!r}: use [ADDRESS:]HOSTPORT:GUESTPORT (8080:80)")


def parse_secret(
    spec: str, environ: Mapping[str, str], on_violation: str = "block-and-log"
) -> Secret:
    """``ENV=VALUE@HOST[,HOST]``, or ``ENV@HOST[,HOST]`` for the value of this process's
    ``$ENV`` (so the value need not be on a command line)."""
    binding, sep, hosts = spec.rpartition("@")
    name, has_value, value = binding.partition("=")
    if not sep or not name or not hosts:
        raise NetworkConfigError(f"--secret {spec.split('=')[0]}...: use ENV=VALUE@HOST[,HOST]")
    if not has_value:
        if name not in environ:
            raise NetworkConfigError(f"--secret {name}@{hosts}: ${name} is not set here")
        value = environ[name]
    try:
        return Secret(name, value, tuple(h for h in hosts.split(",") if h), on_violation)
    except NetworkConfigError as exc:
        raise NetworkConfigError(f"--secret {name}: {exc}") from None


def as_config(network: NetworkConfig | str | None) -> NetworkConfig:
    """A Sandbox's ``network`` argument as a config: ``None`` is ``none``; a preset name."""
    if network is None:
        return NetworkConfig()
    if isinstance(network, str):
        return NetworkConfig(preset=network)
    if not isinstance(network, NetworkConfig):
        raise NetworkConfigError(
            f"network must be a preset name or a NetworkConfig, not {type(network).__name__}"
        )
    return network
