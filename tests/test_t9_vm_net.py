"""Sandbox networking on real boots, against a "test internet": a network namespace with
only loopback, the documentation addresses and no route elsewhere (tests/netorigins.py),
used as the egress namespace. No packet leaves this machine.

One sandbox with a default-deny policy is shared by the tests in the order they are
written (pins from an earlier lookup matter to later ones, and each says so)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netorigins import HELLO, assert_namespace_gone, internet_namespace
from vm.launcher import Sandbox
from vm.machine import SyncMachine
from vm.net import Connection, NetworkConfig, Rule
from vm.net.pins import MAX_NAMES_PER_IP

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def _free_host_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PUBLISHED = _free_host_port()


def assert_gone(inode: int, qemu_pid: int, threads: bool = True) -> None:
    """The sandbox's namespace (and with it its nft table, listeners and sockets) is freed:
    nothing holds it, qemu is gone, no name was left in /run/netns, and (``threads``) this
    process has no namespace thread left."""
    assert_namespace_gone(inode)
    # A dying process leaves its namespaces early in its exit and frees its memory after.
    deadline = time.monotonic() + 30
    while not _gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(qemu_pid)
    if threads:
        names = {t.name for t in threading.enumerate()}
        assert "lanekit-netns" not in names and "lanekit-egress" not in names


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its parent (the CLI we killed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def internet() -> Iterator[str]:
    with internet_namespace(str(REPO)) as path:
        yield path


def decide(conn: Connection) -> None:
    """The shared sandbox's policy callback (after its rules): a name only the second
    resolver knows goes to it; raise.test raises; hang.test hangs past the timeout."""
    if conn.dns is not None:
        if conn.dns.name == "raise.test":
            raise RuntimeError("the policy broke")
        if conn.dns.name == "hang.test":
            time.sleep(3)
        if (
            dns := conn.match_dns(lambda q: q.name in ("elsewhere.test", "rebind.test"))
        ) is not None:
            dns.accept(resolvers=["198.51.100.53"] if conn.dns.name == "elsewhere.test" else None)


@pytest.fixture(scope="module")
def machine(vm_home: Path, internet: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SyncMachine]:  # fmt: skip
    log = tmp_path_factory.mktemp("net") / "audit.jsonl"
    config = NetworkConfig(
        preset="deny",
        rules=(
            Rule("allow", "origin.test", ports="80"),
            Rule("allow", "198.51.100.20", ports="7"),
            Rule("allow", ".wild.test", ports="80"),
        ),
        dns=("203.0.113.53",),
        publish={PUBLISHED: 8000},
        egress_netns=internet,
        log_path=str(log),
        callback=decide,
        callback_timeout=1.0,
    )
    with Sandbox("shell", home=vm_home, memory_mib=768, network=config).run() as m:
        assert m.network is not None
        inode = m.network.namespace_inode
        qemu_pid = m._machine.qemu.pid
        yield m
    assert_gone(inode, qemu_pid)


def audit(machine: SyncMachine) -> list[dict[str, object]]:
    assert machine.network is not None and machine.network.config.log_path
    time.sleep(0.3)  # the log is written in batches by a service task
    lines = Path(machine.network.config.log_path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def sh(machine: SyncMachine, script: str, timeout: float = 30) -> tuple[int, str]:
    result = machine.exec(["sh", "-c", script + " 2>&1"], timeout=timeout)
    return result.exit_code, result.stdout.decode()


def test_none_has_no_network_device(vm_home: Path) -> None:
    with Sandbox("shell", home=vm_home).run() as m:
        assert m.network is None
        assert m.exec_text(["ls", "/sys/class/net"]).split() == ["lo"]


def test_guest_is_configured(machine: SyncMachine) -> None:
    _, route = sh(machine, "ip route")
    assert "default via 10.0.2.2 dev eth0" in route
    assert machine.read_file("/etc/resolv.conf") == b"nameserver 10.0.2.3\n"


def test_default_deny_fails_fast(machine: SyncMachine) -> None:
    """An address nothing allows (nor pins: nothing was resolved yet) is reset at once,
    other ports of an allowed address too, and a query no rule allows is refused."""
    start = time.monotonic()
    code, out = sh(machine, "wget -qO- http://203.0.113.10/hello")
    assert code != 0 and HELLO.decode() not in out
    code, out = sh(machine, "nslookup echo.test")
    assert code != 0
    assert time.monotonic() - start < 15  # refused, not timed out
    events = audit(machine)
    assert any(
        e["kind"] == "tcp" and e["verdict"] == "deny" and e["dst"] == "203.0.113.10:80"
        for e in events
    )
    assert any(e["kind"] == "dns" and e["hostname"] == "echo.test" and e["verdict"] == "deny"
               for e in events)  # fmt: skip


def test_allow_by_name_and_by_ip(machine: SyncMachine) -> None:
    code, out = sh(machine, "wget -qO- http://origin.test/hello")
    assert code == 0 and out == HELLO.decode()
    # The name's address is pinned now: the same address by IP is origin.test's.
    code, out = sh(machine, "wget -qO- http://203.0.113.10/hello")
    assert code == 0 and out == HELLO.decode()
    code, _ = sh(machine, "wget -qO- http://origin.test:8080/hello")
    assert code != 0  # the rule allows port 80 only
    code, out = sh(machine, "echo ping-by-ip | nc 198.51.100.20 7")
    assert code == 0 and out == "ping-by-ip\n"
    events = [e for e in audit(machine) if e["kind"] == "tcp" and e["verdict"] == "allow"]
    by_name = [e for e in events if e["hostname"] == "origin.test"]
    assert by_name and by_name[0]["reason"] == "rule 1: allow origin.test port 80"
    assert by_name[0]["bytes_down"] > len(HELLO)  # type: ignore[operator]
    assert any(e["reason"] == "rule 2: allow 198.51.100.20/32 port 7" for e in events)


def test_dns_through_the_chosen_resolver_and_rebinding(machine: SyncMachine) -> None:
    code, out = sh(machine, "nslookup elsewhere.test")
    assert code == 0 and "198.51.100.99" in out
    code, out = sh(machine, "nslookup rebind.test")
    assert code != 0 and "10.1.2.3" not in out
    events = audit(machine)
    assert any(e["hostname"] == "rebind.test" and e["reason"] == "DNS rebinding protection"
               for e in events)  # fmt: skip


def test_a_raising_or_hanging_policy_denies(machine: SyncMachine) -> None:
    for name in ("raise.test", "hang.test"):
        code, _ = sh(machine, f"nslookup {name}")
        assert code != 0
    reasons = {e["hostname"]: e["reason"] for e in audit(machine) if e["verdict"] == "deny"}
    assert reasons["raise.test"] == "the policy raised RuntimeError: the policy broke"
    assert reasons["hang.test"] == "the policy took longer than 1 s"


def test_only_tcp_and_dns_get_out(machine: SyncMachine) -> None:
    """UDP other than DNS and ICMP are dropped by the namespace's rules."""
    code, _ = sh(machine, "ping -c 1 -W 2 198.51.100.20")
    assert code != 0
    before = len(audit(machine))
    sh(machine, "echo x | nc -u -w 1 198.51.100.20 7; true")
    assert len(audit(machine)) == before  # not even seen: dropped in the namespace


def test_concurrent_connections(machine: SyncMachine) -> None:
    code, out = sh(
        machine,
        "for i in $(seq 200); do (echo conn$i | nc 198.51.100.20 7 >/tmp/echo.$i) & done; wait;"
        " cat /tmp/echo.* | sort -u | wc -l",
        timeout=120,
    )
    assert code == 0 and out.split()[-1] == "200"


def test_published_port_reaches_a_server_in_the_guest(machine: SyncMachine) -> None:
    machine.exec(["sh", "-c", "mkdir -p /tmp/www && echo published >/tmp/www/index.html"])
    server = machine.exec_stream(["httpd", "-f", "-p", "8000", "-h", "/tmp/www"])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                url = f"http://127.0.0.1:{PUBLISHED}/index.html"
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.read() == b"published\n"
                break
            except OSError:  # qemu takes a moment; httpd too
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        server.kill()
        server.wait()
    assert any(e["kind"] == "inbound" and e["verdict"] == "allow" for e in audit(machine))


def test_a_flood_of_names_for_one_address_stays_bounded(machine: SyncMachine) -> None:
    """A guest asking for fresh names that all resolve to one address (as wildcard DNS
    services answer) keeps at most MAX_NAMES_PER_IP pins for it, its newest answers; the
    newest name still connects, and so does a name answered again after the flood.
    Evicts origin.test's pin for 203.0.113.10: later tests must not rely on it."""
    count = MAX_NAMES_PER_IP + 36
    code, out = sh(
        machine,
        f"i=1; while [ $i -le {count} ]; do nslookup n$i.wild.test >/dev/null || exit 9; "
        f"i=$((i+1)); done; wget -qO- http://n{count}.wild.test/hello",
        timeout=120,
    )
    assert code == 0 and out == HELLO.decode()
    assert machine.network is not None
    names = machine.network.pins.names_for("203.0.113.10")
    assert len(names) == MAX_NAMES_PER_IP
    assert f"n{count}.wild.test" in names and "n1.wild.test" not in names
    assert "origin.test" not in names
    code, out = sh(machine, "wget -qO- http://origin.test/hello")
    assert code == 0 and out == HELLO.decode()
    assert "origin.test" in machine.network.pins.names_for("203.0.113.10")


def test_a_suffix_rule_never_vouches_for_loopback_or_metadata(machine: SyncMachine) -> None:
    """The shared sandbox allows .wild.test: a name under it answered with a private
    address resolves (the suffix vouches for it), one answered with loopback or the
    metadata address does not (whoever controls one name under a shared zone could point
    it at the host's services)."""
    code, out = sh(machine, "nslookup priv.wild.test")
    assert code == 0 and "10.1.2.4" in out
    for name, ip in (("loop.wild.test", "127.0.0.1"), ("meta.wild.test", "169.254.169.254")):
        code, out = sh(machine, f"nslookup {name}")
        assert code != 0 and ip not in out
        assert any(e["hostname"] == name and e["reason"] == "DNS rebinding protection"
                   for e in audit(machine))  # fmt: skip


def test_cli_flags_and_kill_9_leave_nothing(vm_home: Path, internet: str, tmp_path: Path) -> None:
    """`lanekit vm run` with --allow/--dns/--egress-netns/--net-log reaches the origin;
    killed with SIGKILL, its qemu dies and the namespace goes with it."""
    log = tmp_path / "cli.jsonl"
    env = {**os.environ, "LANEKIT_HOME": str(vm_home)}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell",
            "--allow", "origin.test:80", "--dns", "203.0.113.53", "--egress-netns", internet,
            "--net-log", str(log), "--", "sh", "-c",
            "wget -qO- http://origin.test/hello && echo fetched && sleep 600",
        ],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == HELLO
        assert proc.stdout.readline() == b"fetched\n"
        qemu = _child_named(proc.pid, "qemu-system")
        inode = os.stat(f"/proc/{qemu}/ns/net").st_ino
        assert inode != os.stat("/proc/self/ns/net").st_ino
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert_gone(inode, qemu, threads=False)
        assert any(
            json.loads(line)["hostname"] == "origin.test" for line in log.read_text().splitlines()
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _child_named(parent: int, name: str) -> int:
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and name in stat:
                return int(pid)
    raise AssertionError(f"no {name} child of {parent}")
