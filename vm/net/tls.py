"""TLS toward the real servers: the context the interceptor checks them with."""

from __future__ import annotations

import ssl

ALPN = ("http/1.1",)


def upstream_context(extra_ca_file: str | None = None) -> ssl.SSLContext:
    """How the proxy checks the real servers: the host's trust store, plus ``extra_ca_file``."""
    context = ssl.create_default_context()
    if extra_ca_file is not None:
        context.load_verify_locations(cafile=extra_ca_file)
    context.set_alpn_protocols(list(ALPN))
    return context
