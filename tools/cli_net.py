"""`lanekit vm run`'s network flags, turned into a :class:`vm.net.NetworkConfig`."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from typing import Any

from vm.net import PRESETS, NetworkConfig, NetworkConfigError, parse_allow, parse_publish
from vm.net.config import VIOLATION_ACTIONS, parse_secret

NETWORK_HELP = """\
network (default: none, no network device):
  every TCP flow and DNS query of the guest goes to a proxy on this host that decides it;
  nothing else (other UDP, ICMP, IPv6) gets out. --allow rules come first, in order, then
  --policy, then the preset. Denied connections are reset; denied DNS queries are refused.
  lanekit vm run --image shell --allow example.com:80 -- wget -qO- http://example.com/
  lanekit vm run --image shell --net public-only -- wget http://example.com/
  HTTPS to a --secret's hosts is intercepted: the guest trusts a CA of this sandbox (its
  key stays here), its $ENV holds a placeholder, and the real value is put in the request
  headers on this host, only for those hosts:
  lanekit vm run --image python --allow api.example.com:443 \
      --secret API_TOKEN@api.example.com -- python3 client.py
  A request carrying a placeholder to any other host is refused (403); with
  --on-secret-violation block-and-terminate the sandbox is also killed on the spot."""


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument(
        "--net", choices=PRESETS, metavar="|".join(PRESETS),
        help="none: no network device (default); deny: a device, nothing allowed but --allow "
        "and --policy; public-only: the public internet only (no private, loopback, "
        "link-local, metadata, documentation or reserved addresses); allow-all: everything",
    )  # fmt: skip
    group.add_argument(
        "--allow", action="append", metavar="HOST[:PORT]|CIDR[:PORT]",
        help="allow TCP to this name (.example.com: and every name under it; names match "
        "only addresses the sandbox resolved them to) or address, and DNS for the name; "
        "repeatable; implies --net deny unless --net is given",
    )  # fmt: skip
    group.add_argument(
        "--dns", action="append", metavar="RESOLVER",
        help="IPv4[:PORT] of the resolver that answers the guest (default: the host's); "
        "repeatable",
    )  # fmt: skip
    group.add_argument(
        "--policy", metavar="MODULE:FUNCTION",
        help="a Python function that decides each flow and query (see vm.net.policy); "
        "implies --net deny unless --net is given",
    )  # fmt: skip
    group.add_argument(
        "--publish", action="append", metavar="[ADDRESS:]HOSTPORT:GUESTPORT",
        help="forward a host port (on 127.0.0.1 unless ADDRESS) to a guest port; repeatable; "
        "implies --net deny unless --net is given",
    )  # fmt: skip
    group.add_argument(
        "--secret", action="append", metavar="ENV=VALUE@HOST[,HOST]",
        help="the guest's $ENV holds a placeholder; in HTTPS requests to HOST (intercepted) "
        "the proxy puts VALUE in its place in the headers, and refuses requests carrying it "
        "anywhere else; ENV@HOST takes VALUE from this process's $ENV; repeatable",
    )  # fmt: skip
    group.add_argument(
        "--on-secret-violation", choices=VIOLATION_ACTIONS, default="block-and-log",
        metavar="|".join(VIOLATION_ACTIONS),
        help="when a request carries a --secret's placeholder to a host it is not for: it is "
        "refused (403) in every case; block-and-log (default) also records a 'secret' "
        "violation in the audit log and warns; block-and-terminate does that and kills the "
        "sandbox at once (the request is not answered)",
    )  # fmt: skip
    group.add_argument(
        "--upstream-ca", metavar="FILE",
        help="also trust this PEM bundle for the real servers of intercepted HTTPS",
    )  # fmt: skip
    group.add_argument(
        "--egress-netns", metavar="PATH",
        help="make upstream connections from this network namespace (/run/netns/NAME, "
        "/proc/PID/ns/net); default: this process's",
    )  # fmt: skip
    group.add_argument(
        "--net-log", metavar="FILE", help="append every decision to FILE as JSON lines"
    )


def load_policy(spec: str) -> Callable[[Any], Any]:
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise NetworkConfigError(f"--policy {spec!r}: use MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NetworkConfigError(f"--policy {spec!r}: cannot import {module_name}: {exc}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise NetworkConfigError(f"--policy {spec!r}: {module_name} has no function {name}")
    return fn


def network_from_args(args: argparse.Namespace) -> NetworkConfig:
    rules = tuple(parse_allow(spec) for spec in args.allow or ())
    callback = load_policy(args.policy) if args.policy else None
    publish = tuple(parse_publish(spec) for spec in args.publish or ())
    secrets = tuple(
        parse_secret(spec, os.environ, args.on_secret_violation) for spec in args.secret or ()
    )
    preset = args.net or ("deny" if rules or callback or publish else "none")
    if preset == "none" and (
        args.dns or args.egress_netns or args.net_log or secrets or args.upstream_ca
    ):
        raise NetworkConfigError(
            "--dns, --egress-netns, --net-log, --secret and --upstream-ca need a network: "
            "give --net or --allow"
        )
    return NetworkConfig(
        preset=preset,
        rules=rules,
        dns=tuple(args.dns or ()),
        publish=publish,
        secrets=secrets,
        upstream_ca_file=args.upstream_ca,
        egress_netns=args.egress_netns,
        log_path=args.net_log,
        callback=callback,
    )
