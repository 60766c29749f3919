"""Address classes a policy decides on, from the address alone (no DNS, TLS or HTTP).

Each class is a fixed list of networks (IANA's special-purpose registries), so a rule like
"public internet only" means the same on every host. ``metadata`` is the cloud instance
metadata services: reaching one from a sandbox hands the host's cloud credentials over.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


GROUPS: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {
    "loopback": _nets("127.0.0.0/8", "::1/128"),
    "private": _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "link-local": _nets("169.254.0.0/16", "fe80::/10"),
    "metadata": _nets(
        "169.254.169.254/32", "169.254.170.2/32", "100.100.100.200/32", "fd00:ec2::254/128"
    ),
    "multicast": _nets("224.0.0.0/4", "ff00::/8"),
    "broadcast": _nets("255.255.255.255/32"),
    "documentation": _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"),
    "reserved": _nets(
        "0.0.0.0/8", "192.0.0.0/24", "198.18.0.0/15", "240.0.0.0/4", "::/128", "64:ff9b:1::/48"
    ),
}
"""Named address classes, usable as a rule's destination (plus ``public``)."""

NOT_PUBLIC = tuple(GROUPS)


def parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@functools.lru_cache(maxsize=4096)
def groups_of(ip: str) -> frozenset[str]:
    """Every class ``ip`` falls in; ``public`` when it falls in none."""
    address = parse_ip(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    found = {
        name
        for name, nets in GROUPS.items()
        if any(address.version == n.version and address in n for n in nets)
    }
    if "broadcast" in found:
        found.discard("reserved")
    return frozenset(found or {"public"})


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One end of a flow: ``ip`` (text) and ``port`` (0 where it cannot be known)."""

    ip: str
    port: int

    @property
    def address(self) -> IPAddress:
        return parse_ip(self.ip)

    def _is(self, group: str) -> bool:
        return group in groups_of(self.ip)

    def is_loopback(self) -> bool:
        return self._is("loopback")

    def is_private(self) -> bool:
        return self._is("private")

    def is_link_local(self) -> bool:
        return self._is("link-local")

    def is_metadata(self) -> bool:
        return self._is("metadata")

    def is_multicast(self) -> bool:
        return self._is("multicast")

    def is_broadcast(self) -> bool:
        return self._is("broadcast")

    def is_documentation(self) -> bool:
        return self._is("documentation")

    def is_reserved(self) -> bool:
        return self._is("reserved")

    def is_public_internet(self) -> bool:
        return self._is("public")

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
