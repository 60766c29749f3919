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

from typing import TYPE_CHECKING

from blockstore.lazy import lazy_exports

if TYPE_CHECKING:
    from .addresses import Endpoint
    from .audit import AuditEvent, AuditStream
    from .ca import SandboxCA
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
    from .decide import Connection, DnsQuestion, HttpGrant, policy
    from .errors import NetworkConfigError, NetworkError, NetworkSetupError
    from .network import Network, open_network
    from .request import Headers, HttpRequest, TlsFacts
else:  # a process that only parses a config (the command line) skips the engine
    __getattr__ = lazy_exports(
        __name__,
        {
            ".addresses": "Endpoint",
            ".audit": "AuditEvent AuditStream",
            ".ca": "SandboxCA",  # cryptography: 0.1 s
            ".config": "PRESETS HttpEdits NetworkConfig Publish Rule Secret"
            " as_config parse_allow parse_publish",
            ".errors": "NetworkConfigError NetworkError NetworkSetupError",
            ".network": "Network open_network",
            ".decide": "Connection DnsQuestion HttpGrant policy",
            ".request": "Headers HttpRequest TlsFacts",
        },
    )

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
