"""HTTPS interception: TLS from the guest ends here with a leaf of the sandbox's CA, each
request is parsed (h11), checked (the SNI must be a name pinned to the address and granted;
Host must equal the SNI, else 421), edited by the grant and the policy's hook (a denial is
a 403), has its secrets put in, and goes upstream over TLS verified against the host's
trust store; the response comes back as it is. Every request is audited.
"""

from __future__ import annotations

import contextvars
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import trio

from .audit import Audit
from .config import VIOLATION_ACTIONS, Secret, normalise_hostname
from .decide import HttpGrant, call_hook
from .errors import NetworkConfigError
from .namespace import Egress
from .proxy import CONNECT_TIMEOUT, Flow
from .request import Headers, HttpRequest, SecretBook, TlsFacts
from .tls import ALPN, TLS_RECORD_HANDSHAKE, Incomplete, client_hello_server_name

if TYPE_CHECKING:
    from .ca import SandboxCA

HANDSHAKE_TIMEOUT = 30.0
FIRST_BYTE_WAIT = 2.0
RECEIVE_CHUNK = 256 * 1024
MAX_CLIENT_HELLO = 16 * 1024 + 5

log = logging.getLogger(__name__)

_server_name: contextvars.ContextVar[list[str]] = contextvars.ContextVar("lanekit_sni")
"""The flow's task's server name: the grant's first name, until the SNI callback (which runs
in that task, during its handshake) puts the guest's in its place."""


class Refused(Exception):
    """A request answered here, not sent upstream: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str, kind: str = "http") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.terminate = False


def secret_violation(misplaced: list[Secret], host: str) -> Refused:
    """The refusal of a request carrying secrets to a host they are not for, as the
    strictest of their ``on_violation`` actions says: ``block`` is an ordinary refused
    request; ``block-and-log`` a ``secret`` violation, warned about; ``block-and-terminate``
    that, and the sandbox is killed (the request is not answered)."""
    action = max((s.on_violation for s in misplaced), key=VIOLATION_ACTIONS.index)
    names = ", ".join(s.name for s in misplaced)
    refused = Refused(403, f"secret {names} may not be sent to {host}")
    if action != "block":
        refused.kind = "secret"
        refused.terminate = action == "block-and-terminate"
        if refused.terminate:
            refused.reason += "; the sandbox is terminated"
        log.warning("%s (%s)", refused.reason, action)
    return refused


class HttpInterceptor:
    def __init__(
        self,
        ca: SandboxCA,
        upstream: ssl.SSLContext,
        egress: Egress,
        audit: Audit,
        book: SecretBook,
        hook_timeout: float,
        terminate: Callable[[str], None] | None = None,
    ) -> None:
        self._ca = ca
        self._upstream = upstream
        self._egress = egress
        self._audit = audit
        self._book = book
        self._hook_timeout = hook_timeout
        self._terminate = terminate
        """Called (with the reason) to kill the sandbox: a block-and-terminate violation."""
        self._limiter = trio.CapacityLimiter(16)
        self._server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server.set_alpn_protocols(list(ALPN))
        self._server.sni_callback = self._on_sni

    def _on_sni(self, conn: Any, name: str | None, _context: ssl.SSLContext) -> int | None:
        """Present a leaf for the name the guest asked for (checked against the pins once
        the request comes); a name that is not a DNS name ends the handshake."""
        chosen = _server_name.get()
        try:
            server_name = normalise_hostname(name or chosen[0])
        except NetworkConfigError:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        chosen[0] = server_name
        conn.context = self._ca.server_context(server_name)
        return None

    async def handle(self, flow: Flow, grant: HttpGrant, reason: str) -> bool:
        """Serve the flow intercepted; False (nothing read) if it is not TLS and the grant
        lets such a flow go through raw."""
        named = grant.names[0] if grant.names else None
        sock = flow.stream.socket
        first = b""
        # A protocol whose server speaks first sends nothing: give up waiting soon when
        # such a flow may go through raw.
        try:
            with trio.move_on_after(FIRST_BYTE_WAIT if grant.raw_fallback else HANDSHAKE_TIMEOUT):
                first = await sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:  # the guest reset the connection: its own doing
            why = f"{reason}; the guest's connection failed: {exc.strerror or exc}"
            return self._refuse(flow, named, "error", why)
        if not first or first[0] != TLS_RECORD_HANDSHAKE:
            if grant.raw_fallback:
                return False
            why = f"{reason}; intercepted flows must be TLS"
            return self._refuse(flow, named, "deny", why)
        if grant.raw_fallback:
            # Intercepted only to put secrets in: a flow to another site on the same
            # address (a CDN's) asks for another name, and goes through raw.
            name = await _peek_server_name(sock)
            if name is not None and name.lower().rstrip(".") not in grant.names:
                return False
        guest = trio.SSLStream(flow.stream, self._server, server_side=True)
        chosen = [named or str(flow.dst.ip)]
        _server_name.set(chosen)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await guest.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            why = f"{reason}; TLS handshake with the guest failed: {cause}"[:300]
            return self._refuse(flow, chosen[0], "error", why)
        tls = TlsFacts(chosen[0], guest.version(), guest.selected_alpn_protocol())
        session = _Session(self, flow, grant, reason, guest, tls)
        try:
            await session.run()
        finally:
            await session.close()
        return True

    def _refuse(self, flow: Flow, hostname: str | None, verdict: str, why: str) -> bool:
        """Refuse the guest's connection, recorded; True: the flow is served (refused)."""
        flow.refuse()
        self._audit.record("http", str(flow.src.ip), str(flow.dst), hostname, verdict, why)
        return True


async def _peek_server_name(sock: trio.socket.SocketType) -> str | None:
    """The server name of the guest's ClientHello, read without taking it off the socket;
    None when it names none, cannot be read (split, malformed) or is slow to arrive: the
    flow is then intercepted, as when it names a secret's host."""
    with trio.move_on_after(FIRST_BYTE_WAIT):
        while True:
            try:
                data = await sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
            except OSError:
                return None  # the handshake that follows fails, and says so
            try:
                return client_hello_server_name(data)
            except Incomplete:
                if not data or len(data) >= MAX_CLIENT_HELLO:
                    return None
            except ValueError:
                return None
            await trio.sleep(0.005)  # the rest of the record is on its way
    return None


class _Session:
    """One intercepted connection: requests in order, one upstream connection for them."""

    def __init__(
        self,
        owner: HttpInterceptor,
        flow: Flow,
        grant: HttpGrant,
        reason: str,
        guest: trio.SSLStream[trio.SocketStream],
        tls: TlsFacts,
    ) -> None:
        self._owner = owner
        self._flow = flow
        self._grant = grant
        self._reason = reason
        self._guest = guest
        self._tls = tls
        self._server = h11.Connection(h11.SERVER)
        self._client = h11.Connection(h11.CLIENT)
        self._upstream: trio.SSLStream[trio.SocketStream] | None = None

    async def run(self) -> None:
        while True:
            try:
                event = await _next_event(self._server, self._guest)
            except h11.RemoteProtocolError as exc:
                await self._answer(400, f"bad request: {exc}")
                return
            if not isinstance(event, h11.Request):
                return
            if not await self._one(event):
                return
            if (
                self._server.our_state is not h11.DONE
                or self._server.their_state is not h11.DONE
                or self._client.our_state is not h11.DONE
                or self._client.their_state is not h11.DONE
            ):
                return
            self._server.start_next_cycle()
            self._client.start_next_cycle()

    async def _one(self, event: h11.Request) -> bool:
        """One request, answered; whether the connection may carry another."""
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers = Headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers])
        detail: dict[str, Any] = {
            "method": method,
            "host": headers.get("host"),
            "path": target.partition("?")[0],
        }
        try:
            request = await self._check(method, target, headers)
        except Refused as refused:
            detail["status"] = refused.status
            self._record(refused.kind, "deny", refused.reason, detail)
            if refused.terminate and self._owner._terminate is not None:
                self._owner._terminate(refused.reason)
            else:
                await self._answer(refused.status, refused.reason)
            return False
        try:
            status, up, down = await self._forward(request)
        except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError,
                h11.ProtocolError) as exc:  # fmt: skip
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            why = f"upstream: {cause}"[:200]
            detail["status"] = 502
            self._record("http", "error", why, detail)
            if self._server.our_state is h11.SEND_RESPONSE:
                await self._answer(502, why)
            return False
        detail["status"] = status
        self._record("http", "allow", self._reason, detail, up, down)
        return True

    async def _check(self, method: str, target: str, headers: Headers) -> HttpRequest:
        if not (target.startswith("/") or (method == "OPTIONS" and target == "*")):
            # An absolute URL names its own host, which the upstream may heed over Host
            # (and a hook reading the path would not see the path).
            raise Refused(400, f"request target {target[:100]!r}: send a path (origin form)")
        sni = self._tls.server_name
        if sni not in self._grant.names:
            raise Refused(421, f"TLS server name {sni} is not a name this address was granted as")
        host = (headers.get("host") or "").strip().lower()
        name, port = _split_host(host)
        if name != sni or port not in (None, self._flow.dst.port):
            raise Refused(421, f"Host {host or '(none)'} does not match the TLS server name {sni}")
        if headers.get("transfer-encoding") is not None:
            headers.remove("content-length")  # RFC 9112 6.3: never both, upstream
        request = HttpRequest(method, target, headers, sni, self._flow.dst, self._tls)
        request.headers.apply(self._grant.edits)
        hook = self._grant.on_request
        if hook is not None:
            timeout = self._owner._hook_timeout
            try:
                await call_hook(hook, request, timeout, self._owner._limiter)
            except trio.TooSlowError:
                raise Refused(403, f"the request hook took longer than {timeout:g} s")
            except Exception as exc:
                raise Refused(403, f"the request hook raised {type(exc).__name__}: {exc}"[:200])
            if request.denied is not None:
                raise Refused(403, f"policy: {request.denied}")
        misplaced = self._owner._book.substitute(request)
        if misplaced:
            raise secret_violation(misplaced, sni)
        return request

    async def _forward(self, request: HttpRequest) -> tuple[int, int, int]:
        upstream = await self._connect()
        try:
            outgoing = h11.Request(
                method=request.method.encode("ascii"),
                target=request.target.encode("ascii"),
                headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in request.headers],
            )
        except (UnicodeEncodeError, h11.LocalProtocolError):
            # Never the exception's text: it quotes the header, an injected secret in it.
            raise h11.LocalProtocolError("a header of the request is not valid HTTP") from None
        await self._send_upstream(outgoing)
        up = down = 0
        while True:
            event = await _next_event(self._server, self._guest)
            if isinstance(event, h11.Data):
                up += len(event.data)
                await self._send_upstream(event)
            elif isinstance(event, h11.EndOfMessage):
                await self._send_upstream(event)
                break
            else:
                raise trio.BrokenResourceError("the guest ended the request early")
        status = 0
        while True:
            event = await _next_event(self._client, upstream)
            if isinstance(event, h11.InformationalResponse | h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                down += len(event.data)
            elif not isinstance(event, h11.EndOfMessage):
                raise trio.BrokenResourceError("the server ended the response early")
            await self._guest.send_all(self._server.send(event) or b"")
            if isinstance(event, h11.EndOfMessage):
                return status, up, down

    async def _connect(self) -> trio.SSLStream[trio.SocketStream]:
        if self._upstream is None:
            dst = self._flow.dst
            raw = await self._owner._egress.connect(dst.ip, dst.port, CONNECT_TIMEOUT)
            stream = trio.SSLStream(
                raw, self._owner._upstream, server_hostname=self._tls.server_name
            )
            self._upstream = stream
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
        return self._upstream

    async def _send_upstream(self, event: Any) -> None:
        assert self._upstream is not None
        data = self._client.send(event)
        if data:
            await self._upstream.send_all(data)

    async def _answer(self, status: int, reason: str) -> None:
        """Answer the guest here with ``status`` and a one-line body, and close."""
        if self._server.our_state is not h11.SEND_RESPONSE:
            return
        body = (reason.replace("\n", " ") + "\n").encode("utf-8", "replace")
        try:
            data = self._server.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("content-type", "text/plain; charset=utf-8"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ],
                )
            )
            data = (data or b"") + (self._server.send(h11.Data(data=body)) or b"")
            data += self._server.send(h11.EndOfMessage()) or b""
            await self._guest.send_all(data)
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _record(self, kind: str, verdict: str, reason: str, detail: dict[str, Any],
                up: int = 0, down: int = 0) -> None:  # fmt: skip
        self._owner._audit.record(
            kind, str(self._flow.src.ip), str(self._flow.dst), self._tls.server_name, verdict,
            reason, up, down, detail,
        )  # fmt: skip

    async def close(self) -> None:
        for stream in (self._guest, self._upstream):
            if stream is not None:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass


def _split_host(host: str) -> tuple[str, int | None]:
    """``name[:port]`` from a Host header (a trailing dot on the name dropped)."""
    name, sep, port = host.rpartition(":")
    if sep and port.isascii() and port.isdigit():  # int() takes "²", the policy must not
        return name.removesuffix("."), int(port)
    return host.removesuffix("."), None


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECEIVE_CHUNK)
        except trio.BrokenResourceError:
            data = b""
        conn.receive_data(bytes(data))
