"""Sandbox networking: default-deny egress decided per flow on the host, pinned DNS and an
audit trail.

A sandbox's network is a plain :class:`NetworkConfig` (a preset, first-match
:class:`Rule` s, DNS settings: serialisable, so a stored definition can carry it) plus an
optional Python callback (:func:`policy`) that sees each :class:`Connection`. The launcher
composes one :class:`Network` per boot with :func:`open_network`.
"""

from .addresses import Endpoint
from .audit import AuditEvent, AuditStream
from .config import PRESETS, NetworkConfig, Publish, Rule, as_config, parse_allow, parse_publish
from .errors import NetworkConfigError, NetworkError, NetworkSetupError
from .network import Network, open_network
from .policy import Connection, DnsQuestion, policy

__all__ = [
    "PRESETS",
    "AuditEvent",
    "AuditStream",
    "Connection",
    "DnsQuestion",
    "Endpoint",
    "Network",
    "NetworkConfig",
    "NetworkConfigError",
    "NetworkError",
    "NetworkSetupError",
    "Publish",
    "Rule",
    "as_config",
    "open_network",
    "parse_allow",
    "parse_publish",
    "policy",
]
