"""HTTPS interception on a real boot: Python's own TLS client in the guest (the python
image), the sandbox CA in the guest's trust, HTTPS origins in the test internet with a CA
of their own (tests/netorigins.py); and a bulk download through the proxy. One sandbox is
shared by the tests; none depends on another's traffic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netorigins import internet_namespace, payload_digest
from tests.test_t9_vm_net import assert_gone
from vm.launcher import Sandbox
from vm.machine import SyncMachine
from vm.net import Connection, HttpRequest, NetworkConfig, Rule, Secret

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tok-" + hashlib.sha256(b"the real credential").hexdigest()[:24]

CLIENT = r"""
import http.client, json, socket, ssl, sys

def fetch(host, path, headers=(), sni=None, host_header=None):
    context = ssl.create_default_context()  # the guest's trust store: SSL_CERT_FILE
    raw = socket.create_connection((host, 443), timeout=20)
    tls = context.wrap_socket(raw, server_hostname=sni or host)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header or host}", "Connection: close",
             *headers]
    tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = http.client.HTTPResponse(tls)
    response.begin()
    return {"status": response.status, "body": response.read().decode()}

print(json.dumps(fetch(*json.loads(sys.argv[1]))))
"""


def hook(request: HttpRequest) -> None:
    """tls.test's request hook: a header in, /forbidden out."""
    if request.path == "/forbidden":
        request.deny("no forbidden pages")
    request.headers.set("X-Injected", f"by the host for {request.host}")


def decide(conn: Connection) -> None:
    if (dns := conn.match_dns(lambda q: q.name == "tls.test")) is not None:
        dns.accept()
    elif (http := conn.match_http("tls.test")) is not None:
        http.accept(hook)


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("origin-ca") / "ca.pem"


@pytest.fixture(scope="module")
def internet(ca_file: Path) -> Iterator[str]:
    with internet_namespace(str(REPO), str(ca_file)) as path:
        yield path


@pytest.fixture(scope="module")
def machine(vm_home: Path, ca_file: Path, internet: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncMachine]:  # fmt: skip
    log = tmp_path_factory.mktemp("net-http") / "audit.jsonl"
    config = NetworkConfig(
        preset="deny",
        rules=(
            Rule("allow", "other.test", ports="443", http={"headers": {"X-Rule": "rule"}}),
            Rule("allow", "origin.test", ports="80"),
            Rule("allow", "cdn.test", ports="443"),
            Rule("allow", "neighbour.test", ports="443"),
        ),
        dns=("203.0.113.53",),
        egress_netns=internet,
        log_path=str(log),
        upstream_ca_file=str(ca_file),
        secrets=(
            Secret("API_TOKEN", TOKEN, hosts=["tls.test"]),
            Secret("QUIET_TOKEN", "quiet-value", hosts=["tls.test"], on_violation="block"),
            Secret("CDN_TOKEN", "cdn-value", hosts=["cdn.test"]),
        ),
        callback=decide,
    )
    with Sandbox("python", home=vm_home, memory_mib=768, network=config).run() as m:
        assert m.network is not None
        inode, qemu_pid = m.network.namespace_inode, m._machine.qemu.pid
        m.write_file("/tmp/client.py", CLIENT)
        yield m
    assert_gone(inode, qemu_pid)


PEEK = r"""
import base64, socket, ssl, sys
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # we look, not trust
tls = context.wrap_socket(socket.create_connection((sys.argv[1], 443), timeout=20),
                          server_hostname=sys.argv[1])
print(base64.b64encode(tls.getpeercert(binary_form=True)).decode())
tls.sendall(f"GET /headers HTTP/1.1\r\nHost: {sys.argv[1]}\r\nConnection: close\r\n\r\n".encode())
print(tls.recv(200).split(b"\r\n")[0].decode())
"""


def fetch(machine: SyncMachine, *args: object) -> tuple[int, str]:
    result = machine.exec(["python3", "/tmp/client.py", json.dumps(args)], timeout=60)
    assert result.exit_code == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    return answer["status"], answer["body"]


def audit(machine: SyncMachine) -> list[dict[str, object]]:
    assert machine.network is not None and machine.network.config.log_path
    time.sleep(0.3)  # written in batches by a service task
    lines = Path(machine.network.config.log_path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_guest_trusts_the_sandbox_ca_and_never_holds_its_key(machine: SyncMachine) -> None:
    network = machine.network
    assert network is not None and network.ca is not None
    assert machine.read_file("/etc/lanekit/sandbox-ca.crt") == network.ca.certificate_pem
    env = machine.exec_text(["env"])
    assert "SSL_CERT_FILE=/etc/lanekit/ca-bundle.crt" in env.splitlines()
    assert "NODE_EXTRA_CA_CERTS=/etc/lanekit/sandbox-ca.crt" in env.splitlines()
    # A verified TLS connection to an intercepted name works (the guest checks our leaf).
    status, _ = fetch(machine, "tls.test", "/headers")
    assert status == 200
    # No private key anywhere the guest can read, nor in the VM's runtime directory.
    keys = machine.exec(["grep", "-rlI", "PRIVATE KEY", "/etc", "/usr/local", "/root", "/tmp"])
    assert keys.exit_code == 1 and keys.stdout == b""
    runtime = machine._machine.runtime
    host_keys = subprocess.run(["grep", "-rlI", "PRIVATE KEY", str(runtime)],
                               capture_output=True, check=False)  # fmt: skip
    assert host_keys.returncode == 1, host_keys.stdout


def test_headers_injected_by_the_policy_hook_and_by_a_rule(machine: SyncMachine) -> None:
    status, body = fetch(machine, "tls.test", "/headers")
    assert status == 200
    assert json.loads(body)["x-injected"] == "by the host for tls.test"
    status, body = fetch(machine, "other.test", "/headers", ["X-Rule: from the guest"])
    assert status == 200
    assert json.loads(body)["x-rule"] == "rule"  # the rule's value replaced the guest's
    events = [e for e in audit(machine) if e["kind"] == "http" and e["verdict"] == "allow"]
    assert {"method": "GET", "host": "other.test", "path": "/headers", "status": 200} in [
        e["detail"] for e in events
    ]
    assert any(e["reason"] == "rule 1: allow other.test port 443 http" for e in events)


def test_secret_goes_only_to_its_host_and_the_guest_never_sees_it(machine: SyncMachine) -> None:
    """API_TOKEN's action is the default, block-and-log: refused, and a ``secret`` violation."""
    placeholder = machine.exec_text(["sh", "-c", 'printf %s "$API_TOKEN"'])
    assert placeholder.startswith("lanekit-secret-API_TOKEN-") and TOKEN not in placeholder
    auth = f"Authorization: Bearer {placeholder}"
    status, body = fetch(machine, "tls.test", "/headers", [auth])
    assert status == 200
    expected = "sha256:" + hashlib.sha256(f"Bearer {TOKEN}".encode()).hexdigest()
    assert json.loads(body)["authorization"] == expected
    status, body = fetch(machine, "other.test", "/headers", [auth])
    assert (status, body) == (403, "secret API_TOKEN may not be sent to other.test\n")
    assert any(
        e["kind"] == "secret" and e["verdict"] == "deny" and e["hostname"] == "other.test"
        for e in audit(machine)
    )
    leaked = machine.exec(["sh", "-c", f"grep -rlsF {TOKEN} /proc/*/environ /tmp /etc /root"])
    assert leaked.stdout == b""


def test_secret_with_action_block_is_refused_as_a_plain_denial(machine: SyncMachine) -> None:
    placeholder = machine.exec_text(["sh", "-c", 'printf %s "$QUIET_TOKEN"'])
    status, body = fetch(machine, "other.test", "/headers", [f"X-Quiet: {placeholder}"])
    assert (status, body) == (403, "secret QUIET_TOKEN may not be sent to other.test\n")
    events = [e for e in audit(machine) if "QUIET_TOKEN" in str(e["reason"])]
    assert [(e["kind"], e["verdict"]) for e in events] == [("http", "deny")]


DOWNLOAD = r"""
import hashlib, socket, sys
size = int(sys.argv[1])
sock = socket.create_connection(("origin.test", 80), timeout=60)
request = f"GET /bytes/{size} HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
sock.sendall(request.encode())
digest, buffer, head, total = hashlib.md5(), bytearray(1 << 20), b"", 0
view = memoryview(buffer)
while n := sock.recv_into(buffer):
    if head is not None:
        head += bytes(view[:n])
        if b"\r\n\r\n" not in head:
            continue
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        head = None
        digest.update(body)
        total += len(body)
    else:
        digest.update(view[:n])
        total += n
print(total, digest.hexdigest())
"""


def test_bulk_download_is_intact(machine: SyncMachine) -> None:
    """256 MiB through the proxy, checksummed in the guest as they stream in: no file, and
    only the digest crosses the agent's channel. One Python process (no pipe) and MD5
    (it finds corruption as surely as SHA-256): the cheapest way under TCG, measured."""
    size = 256 << 20
    result = machine.exec(["python3", "-c", DOWNLOAD, str(size)], timeout=300)
    assert result.exit_code == 0, result.stderr.decode()
    assert result.stdout.decode().split() == [str(size), payload_digest(size, "md5")]


TERMINATED = r"""
import os, socket, ssl, time
raw = socket.create_connection(("tls.test", 443), timeout=20)
tls = ssl.create_default_context().wrap_socket(raw, server_hostname="tls.test")
print("sending", flush=True)
request = f"GET /headers HTTP/1.1\r\nHost: tls.test\r\nX-Token: {os.environ['KILL_TOKEN']}\r\n\r\n"
tls.sendall(request.encode())
try:
    tls.recv(65536)
except OSError:
    pass
print("survived", flush=True)
time.sleep(600)
"""


def test_secret_with_block_and_terminate_kills_the_sandbox(
    vm_home: Path, ca_file: Path, internet: str, tmp_path: Path
) -> None:
    """`vm run --on-secret-violation block-and-terminate`: the guest sends KILL_TOKEN's
    placeholder to tls.test (intercepted by the policy; the secret is for other.test): the
    request gets no answer, the VM is killed at once and the command fails saying why."""
    log = tmp_path / "net.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vm", "run", "--image", "python",
         "--policy", f"{__name__}:decide", "--dns", "203.0.113.53", "--egress-netns", internet,
         "--upstream-ca", str(ca_file), "--net-log", str(log),
         "--secret", "KILL_TOKEN=kill-value@other.test",
         "--on-secret-violation", "block-and-terminate",
         "--", "python3", "-c", TERMINATED],
        cwd=REPO, env={**os.environ, "LANEKIT_HOME": str(vm_home)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    reason = "secret KILL_TOKEN may not be sent to tls.test; the sandbox is terminated"
    assert proc.returncode == 1, proc.stderr
    # The kill races the agent's relay of "sending": what is certain is nothing after it.
    assert proc.stdout in ("", "sending\n"), proc.stdout
    assert f"lanekit: terminated: {reason}" in proc.stderr
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr  # said once
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["kind"] == "secret" and e["reason"] == reason for e in events)


def test_host_or_sni_mismatch_is_421_and_a_denied_request_403(machine: SyncMachine) -> None:
    status, body = fetch(machine, "tls.test", "/headers", [], None, "other.test")
    assert status == 421 and "does not match the TLS server name tls.test" in body
    # The guest asks tls.test's address for other.test: a name not pinned to it.
    status, body = fetch(machine, "tls.test", "/headers", [], "other.test", "other.test")
    assert status == 421 and "other.test is not a name this address was granted as" in body
    status, body = fetch(machine, "tls.test", "/forbidden")
    assert (status, body) == (403, "policy: no forbidden pages\n")
    statuses = [e["detail"].get("status") for e in audit(machine) if e["kind"] == "http"]  # type: ignore[union-attr]
    assert 421 in statuses and 403 in statuses


def test_another_site_on_a_secret_hosts_address_goes_through_raw(machine: SyncMachine) -> None:
    """cdn.test (CDN_TOKEN's host) and neighbour.test share one address, both allowed:
    a connection to neighbour.test is not intercepted (the guest sees the site's own
    certificate, and its answer), where it got the sandbox's leaf and a 421; cdn.test
    still is (the secret can be put in)."""
    import base64

    from cryptography import x509

    assert machine.network is not None and machine.network.ca is not None
    sandbox_ca = x509.load_pem_x509_certificate(machine.network.ca.certificate_pem).subject
    machine.write_file("/tmp/peek.py", PEEK)

    def peek(name: str) -> tuple[x509.Name, str]:
        result = machine.exec(["python3", "/tmp/peek.py", name], timeout=60)
        assert result.exit_code == 0, result.stderr.decode()
        der, status = result.stdout.decode().splitlines()[:2]
        return x509.load_der_x509_certificate(base64.b64decode(der)).issuer, status

    issuer, status = peek("cdn.test")  # pins cdn.test to the shared address first
    assert issuer == sandbox_ca and status == "HTTP/1.1 200 OK"
    assert "cdn.test" in machine.network.pins.names_for("203.0.113.32")
    issuer, status = peek("neighbour.test")
    assert issuer != sandbox_ca, "intercepted: another site on a secret host's address"
    assert status == "HTTP/1.1 200 OK"
    assert set(machine.network.pins.names_for("203.0.113.32")) == {"cdn.test", "neighbour.test"}
