"""One intercepted HTTP request as the host's hooks see it, and the secrets that may be put
into it. Plain logic: the protocol (TLS, h11) is in :mod:`vm.net.http`."""

from __future__ import annotations

import dataclasses
import secrets as random_tokens
from collections.abc import Iterator, Sequence

from .addresses import Endpoint
from .config import HttpEdits, Secret, check_header


class Headers:
    """Request headers in order, names compared without case; what the hooks edit."""

    def __init__(self, items: Sequence[tuple[str, str]] = ()) -> None:
        self._items = [(name, value) for name, value in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower()
        return next((v for n, v in self._items if n.lower() == key), default)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` header with one holding ``value``."""
        check_header(name, value)
        self.remove(name)
        self._items.append((name, value))

    def remove(self, name: str) -> None:
        key = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def replace_in_values(self, old: str, new: str) -> None:
        self._items = [(n, v.replace(old, new)) for n, v in self._items]

    def apply(self, edits: HttpEdits) -> None:
        for name, value in edits.headers:
            if value is None:
                self.remove(name)
            else:
                self.set(name, value)


@dataclasses.dataclass(frozen=True)
class TlsFacts:
    """What the guest's TLS handshake said: the name it asked for, the version, ALPN."""

    server_name: str
    version: str | None
    alpn: str | None


class HttpRequest:
    """An intercepted request on its way upstream. ``host`` is the checked name (SNI, equal
    to Host and pinned to ``dst``); ``headers`` and ``target`` may be changed;
    :meth:`deny` answers the guest 403 with the reason instead of sending it."""

    def __init__(
        self, method: str, target: str, headers: Headers, host: str, dst: Endpoint, tls: TlsFacts
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.host = host
        self.dst = dst
        self.tls = tls
        self.denied: str | None = None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def url(self) -> str:
        port = "" if self.dst.port == 443 else f":{self.dst.port}"
        return f"https://{self.host}{port}{self.target}"

    def deny(self, reason: str = "denied by the policy") -> None:
        self.denied = str(reason)


@dataclasses.dataclass(frozen=True)
class Placeholder:
    secret: Secret
    text: str


class SecretBook:
    """The placeholders of one boot's secrets (random, so they say nothing of the values)."""

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self.placeholders = tuple(
            Placeholder(s, f"lanekit-secret-{s.name}-{random_tokens.token_hex(16)}")
            for s in secrets
        )

    def guest_env(self) -> dict[str, str]:
        return {p.secret.name: p.text for p in self.placeholders}

    def substitute(self, request: HttpRequest) -> list[Secret]:
        """Put each secret in place of its placeholder in the headers, if the request's host
        is one of the secret's; returns the secrets found on their way to another host (the
        request must then not be sent), in the headers or the target."""
        misplaced = []
        for placeholder in self.placeholders:
            found_in_target = placeholder.text in request.target
            found = found_in_target or any(placeholder.text in v for _, v in request.headers)
            if not found:
                continue
            if found_in_target or not placeholder.secret.allowed_for(request.host):
                misplaced.append(placeholder.secret)
                continue
            request.headers.replace_in_values(placeholder.text, placeholder.secret.value)
        return misplaced
