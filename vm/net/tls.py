"""TLS: the context the interceptor checks the real servers with, and the server name a
guest's ClientHello asks for (read before deciding whether to intercept at all)."""

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


TLS_RECORD_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0


class Incomplete(ValueError):
    """More bytes of the ClientHello are needed to find its server name."""


def client_hello_server_name(data: bytes) -> str | None:
    """The server name (SNI) a ClientHello at the start of ``data`` asks for; None if it
    names none. :class:`Incomplete` if the record is not all there yet; ValueError if it
    is not a ClientHello, or one split over records (rare: left to a full handshake)."""
    if len(data) < 5:
        raise Incomplete("short record header")
    if data[0] != TLS_RECORD_HANDSHAKE:
        raise ValueError("not a TLS handshake record")
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        raise Incomplete("short record")
    body = memoryview(data)[5:end]
    if len(body) < 4 or body[0] != _CLIENT_HELLO:
        raise ValueError("not a ClientHello")
    hello_end = 4 + int.from_bytes(body[1:4], "big")
    if hello_end > len(body):
        raise ValueError("a ClientHello split over records")
    at = 4 + 2 + 32  # version, random
    at = _skip(body, at, 1, hello_end)  # session id
    at = _skip(body, at, 2, hello_end)  # cipher suites
    at = _skip(body, at, 1, hello_end)  # compression methods
    if at == hello_end:
        return None  # no extensions
    extensions_end = at + 2 + _length(body, at, 2, hello_end)
    at += 2
    if extensions_end > hello_end:
        raise ValueError("extensions overrun the ClientHello")
    while at + 4 <= extensions_end:
        kind = int.from_bytes(body[at : at + 2], "big")
        size = _length(body, at + 2, 2, extensions_end)
        start, at = at + 4, at + 4 + size
        if at > extensions_end:
            raise ValueError("an extension overruns the extensions")
        if kind == _SERVER_NAME:
            return _host_name(body[start:at])
    return None


def _length(body: memoryview, at: int, width: int, end: int) -> int:
    if at + width > end:
        raise ValueError("truncated ClientHello")
    return int.from_bytes(body[at : at + width], "big")


def _skip(body: memoryview, at: int, width: int, end: int) -> int:
    after = at + width + _length(body, at, width, end)
    if after > end:
        raise ValueError("truncated ClientHello")
    return after


def _host_name(ext: memoryview) -> str | None:
    names_end = 2 + _length(ext, 0, 2, len(ext))
    at = 2
    while at + 3 <= min(names_end, len(ext)):
        kind, size = ext[at], _length(ext, at + 1, 2, len(ext))
        name = bytes(ext[at + 3 : at + 3 + size])
        if len(name) != size:
            raise ValueError("truncated server name")
        if kind == _HOST_NAME:
            return name.decode("ascii", errors="replace")
        at += 3 + size
    return None
