"""vm.net's decisions without a VM: presets, first-match rules, pins, the callback's fail
closed paths, the serialisable configuration and the CLI's network flags."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tools.cli_net import add_network_arguments, network_from_args
from vm.net import (
    Connection,
    Endpoint,
    NetworkConfig,
    NetworkConfigError,
    Publish,
    Rule,
    parse_publish,
    policy,
)
from vm.net.config import parse_allow
from vm.net.decide import Decider, DnsGrant, DnsQuestion, RawGrant
from vm.net.pins import MAX_PIN_SECONDS, Pins

GUEST = Endpoint("10.0.2.15", 0)
REPO = Path(__file__).resolve().parent.parent


def flow(ip: str, port: int, names: tuple[str, ...] = ()) -> Connection:
    return Connection("tcp", GUEST, Endpoint(ip, port), names)


def query(name: str) -> Connection:
    return Connection("dns", GUEST, Endpoint("10.0.2.3", 53), dns=DnsQuestion(name, "A", "udp"))


def allowed(config: NetworkConfig, conn: Connection) -> bool:
    decider = Decider(config)
    decide = decider.decide_query if conn.dns else decider.decide_flow
    return trio.run(decide, conn).allowed


def test_presets() -> None:
    deny = NetworkConfig(preset="deny")
    assert not allowed(deny, flow("8.8.8.8", 443)) and not allowed(deny, query("example.com"))
    everything = NetworkConfig(preset="allow-all")
    assert allowed(everything, flow("127.0.0.1", 22)) and allowed(everything, query("x.test"))
    public = NetworkConfig(preset="public-only")
    assert allowed(public, flow("8.8.8.8", 443)) and allowed(public, query("example.com"))
    for ip in ("10.1.2.3", "127.0.0.1", "169.254.169.254", "100.64.0.1", "203.0.113.5", "0.1.2.3"):
        assert not allowed(public, flow(ip, 443)), ip
    assert not NetworkConfig().enabled and NetworkConfig(preset="deny").enabled


def test_rules_first_match_by_cidr_and_port() -> None:
    config = NetworkConfig(
        preset="deny", rules=(Rule("deny", "10.1.0.0/16"), Rule("allow", "10.0.0.0/8", ports="443"))
    )
    assert not allowed(config, flow("10.1.2.3", 443))
    assert allowed(config, flow("10.2.3.4", 443))
    assert not allowed(config, flow("10.2.3.4", 80))
    ranged = NetworkConfig(preset="deny", rules=(Rule("allow", "198.51.100.7", ports="8000-8010"),))
    assert allowed(ranged, flow("198.51.100.7", 8005))
    assert not allowed(ranged, flow("198.51.100.7", 8011))


def test_names_match_only_pinned_addresses() -> None:
    """A name rule allows an address only when this sandbox's DNS answered it for the name."""
    config = NetworkConfig(preset="deny", rules=(Rule("allow", "api.example.com", ports="443"),))
    assert not allowed(config, flow("203.0.113.9", 443))
    assert allowed(config, flow("203.0.113.9", 443, ("api.example.com",)))
    assert not allowed(config, flow("203.0.113.9", 443, ("evil.example.com",)))
    assert allowed(config, query("api.example.com"))  # ports do not apply to its DNS
    assert not allowed(config, query("evil.example.com"))
    suffix = NetworkConfig(preset="deny", rules=(Rule("allow", ".example.com"),))
    assert allowed(suffix, flow("203.0.113.9", 80, ("a.b.example.com",)))
    assert allowed(suffix, flow("203.0.113.9", 80, ("example.com",)))
    assert not allowed(suffix, flow("203.0.113.9", 80, ("badexample.com",)))
    blocked = NetworkConfig(preset="allow-all", block_domain_suffixes=("ads.test",))
    assert not allowed(blocked, query("x.ads.test")) and allowed(blocked, query("ads2.test"))


def test_rebinding_is_lifted_only_by_a_rule_naming_the_answer() -> None:
    config = NetworkConfig(preset="deny", rules=(Rule("allow", "db.internal"),))
    decider = Decider(config)
    assert decider.vouched("db.internal", "10.1.2.3")
    assert not decider.vouched("other.test", "10.1.2.3")
    assert config.rebind_protection and not NetworkConfig(preset="allow-all").rebind_protection
    suffix = Decider(NetworkConfig(preset="public-only", rules=(Rule("allow", ".corp.test"),)))
    assert suffix.vouched("db.corp.test", "10.1.2.3")
    for ip in ("127.0.0.1", "169.254.169.254", "169.254.1.1", "::1"):
        assert not suffix.vouched("x.corp.test", ip), ip
    exact = Decider(NetworkConfig(preset="deny", rules=(Rule("allow", "local.corp.test"),)))
    assert exact.vouched("local.corp.test", "127.0.0.1")  # the user named this very host


def test_pins_last_at_least_their_minimum() -> None:
    now = [0.0]
    pins = Pins(min_seconds=300, clock=lambda: now[0])
    pins.add(["a.test"], ["203.0.113.1"], ttl=5)
    now[0] = 299
    assert pins.names_for("203.0.113.1") == ("a.test",)
    now[0] = 301
    assert pins.names_for("203.0.113.1") == ()


def test_callback_sync_async_and_fail_closed() -> None:
    def sync_cb(conn: Connection) -> None:
        if conn.match_tcp("203.0.113.0/24:80"):
            conn.accept()
        if (dns := conn.match_dns(lambda q: q.name.endswith(".test"))) is not None:
            dns.accept(resolvers=["198.51.100.53"])

    config = policy(sync_cb)
    assert allowed(config, flow("203.0.113.10", 80))
    assert not allowed(config, flow("203.0.113.10", 81))
    grant = trio.run(Decider(config).decide_query, query("x.test")).grant
    assert grant == DnsGrant(("198.51.100.53:53",), False)

    async def async_cb(conn: Connection) -> None:
        await trio.sleep(0.01)
        if conn.dst.is_documentation():
            conn.accept()

    assert allowed(policy(async_cb), flow("198.51.100.1", 22))
    assert not allowed(policy(async_cb), flow("8.8.8.8", 22))

    def raises(conn: Connection) -> None:
        conn.accept()
        raise RuntimeError("boom")

    decision = trio.run(Decider(policy(raises)).decide_flow, flow("8.8.8.8", 1))
    assert decision.grant is None and "RuntimeError: boom" in decision.reason

    async def hangs(conn: Connection) -> None:
        await trio.sleep(30)
        conn.accept()

    decision = trio.run(Decider(policy(hangs, timeout=0.2)).decide_flow, flow("8.8.8.8", 1))
    assert decision.grant is None and "longer than 0.2 s" in decision.reason

    def denies(conn: Connection) -> None:
        conn.accept()
        conn.deny("not today")

    decision = trio.run(Decider(policy(denies)).decide_flow, flow("8.8.8.8", 1))
    assert decision.grant is None and decision.reason == "policy: not today"
    decision = trio.run(Decider(policy(lambda conn: None)).decide_flow, flow("8.8.8.8", 1))
    assert decision.grant is None and "granted nothing" in decision.reason
    accepted = trio.run(Decider(policy(lambda c: c.accept())).decide_flow, flow("8.8.8.8", 1))
    assert isinstance(accepted.grant, RawGrant)


def test_config_is_plain_data() -> None:
    config = NetworkConfig(
        preset="deny",
        rules=(Rule("allow", "Origin.TEST.", ports="80"), Rule("deny", "private")),
        dns=("203.0.113.53",),
        block_domains=("bad.test",),
        publish={18080: 80},
        log_path="/tmp/x.jsonl",
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert NetworkConfig.from_dict(data) == config
    assert config.rules[0].destination == "origin.test" and config.dns == ("203.0.113.53:53",)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"preset": "open"}, "network preset 'open'"),
        ({"preset": "deny", "rules": ({"action": "allow", "ports": "0"},)}, "ports are 1-65535"),
        ({"preset": "none", "rules": (Rule("allow", "x.test"),)}, "no network device"),
        ({"preset": "deny", "dns": ("resolver.example",)}, "give an IPv4 address"),
    ],
)
def test_bad_config_is_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(NetworkConfigError, match=message):
        NetworkConfig(**settings)


def test_bad_rules_are_refused() -> None:
    for bad in ("-bad-.test", "a..b", "http://x"):
        with pytest.raises(NetworkConfigError):
            Rule("allow", bad)
    with pytest.raises(NetworkConfigError, match="use allow or deny"):
        Rule("permit", "x.test")
    with pytest.raises(NetworkConfigError, match="unknown network settings: nope"):
        NetworkConfig.from_dict({"nope": 1})


def test_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_network_arguments(parser)
    config = network_from_args(parser.parse_args(["--allow", "origin.test:80", "--dns", "1.2.3.4"]))
    assert config.preset == "deny" and config.rules == (parse_allow("origin.test:80"),)
    assert config.dns == ("1.2.3.4:53",)
    cidr = network_from_args(parser.parse_args(["--net", "public-only", "--allow", "10.0.0.0/8"]))
    assert cidr.preset == "public-only" and cidr.rules[0].destination == "10.0.0.0/8"
    assert not network_from_args(parser.parse_args([])).enabled
    with pytest.raises(NetworkConfigError, match="need a network"):
        network_from_args(parser.parse_args(["--dns", "1.2.3.4"]))
    with pytest.raises(NetworkConfigError, match="use HOST"):
        network_from_args(parser.parse_args(["--allow", ":80"]))
    with_policy = network_from_args(parser.parse_args(["--policy", f"{__name__}:example_policy"]))
    assert with_policy.preset == "deny" and with_policy.callback is example_policy
    published = network_from_args(parser.parse_args(["--publish", "18080:80"]))
    assert published.preset == "deny" and published.publish == (Publish(18080, 80),)
    assert parse_publish("0.0.0.0:8443:443") == Publish(8443, 443, "0.0.0.0")
    for bad in ("80", "x:80", "70000:80", "host:1:2"):
        with pytest.raises(NetworkConfigError):
            parse_publish(bad)
    with pytest.raises(NetworkConfigError, match="published twice"):
        NetworkConfig(preset="deny", publish=(Publish(1, 2), Publish(1, 3)))
    with pytest.raises(NetworkConfigError, match="has no function"):
        network_from_args(parser.parse_args(["--policy", f"{__name__}:missing"]))


def example_policy(conn: Connection) -> None:
    conn.accept()


def test_cli_bad_network_flags_are_one_line_errors(tmp_path: Path) -> None:
    for flags, message in (
        (["--allow", ":80"], "--allow ':80': use HOST[:PORT] or CIDR[:PORT]"),
        (["--net-log", "/tmp/x"], "need a network"),
        (["--publish", "80"], "--publish '80'"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tools.cli", "vm", "run", "--image", "shell", *flags,
             "--", "true"],
            cwd=REPO, env={**os.environ, "LANEKIT_HOME": str(tmp_path)},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_pins_are_bounded_per_address_in_all_and_in_time() -> None:
    """The guest picks the names it asks for: pins stay bounded whatever it asks, the
    oldest answers go first, and a name answered again counts as new."""
    now = [0.0]
    pins = Pins(min_seconds=300, clock=lambda: now[0], max_names_per_ip=8, max_pins=50)
    pins.add(["kept.test"], ["203.0.113.1"], ttl=60)
    for i in range(1000):
        pins.add([f"n{i}.wild.test"], ["203.0.113.1"], ttl=60)
        if i % 5 == 0:
            pins.add(["kept.test"], ["203.0.113.1"], ttl=60)  # answered again: stays
    names = pins.names_for("203.0.113.1")
    assert len(names) == 8 and "kept.test" in names and "n999.wild.test" in names
    assert "n0.wild.test" not in names
    for i in range(200):
        pins.add([f"h{i}.test"], [f"198.51.100.{i % 250}", "203.0.113.2"], ttl=60)
    assert len(pins) == 50
    assert pins.names_for("198.51.100.199") == ("h199.test",)
    assert pins.names_for("198.51.100.0") == ()  # answered longest ago: evicted
    pins.add(["forever.test"], ["203.0.113.3"], ttl=2**31)
    now[0] = MAX_PIN_SECONDS - 1
    assert pins.names_for("203.0.113.3") == ("forever.test",)
    now[0] = MAX_PIN_SECONDS + 1
    assert pins.names_for("203.0.113.3") == ()
    assert Pins().names_for("203.0.113.9") == ()
