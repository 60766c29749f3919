"""Sandbox networking: default-deny egress decided per flow on the host, pinned DNS and an
audit trail.

A sandbox's network is a plain :class:`NetworkConfig` (a preset, first-match
:class:`Rule` s, DNS settings: serialisable, so a stored definition can carry it) plus an
optional Python callback (:func:`policy`) that sees each :class:`Connection`. HTTPS to a
name may be intercepted (``conn.match_http``, ``Rule(..., http=...)``, :class:`Secret`):
TLS ends on the host with a leaf of the sandbox's own CA, so headers can be set and
secrets put in on the host. The launcher
composes one :class:`Network` per boot with :func:`open_network`.
"""

from .addresses import Endpoint
from .audit import AuditEvent, AuditStream
from .config import (
    PRESETS,
    HttpEdits,
    NetworkConfig,
    Publish,
    Rule,
    Secret,
    as_config,
    parse_allow,
    parse_publish,
)
from .errors import NetworkConfigError, NetworkError, NetworkSetupError
from .network import Network, open_network
from .policy import Connection, DnsQuestion, HttpGrant, policy
from .request import Headers, HttpRequest, TlsFacts
from .tls import SandboxCA

__all__ = [
    "PRESETS",
    "AuditEvent",
    "AuditStream",
    "Connection",
    "DnsQuestion",
    "Endpoint",
    "Headers",
    "HttpEdits",
    "HttpGrant",
    "HttpRequest",
    "Network",
    "NetworkConfig",
    "NetworkConfigError",
    "NetworkError",
    "NetworkSetupError",
    "Publish",
    "Rule",
    "SandboxCA",
    "Secret",
    "TlsFacts",
    "as_config",
    "open_network",
    "parse_allow",
    "parse_publish",
    "policy",
]
