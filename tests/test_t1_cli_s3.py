"""`lanekit s3 check` as a user runs it, against both S3 servers, a local directory and an
S3 service that ignores conditional writes (moto behind a proxy that drops the headers);
every failure is one line on stderr, never a traceback."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from blockstore.probe import VERDICT_KEY
from tests.conftest import S3Endpoint


def lanekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=120,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lanekit: error: "), proc.stderr
    return lines[0]


def test_check_passes_on_both_servers_and_saves_the_verdict(any_s3: S3Endpoint) -> None:
    bucket = any_s3.new_bucket()
    proc = lanekit("s3", "check", f"s3://{bucket}/lanes", env=any_s3.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: s3://{bucket}/lanes/ honours If-None-Match: *")
    assert f"(verdict saved as {VERDICT_KEY})" in proc.stdout
    assert len(proc.stdout.splitlines()) == 1 and proc.stderr == ""
    keys = [o["Key"] for o in any_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"lanes/{VERDICT_KEY}"], "the probe's own objects are gone"


def test_check_passes_on_a_local_directory_and_does_not_make_a_missing_one(
    tmp_path: Path,
) -> None:
    (tmp_path / "store").mkdir()
    proc = lanekit("s3", "check", f"file://{tmp_path}/store")
    assert proc.returncode == 0 and proc.stdout.startswith("ok: file://"), proc.stderr
    assert "no such directory" in one_line_error(lanekit("s3", "check", f"file://{tmp_path}/x"))
    assert not (tmp_path / "x").exists()


class _DropConditions(BaseHTTPRequestHandler):
    """Forwards every request to ``upstream`` without If-None-Match and If-Match: an S3
    service that ignores conditional writes, as some appliances do."""

    protocol_version = "HTTP/1.1"
    upstream = ""

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "if-match")
        }
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        finally:
            conn.close()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def ignores_conditions(moto_s3: S3Endpoint) -> Iterator[dict[str, str]]:
    """The environment of a client talking to moto through the header-dropping proxy."""
    handler = type("Handler", (_DropConditions,), {"upstream": moto_s3.endpoint})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield dict(moto_s3.env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_service_that_ignores_the_conditions_is_refused(
    moto_s3: S3Endpoint, ignores_conditions: dict[str, str]
) -> None:
    bucket = moto_s3.new_bucket()
    proc = lanekit("s3", "check", f"s3://{bucket}/lanes", env=ignores_conditions)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert proc.stdout.startswith(f"refused: s3://{bucket}/lanes/ is refused: it does not honour")
    assert "If-None-Match: *" in proc.stdout
    line = one_line_error(
        lanekit("disk", "create", f"s3://{bucket}/lanes/d", "--size", "1M", env=ignores_conditions)
    )
    assert "does not honour create-only puts (If-None-Match: *)" in line
    left = moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in left] == [], "nothing written: no disk, no probe, no verdict"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "case", ["not a store URL", "no bucket", "missing bucket", "wrong secret", "no server"]
)
def test_bad_input_is_one_clear_line(case: str, s3: S3Endpoint, moto_s3: S3Endpoint) -> None:
    env, url, expect = s3.env, f"s3://{s3.new_bucket()}/lanes", ""
    if case == "not a store URL":
        url, expect = "http://example.invalid/bucket", "unsupported store URL"
    elif case == "no bucket":
        url, expect = "s3:///lanes", "need a bucket"
    elif case == "missing bucket":
        env = moto_s3.env
        url, expect = f"s3://nope-{uuid.uuid4().hex[:12]}/lanes", "does not exist"
    elif case == "wrong secret":
        env, expect = dict(s3.env, AWS_SECRET_ACCESS_KEY="wrong"), "check the credentials"
    else:
        env = dict(s3.env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}")
        expect = "Could not connect"
    assert expect in one_line_error(lanekit("s3", "check", url, env=env))


def test_s3_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        for port in range(30000, 40000, 7):  # below 55535: SeaweedFS also uses port+10000
            try:
                taken.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        line = one_line_error(lanekit("s3", "serve", "--port", str(port), "--dir", str(tmp_path)))
    assert "no free block" in line
    done = lanekit("s3", "serve", "--port", "99999", "--dir", str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--port 99999: give a port from 1024 to 55534" in done.stderr
