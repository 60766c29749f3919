"""The foundation: the fixture S3 server honours the conditional writes leases depend on."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.conftest import S3Endpoint


def _status(e: ClientError) -> int:
    return int(e.response["ResponseMetadata"]["HTTPStatusCode"])


def test_put_get_roundtrip(s3: S3Endpoint) -> None:
    c = s3.client()
    bucket = s3.new_bucket()
    body = os.urandom(100_000)
    c.put_object(Bucket=bucket, Key="a/b", Body=body)
    assert c.get_object(Bucket=bucket, Key="a/b")["Body"].read() == body
    ranged = c.get_object(Bucket=bucket, Key="a/b", Range="bytes=10-19")["Body"].read()
    assert ranged == body[10:20]


def test_if_none_match_creates_once(s3: S3Endpoint) -> None:
    c = s3.client()
    bucket = s3.new_bucket()
    c.put_object(Bucket=bucket, Key="lease", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=bucket, Key="lease", Body=b"second", IfNoneMatch="*")
    assert _status(err.value) == 412
    assert c.get_object(Bucket=bucket, Key="lease")["Body"].read() == b"first"


def test_if_match_is_compare_and_swap(s3: S3Endpoint) -> None:
    c = s3.client()
    bucket = s3.new_bucket()
    etag1 = c.put_object(Bucket=bucket, Key="head", Body=b"v1")["ETag"]
    etag2 = c.put_object(Bucket=bucket, Key="head", Body=b"v2", IfMatch=etag1)["ETag"]
    assert etag2 != etag1
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=bucket, Key="head", Body=b"stale", IfMatch=etag1)
    assert _status(err.value) == 412
    assert c.get_object(Bucket=bucket, Key="head")["Body"].read() == b"v2"
    # On a missing key SeaweedFS answers 412 where AWS answers 404: both mean "lost".
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=bucket, Key="missing", Body=b"x", IfMatch=etag2)
    assert _status(err.value) in (404, 412)


def test_wrong_credentials_are_refused(s3: S3Endpoint) -> None:
    import boto3

    kwargs = dict(s3.client_kwargs, aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        boto3.client("s3", **kwargs).list_buckets()


def _weed_pids(data_dir: Path) -> set[int]:
    """SeaweedFS processes serving ``data_dir`` (not another test worker's)."""
    out = subprocess.run(["pgrep", "-f", f"weed.*{data_dir}"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
def test_s3_serve_cli_runs_until_ctrl_c(tmp_path: Path) -> None:
    import boto3

    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "s3", "serve", "--dir", str(tmp_path / "s3")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        env: dict[str, str] = {}
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.strip().startswith("export "):
                k, _, v = line.strip().removeprefix("export ").partition("=")
                env[k] = v
            if "Ctrl-C" in line:
                break
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        c = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        c.create_bucket(Bucket="cli-test")
        c.put_object(Bucket="cli-test", Key="k", Body=b"v")
        assert c.get_object(Bucket="cli-test", Key="k")["Body"].read() == b"v"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopped" in out
        assert _weed_pids(tmp_path / "s3") == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_server_leaves_no_sockets_or_logs_in_tmp(tmp_path: Path) -> None:
    from tools.s3server import S3Server

    def litter() -> set[str]:
        return {p for p in os.listdir("/tmp") if p.startswith(("seaweedfs-", "weed."))}

    before = litter()
    with S3Server(tmp_path / "s3") as server:
        server.client().list_buckets()
        grpc = {f"seaweedfs-master-grpc-{server.ports[0] + 10000}.sock"}
        assert grpc <= litter()  # weed's own choice of place, which stop() cleans up
        ours = {str(port + 10000) for port in server.ports}  # not another worker's server
    left = {p for p in litter() - before if p.startswith("weed.") or any(o in p for o in ours)}
    assert left == set()
    assert (tmp_path / "s3" / "weed.INFO").exists()  # its logs stay with its data


def test_a_start_removes_sockets_a_killed_server_left(tmp_path: Path) -> None:
    """A server killed with the process that ran it leaves its gRPC sockets in /tmp; the
    next start removes those nobody listens on, never a live server's."""
    from tools.s3server import S3Server, S3ServerError, remove_stale_sockets

    stale = Path("/tmp/seaweedfs-master-grpc-1.sock")  # port 1: never a real server's
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live = tmp_path / "seaweedfs-volume-grpc-2.sock"
    try:
        for path in (stale, live):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()  # bound, never listening: what a killed server leaves
        listening.bind(str(live))
        listening.listen()
        remove_stale_sockets(Path("/tmp"))
        assert stale.exists()  # too young: it may be a starting server's
        old = time.time() - 120
        for path in (stale, live):
            os.utime(path, (old, old), follow_symlinks=False)
        assert remove_stale_sockets(tmp_path) == []  # the live one stays
        with S3Server(tmp_path / "s3") as server:
            assert not stale.exists()
            with pytest.raises(S3ServerError, match="running already"):
                server.start()
        assert live.exists()
    finally:
        listening.close()
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def test_the_server_has_room_for_every_bucket_a_suite_makes(s3: S3Endpoint) -> None:
    """Each bucket takes a volume of its own; sized by free disk (1 GiB each) the server
    ran out after ~70 buckets and failed the rest of a CI run with InternalError."""
    import json
    import urllib.request

    from tools.s3server import MAX_VOLUMES

    master = s3.server.ports[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=10) as r:
        topology = json.load(r)["Topology"]
    assert topology["Max"] == MAX_VOLUMES
    before = topology["Free"]
    client = s3.client()
    for _ in range(3):
        bucket = s3.new_bucket()
        client.put_object(Bucket=bucket, Key="k", Body=b"v")
    with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=10) as r:
        after = json.load(r)["Topology"]["Free"]
    assert before - after == 3
    assert after > 1000


def test_the_benchmarks_delay_proxy_passes_s3_traffic_intact(s3: S3Endpoint) -> None:
    """The commit benchmark reaches SeaweedFS through DelayProxy: what goes through must
    arrive whole and in order both ways, over reused connections, and it must stop clean."""
    import boto3

    from tools.bench.delay import DelayProxy

    bucket = s3.new_bucket()
    with DelayProxy(s3.server.ports[3], 0.002) as proxy:
        client = boto3.client("s3", **{**s3.client_kwargs, "endpoint_url": proxy.endpoint})
        bodies = {f"k{i}": os.urandom(n) for i, n in enumerate((0, 1, 70_000, 3 << 20))}
        for key, body in bodies.items():
            client.put_object(Bucket=bucket, Key=key, Body=body)
        for key, body in bodies.items():
            assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        client.close()
    assert not proxy._thread.is_alive()
