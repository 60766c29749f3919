"""HTTPS interception without a VM: the sandbox CA and its leaves, and the interceptor
between a real TLS client (standing in for the guest, trusting only the sandbox CA) and a
real HTTPS origin on loopback with a CA of its own (tests/netorigins.py's)."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tests.netorigins import https_server, make_test_ca
from tools.cli_net import add_network_arguments, network_from_args
from vm.net import (
    Connection,
    Endpoint,
    HttpEdits,
    HttpGrant,
    HttpRequest,
    NetworkConfig,
    NetworkConfigError,
    NetworkSetupError,
    Rule,
    SandboxCA,
    Secret,
    policy,
)
from vm.net.audit import Audit, AuditEvent
from vm.net.config import parse_secret
from vm.net.decide import Decider, RawGrant
from vm.net.guest_trust import install_ca
from vm.net.http import HttpInterceptor
from vm.net.namespace import Egress
from vm.net.proxy import Flow
from vm.net.request import SecretBook
from vm.net.tls import Incomplete, client_hello_server_name, upstream_context

GUEST = Endpoint("10.0.2.15", 0)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """An HTTPS origin for ``tls.test`` on 127.0.0.1: (its port, its CA file)."""
    ca_pem, server_pem = make_test_ca(["tls.test"])
    ca_file = tmp_path_factory.mktemp("origin") / "ca.pem"
    ca_file.write_bytes(ca_pem)
    server = https_server(("127.0.0.1", 0), server_pem)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], str(ca_file)
    server.shutdown()
    server.server_close()
    thread.join()


async def tcp_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A TCP connection over loopback: (the guest's end, the proxy's end)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    accepted, _ = await listener.accept()
    listener.close()
    return client, accepted


class Rig:
    """An interceptor, and a guest-like TLS client that trusts only the sandbox CA."""

    def __init__(self, origin: tuple[int, str], secrets: tuple[Secret, ...] = (),
                 upstream_ca: str | None = "origin") -> None:  # fmt: skip
        self.port, ca_file = origin
        self.ca = SandboxCA()
        self.audit = Audit("test", None)
        self.book = SecretBook(secrets)
        upstream = upstream_context(ca_file if upstream_ca == "origin" else upstream_ca)
        self.terminated: list[str] = []
        self.interceptor = HttpInterceptor(
            self.ca, upstream, Egress(None), self.audit, self.book, 1.0, self.terminated.append
        )
        self.events: list[AuditEvent] = []
        self.audit.record = self._record  # type: ignore[method-assign]

    def _record(self, *args: Any, **kwargs: Any) -> AuditEvent:
        event = Audit.record(self.audit, *args, **kwargs)
        self.events.append(event)
        return event

    async def exchange(self, grant: HttpGrant, *requests: bytes, sni: str = "tls.test",
                       tls: bool = True, trust: bytes | None = None) -> bytes:  # fmt: skip
        """Send ``requests`` on one connection from the guest's side; all it got back."""
        client, accepted = await tcp_pair()
        flow = Flow(trio.SocketStream(accepted), GUEST, Endpoint("127.0.0.1", self.port))
        received = b""
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.interceptor.handle, flow, grant, "test grant")
                stream: trio.abc.Stream = trio.SocketStream(client)
                if tls:
                    trusted = trust or self.ca.certificate_pem
                    context = ssl.create_default_context(cadata=trusted.decode())
                    context.set_alpn_protocols(["h2", "http/1.1"])
                    stream = trio.SSLStream(stream, context, server_hostname=sni)
                try:
                    if tls:
                        await stream.do_handshake()  # type: ignore[attr-defined]
                    for request in requests:
                        await stream.send_all(request)
                    while chunk := await stream.receive_some(65536):
                        received += chunk
                except trio.BrokenResourceError:
                    pass
                await stream.aclose()
        return received


def get(path: str = "/headers", host: str = "tls.test", *headers: str, close: bool = True
        ) -> bytes:  # fmt: skip
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_sandbox_ca_mints_cached_leaves() -> None:
    ca = SandboxCA()
    root = ca.certificate
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf, _ = ca.mint("api.example")
    leaf.verify_directly_issued_by(root)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api.example"]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert leaf.not_valid_before_utc < now - datetime.timedelta(hours=12)  # guest clocks drift
    ip_leaf, _ = ca.mint("198.51.100.7")
    ip_names = ip_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in ip_names.get_values_for_type(x509.IPAddress)] == ["198.51.100.7"]
    assert ca.server_context("api.example") is ca.server_context("api.example")
    assert b"PRIVATE KEY" not in ca.certificate_pem
    # Another sandbox's CA is another CA.
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(SandboxCA().certificate)


async def test_headers_set_removed_and_edited_by_the_hook(origin: tuple[int, str]) -> None:
    rig = Rig(origin)
    seen: list[HttpRequest] = []

    def hook(request: HttpRequest) -> None:
        seen.append(request)
        request.headers.set("X-From-Hook", f"{request.method} {request.path}")

    edits = HttpEdits((("X-Injected", "yes"), ("X-Drop", None)))
    grant = HttpGrant(("tls.test",), edits, hook)
    response = await rig.exchange(grant, get("/headers", "tls.test", "X-Drop: secret-ish"))
    status, body = status_and_body(response)
    assert status == 200
    headers = json.loads(body)
    assert headers["x-injected"] == "yes"
    assert headers["x-from-hook"] == "GET /headers"
    assert "x-drop" not in headers
    assert seen[0].host == "tls.test" and seen[0].tls.server_name == "tls.test"
    assert seen[0].tls.alpn == "http/1.1"
    [event] = rig.events
    assert (event.kind, event.verdict, event.hostname) == ("http", "allow", "tls.test")
    assert event.detail == {"method": "GET", "host": "tls.test", "path": "/headers", "status": 200}
    assert event.bytes_down == len(body)


async def test_keep_alive_carries_several_requests(origin: tuple[int, str]) -> None:
    rig = Rig(origin)
    grant = HttpGrant(("tls.test",), HttpEdits((("X-Injected", "yes"),)))
    response = await rig.exchange(
        grant, get("/headers", close=False), get("/headers?second=1", close=True)
    )
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert [e.detail["path"] for e in rig.events] == ["/headers", "/headers"]


async def test_host_or_sni_mismatch_is_421(origin: tuple[int, str]) -> None:
    rig = Rig(origin)
    grant = HttpGrant(("tls.test",))
    status, body = status_and_body(await rig.exchange(grant, get("/headers", "other.test")))
    assert (
        status == 421 and body == b"Host other.test does not match the TLS server name tls.test\n"
    )
    status, body = status_and_body(
        await rig.exchange(grant, get("/headers", "other.test"), sni="other.test")
    )
    assert status == 421
    assert body == b"TLS server name other.test is not a name this address was granted as\n"
    assert [(e.verdict, e.detail["status"]) for e in rig.events] == [("deny", 421)] * 2


async def test_denied_or_failing_hook_is_403(origin: tuple[int, str]) -> None:
    rig = Rig(origin)

    def denies(request: HttpRequest) -> None:
        if request.path == "/admin":
            request.deny("no admin")

    def raises(request: HttpRequest) -> None:
        raise RuntimeError("broken hook")

    async def hangs(request: HttpRequest) -> None:
        await trio.sleep(30)

    status, body = status_and_body(await rig.exchange(HttpGrant(("tls.test",), on_request=denies),
                                                      get("/admin")))  # fmt: skip
    assert (status, body) == (403, b"policy: no admin\n")
    status, _ = status_and_body(
        await rig.exchange(HttpGrant(("tls.test",), on_request=denies), get("/headers"))
    )
    assert status == 200
    status, body = status_and_body(
        await rig.exchange(HttpGrant(("tls.test",), on_request=raises), get())
    )
    assert (status, body) == (403, b"the request hook raised RuntimeError: broken hook\n")
    status, body = status_and_body(
        await rig.exchange(HttpGrant(("tls.test",), on_request=hangs), get())
    )
    assert (status, body) == (403, b"the request hook took longer than 1 s\n")


async def test_secret_substituted_only_for_its_hosts(origin: tuple[int, str]) -> None:
    secrets = (
        Secret("API_TOKEN", "s3cr3t-value", hosts=("tls.test",)),
        Secret("OTHER_TOKEN", "other-value", hosts=(".elsewhere.example",)),
    )
    rig = Rig(origin, secrets)
    env = rig.book.guest_env()
    assert "s3cr3t-value" not in json.dumps(env)
    grant = HttpGrant(("tls.test",))
    auth = f"Authorization: Bearer {env['API_TOKEN']}"
    status, body = status_and_body(await rig.exchange(grant, get("/headers", "tls.test", auth)))
    assert status == 200
    assert json.loads(body)["authorization"] == (
        "sha256:" + hashlib.sha256(b"Bearer s3cr3t-value").hexdigest()
    )
    # OTHER_TOKEN is not for tls.test: not put in, and the request does not go out.
    other = f"X-Token: {env['OTHER_TOKEN']}"
    status, body = status_and_body(await rig.exchange(grant, get("/headers", "tls.test", other)))
    assert (status, body) == (403, b"secret OTHER_TOKEN may not be sent to tls.test\n")
    assert [(e.kind, e.verdict) for e in rig.events] == [("http", "allow"), ("secret", "deny")]
    assert rig.terminated == []


async def test_secret_violation_actions(origin: tuple[int, str]) -> None:
    """block: an ordinary refused request; block-and-log: a ``secret`` violation too;
    block-and-terminate: that, no answer, and the sandbox is asked to end. With several
    secrets misplaced at once, the strictest action decides."""
    hosts = (".elsewhere.example",)
    secrets = tuple(
        Secret(name, f"value-{name}", hosts=hosts, on_violation=action)
        for name, action in (("QUIET", "block"), ("LOGGED", "block-and-log"),
                             ("FATAL", "block-and-terminate"))
    )  # fmt: skip
    rig = Rig(origin, secrets)
    env = rig.book.guest_env()
    grant = HttpGrant(("tls.test",))

    async def send(*names: str) -> bytes:
        headers = [f"X-{n}: {env[n]}" for n in names]
        return await rig.exchange(grant, get("/headers", "tls.test", *headers))

    status, body = status_and_body(await send("QUIET"))
    assert (status, body) == (403, b"secret QUIET may not be sent to tls.test\n")
    assert (rig.events[-1].kind, rig.events[-1].verdict) == ("http", "deny")
    status, body = status_and_body(await send("QUIET", "LOGGED"))
    assert (status, body) == (403, b"secret QUIET, LOGGED may not be sent to tls.test\n")
    assert (rig.events[-1].kind, rig.events[-1].verdict) == ("secret", "deny")
    assert rig.terminated == []
    assert await send("LOGGED", "FATAL") == b""  # not answered: the sandbox is going away
    reason = "secret LOGGED, FATAL may not be sent to tls.test; the sandbox is terminated"
    assert (rig.events[-1].kind, rig.events[-1].reason) == ("secret", reason)
    assert rig.terminated == [reason]
    with pytest.raises(NetworkConfigError, match="on_violation 'kill'"):
        Secret("T", "x", hosts=["a.example"], on_violation="kill")


async def test_upstream_must_be_trusted_and_guest_must_speak_tls(origin: tuple[int, str]) -> None:
    rig = Rig(origin, upstream_ca=None)  # the host's store does not know the test CA
    status, body = status_and_body(await rig.exchange(HttpGrant(("tls.test",)), get()))
    assert status == 502 and b"CERTIFICATE_VERIFY_FAILED" in body
    assert rig.events[-1].verdict == "error"
    rig = Rig(origin)
    assert await rig.exchange(HttpGrant(("tls.test",)), get(), tls=False) == b""
    assert rig.events[-1].reason == "test grant; intercepted flows must be TLS"


def test_http_rules_and_secrets_are_plain_data() -> None:
    config = NetworkConfig(
        preset="deny",
        rules=(Rule("allow", "api.example", ports="443", http={"headers": {"X-Key": "v",
                                                                           "X-Drop": None}}),),
        secrets=(Secret("TOKEN", "value", hosts=["api.example", ".corp.example"]),
                 Secret("FATAL", "v", hosts=["api.example"], on_violation="block")),
        upstream_ca_file="/etc/extra.pem",
    )  # fmt: skip
    data = json.loads(json.dumps(config.to_dict()))
    assert NetworkConfig.from_dict(data) == config
    assert config.may_intercept and not NetworkConfig(preset="deny").may_intercept
    assert config.secrets[0].allowed_for("a.corp.example")
    assert not config.secrets[0].allowed_for("api.example.evil")
    assert "value" not in repr(config.secrets[0])
    for bad in (
        lambda: Rule("deny", "api.example", http={"headers": {}}),
        lambda: Rule("allow", "10.0.0.0/8", http={"headers": {}}),
        lambda: Rule("allow", "api.example", http={"headers": {"bad name": "x"}}),
        lambda: Rule("allow", "api.example", http={"headers": {"X": "a\r\nb"}}),
        lambda: Rule("allow", "api.example", http={"cookies": {}}),
        lambda: Secret("not-a-var", "x", hosts=["a.example"]),
        lambda: Secret("TOKEN", "x", hosts=[]),
        lambda: NetworkConfig(secrets=(Secret("T", "x", hosts=["a.example"]),)),
    ):
        with pytest.raises(NetworkConfigError):
            bad()


def test_http_grants_from_rules_callbacks_and_secrets() -> None:
    def flow(hostnames: tuple[str, ...]) -> Connection:
        return Connection("tcp", GUEST, Endpoint("203.0.113.30", 443), hostnames)

    rule = Rule("allow", ".example", http={"headers": {"X-Key": "v"}})
    decision = trio.run(Decider(NetworkConfig(preset="deny", rules=(rule,))).decide_flow,
                        flow(("api.example",)))  # fmt: skip
    assert isinstance(decision.grant, HttpGrant)
    assert decision.grant.names == ("api.example",)
    assert decision.grant.edits.headers == (("X-Key", "v"),)

    def decide(conn: Connection) -> None:
        if (http := conn.match_http("api.example")) is not None:
            http.accept(headers={"X-From": "callback"})
        elif conn.match_http(lambda name: name.endswith(".test")) is not None:
            conn.deny("no .test")

    config = policy(decide)
    decision = trio.run(Decider(config).decide_flow, flow(("api.example",)))
    assert isinstance(decision.grant, HttpGrant)
    assert decision.grant.edits.headers == (("X-From", "callback"),)
    assert trio.run(Decider(config).decide_flow, flow(("x.test",))).reason == "policy: no .test"
    # The name must be pinned to the address: an unpinned flow matches no match_http.
    assert trio.run(Decider(config).decide_flow, flow(())).grant is None
    # A raw grant to a secret's host becomes an interception (to put the secret in).
    secret = Secret("T", "v", hosts=["api.example"])
    config = NetworkConfig(preset="deny", rules=(Rule("allow", "*"),), secrets=(secret,))
    decision = trio.run(Decider(config).decide_flow, flow(("api.example",)))
    assert isinstance(decision.grant, HttpGrant) and decision.grant.names == ("api.example",)
    assert isinstance(trio.run(Decider(config).decide_flow, flow(("b.example",))).grant, RawGrant)


def test_cli_secret_and_upstream_ca_flags(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    args = ["--allow", "api.example:443", "--secret", "API_TOKEN=a=b@c@api.example,.corp.example",
            "--upstream-ca", "/etc/extra.pem"]  # fmt: skip
    config = network_from_args(parser.parse_args(args))
    assert config.secrets == (Secret("API_TOKEN", "a=b@c", ("api.example", ".corp.example")),)
    assert config.upstream_ca_file == "/etc/extra.pem" and config.may_intercept
    assert config.secrets[0].on_violation == "block-and-log"
    strict = network_from_args(parser.parse_args([*args, "--on-secret-violation", "block"]))
    assert strict.secrets[0].on_violation == "block"
    from_env = parse_secret("HOST_TOKEN@api.example", {"HOST_TOKEN": "from-env"})
    assert from_env.value == "from-env"
    for spec, message in (
        ("API_TOKEN=value", "use ENV=VALUE@HOST"),
        ("UNSET_HERE@api.example", "$UNSET_HERE is not set here"),
        ("bad-name=v@api.example", "give an environment variable name"),
    ):
        with pytest.raises(NetworkConfigError, match=re.escape(message)):
            parse_secret(spec, {})
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell",
         "--secret", "T=hidden-value", "--", "true"],
        cwd=REPO, env={**os.environ, "LANEKIT_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "use ENV=VALUE@HOST" in proc.stderr and "hidden-value" not in proc.stderr
    helptext = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "run", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--secret ENV=VALUE@HOST[,HOST]" in helptext and "--upstream-ca FILE" in helptext
    assert "--on-secret-violation block|block-and-log|block-and-terminate" in helptext


async def test_secret_only_interception_lets_other_protocols_through_raw(
    origin: tuple[int, str],
) -> None:
    """Where a flow is intercepted only for secrets, a flow that is not TLS is handed
    back untouched (nothing read from it) to go through raw."""
    rig = Rig(origin)
    a, b = trio.socket.socketpair()
    await a.send(b"SSH-2.0-client\r\n")
    flow = Flow(trio.SocketStream(b), GUEST, Endpoint("127.0.0.1", rig.port))
    assert not await rig.interceptor.handle(flow, HttpGrant(("tls.test",), raw_fallback=True), "r")
    assert await b.recv(100) == b"SSH-2.0-client\r\n"
    with trio.fail_after(10):  # a server-speaks-first protocol: the guest sends nothing
        grant = HttpGrant(("tls.test",), raw_fallback=True)
        assert not await rig.interceptor.handle(flow, grant, "r")
    assert rig.events == []
    a.close()
    b.close()


async def test_request_bodies_go_upstream_whole(origin: tuple[int, str]) -> None:
    rig = Rig(origin)
    body = bytes(range(256)) * 1024
    request = get("/headers", "tls.test", f"Content-Length: {len(body)}").replace(
        b"GET", b"POST", 1
    )
    status, answer = status_and_body(await rig.exchange(HttpGrant(("tls.test",)), request + body))
    assert status == 200
    assert json.loads(answer)["body"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert rig.events[0].bytes_up == len(body) and rig.events[0].detail["method"] == "POST"


class GuestTree:
    """A guest's files as a dict, for the CA installation's choices (the real guest is in
    tests/test_t9_vm_net_http.py); ``fail``: the path whose write fails."""

    def __init__(self, files: dict[str, bytes], fail: str | None = None, tool: int = 0) -> None:
        self.files = files
        self.fail = fail
        self.tool = tool
        self.ran: list[list[str]] = []

    async def read(self, path: str) -> bytes:
        return self.files[path]

    async def write(self, path: str, data: bytes | str) -> int:
        if path == self.fail:
            raise PermissionError(13, "Read-only file system", path)
        self.files[path] = data if isinstance(data, bytes) else data.encode()
        return len(data)

    async def exists(self, path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in self.files)

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        pass

    async def run(self, argv: list[str]) -> int:
        self.ran.append(argv)
        return self.tool


async def test_ca_installation_in_debian_and_bare_images() -> None:
    ca = b"-----BEGIN CERTIFICATE-----\nsandbox\n-----END CERTIFICATE-----\n"
    debian = GuestTree({
        "/etc/ssl/certs/ca-certificates.crt": b"system roots",
        "/usr/local/share/ca-certificates/.keep": b"",
        "/usr/sbin/update-ca-certificates": b"",
    })  # fmt: skip
    await install_ca(debian, debian.run, ca)
    assert debian.files["/etc/lanekit/sandbox-ca.crt"] == ca
    assert debian.files["/etc/lanekit/ca-bundle.crt"] == b"system roots\n" + ca
    assert debian.files["/usr/local/share/ca-certificates/lanekit-sandbox.crt"] == ca
    assert debian.ran == [["update-ca-certificates"]]
    bare = GuestTree({})
    await install_ca(bare, bare.run, ca)
    assert bare.files["/etc/lanekit/ca-bundle.crt"] == ca and bare.ran == []
    with pytest.raises(NetworkSetupError, match="cannot install the sandbox CA"):
        await install_ca(GuestTree({}, fail="/etc/lanekit/sandbox-ca.crt"), bare.run, ca)
    broken = GuestTree(dict(debian.files), tool=1)
    with pytest.raises(NetworkSetupError, match="update-ca-certificates failed"):
        await install_ca(broken, broken.run, ca)


async def test_a_guest_that_does_not_trust_the_ca_gets_nothing(origin: tuple[int, str]) -> None:
    rig = Rig(origin)
    other_ca = SandboxCA().certificate_pem
    assert await rig.exchange(HttpGrant(("tls.test",)), get(), trust=other_ca) == b""
    [event] = rig.events
    assert event.verdict == "error" and "TLS handshake with the guest failed" in event.reason


async def test_strange_bytes_from_the_guest_are_answered_not_fatal(origin: tuple[int, str]) -> None:
    """Header bytes HTTP allows (obs-text) go upstream as sent; a Host port that only
    looks like digits ("²") is a mismatch; neither ends the interceptor."""
    rig = Rig(origin)
    grant = HttpGrant(("tls.test",))
    raw = b"GET /headers HTTP/1.1\r\nHost: tls.test\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n"
    status, body = status_and_body(await rig.exchange(grant, raw))
    assert status == 200
    assert json.loads(body)["x-name"] == "caf\xe9"  # the origin reads it as Latin-1
    odd = "GET /headers HTTP/1.1\r\nHost: tls.test:\u00b2\r\nConnection: close\r\n\r\n"
    status, _ = status_and_body(await rig.exchange(grant, odd.encode("latin-1")))
    assert status == 421


async def test_a_header_http_refuses_never_goes_out_and_no_answer_quotes_a_secret(
    origin: tuple[int, str],
) -> None:
    """A secret whose value HTTP does not allow in a header is refused when configured
    (h11 refused it at send time, quoting the header, secret and all, in the 502 the
    guest read); a hook's invalid value is a 403 that quotes no secret."""
    for value in (" leading", "trailing ", "euro \u20ac", "bell \x07"):
        with pytest.raises(NetworkConfigError, match="printable"):
            Secret("API_TOKEN", value, hosts=("tls.test",))
    rig = Rig(origin, (Secret("API_TOKEN", "s3cr3t-value", hosts=("tls.test",)),))
    env = rig.book.guest_env()

    def hook(request: HttpRequest) -> None:
        request.headers.set("X-Bad", "ends in a space ")

    grant = HttpGrant(("tls.test",), on_request=hook)
    auth = f"Authorization: Bearer {env['API_TOKEN']}"
    response = await rig.exchange(grant, get("/headers", "tls.test", auth))
    assert status_and_body(response)[0] == 403
    assert b"s3cr3t" not in response
    assert all("s3cr3t" not in json.dumps(e.detail) + str(e.reason) for e in rig.events)


async def test_absolute_targets_are_refused_and_framing_is_never_doubled(
    origin: tuple[int, str],
) -> None:
    """A request line naming its own host (absolute form) is a 400: an upstream may heed it
    over Host, and a hook reading the path would not see it. A request with both
    Content-Length and Transfer-Encoding goes upstream chunked only (never both: a
    server trusting the length would read the rest as another request)."""
    rig = Rig(origin)
    grant = HttpGrant(("tls.test",))
    absolute = get("https://other.example/headers", "tls.test")
    status, body = status_and_body(await rig.exchange(grant, absolute))
    assert status == 400 and b"origin form" in body
    doubled = (
        b"POST /headers HTTP/1.1\r\nHost: tls.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    forwarded: list[list[tuple[str, str]]] = []
    watching = HttpGrant(("tls.test",), on_request=lambda r: forwarded.append(list(r.headers)))
    await rig.exchange(watching, doubled)  # the test origin cannot read chunked bodies
    (headers,) = forwarded
    names = [name.lower() for name, _ in headers]
    assert "content-length" not in names and "transfer-encoding" in names


def client_hello(server_name: str | None) -> bytes:
    """The ClientHello OpenSSL sends (post-quantum key shares and all, as the guest's)."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_of_a_client_hello() -> None:
    import random

    hello = client_hello("api.example.test")
    assert client_hello_server_name(hello) == "api.example.test"
    assert client_hello_server_name(hello + b"more bytes after it") == "api.example.test"
    assert client_hello_server_name(client_hello(None)) is None
    for cut in range(len(hello)):
        with pytest.raises(Incomplete):
            client_hello_server_name(hello[:cut])
    with pytest.raises(ValueError):
        client_hello_server_name(b"SSH-2.0-client\r\n")
    rng = random.Random(5)
    for _ in range(3000):  # damaged: a name, None, or a ValueError, never anything else
        data = bytearray(hello)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            result = client_hello_server_name(bytes(data))
        except ValueError:
            continue
        assert result is None or isinstance(result, str)


async def test_secret_only_interception_lets_another_site_on_the_address_through_raw(
    origin: tuple[int, str],
) -> None:
    """An address shared by a secret's host and other sites (a CDN): a flow whose TLS asks
    for another name is handed back untouched, to go through raw (it was intercepted and
    refused with 421); one asking for the secret's host is intercepted as before."""
    rig = Rig(origin)
    grant = HttpGrant(("tls.test", "cdn.test"), raw_fallback=True)
    hello = client_hello("neighbour.test")
    a, b = trio.socket.socketpair()
    await a.send(hello[:100])  # the rest arrives a moment later
    flow = Flow(trio.SocketStream(b), GUEST, Endpoint("127.0.0.1", rig.port))
    async with trio.open_nursery() as nursery:

        async def rest() -> None:
            await trio.sleep(0.05)
            await a.send(hello[100:])

        nursery.start_soon(rest)
        assert not await rig.interceptor.handle(flow, grant, "r")
    assert await b.recv(len(hello) + 10) == hello  # nothing was taken off the socket
    assert rig.events == []
    a.close()
    b.close()
    status, _ = status_and_body(await rig.exchange(grant, get(), sni="tls.test"))
    assert status == 200


async def test_a_guest_that_resets_its_connection_is_recorded_not_an_internal_error(
    origin: tuple[int, str], caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import struct

    rig = Rig(origin)
    client, accepted = await tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset, not a close
    flow = Flow(trio.SocketStream(accepted), GUEST, Endpoint("127.0.0.1", rig.port))
    with trio.fail_after(10):
        assert await rig.interceptor.handle(flow, HttpGrant(("tls.test",)), "r")
    assert [e.verdict for e in rig.events] == ["error"]
    assert "the guest's connection failed" in rig.events[0].reason
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
