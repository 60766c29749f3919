"""Shared fixtures: real S3 servers on loopback (SeaweedFS, and moto's server as a second,
independent implementation), isolated state directories."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockstore import S3ObjectStore
from tests.blockdev import readable
from tools.s3server import S3Server


@dataclass
class S3Endpoint:
    """What a test needs to talk to a fixture server (``server`` is an S3Server for
    SeaweedFS, a MotoServer for moto)."""

    server: Any
    endpoint: str
    client_kwargs: dict[str, Any]
    env: dict[str, str]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", **self.client_kwargs)

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def object_store(self, prefix: str = "") -> S3ObjectStore:
        return S3ObjectStore(self.new_bucket(), prefix, client=self.client())


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One SeaweedFS server for the whole session, stopped (with its children) at the end."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield S3Endpoint(server, server.endpoint, server.client_kwargs(), server.env)
    finally:
        server.stop()


_MOTO_MAIN = """
import logging, sys
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app)
logging.getLogger("werkzeug").setLevel(logging.WARNING)
app = DomainDispatcherApplication(create_backend_app)
server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
print(server.server_port, flush=True)
server.serve_forever()
"""


@dataclass
class MotoServer:
    """moto's S3 in server mode on 127.0.0.1 (a port the kernel picks), in memory.

    It answers one request at a time: moto checks a put's condition and then writes with
    no lock between, so its threaded server (moto_server's default) let two racing
    If-None-Match creates both win here (2 of 2,000 rounds of 8 threads). Serialised it is
    a faithful second implementation of S3's answers, which is what it is here for.
    """

    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "lanekit",
            "AWS_SECRET_ACCESS_KEY": "lanekit-moto-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client_kwargs(self) -> dict[str, Any]:
        from botocore.config import Config

        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": "lanekit",
            "aws_secret_access_key": "lanekit-moto-secret",
            "region_name": "us-east-1",
            "config": Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        }

    def start(self, timeout: float = 60.0) -> MotoServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _MOTO_MAIN],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        try:
            assert self.process.stdout is not None
            line = self.process.stdout.readline() if readable(self.process.stdout, timeout) else b""
            if not line.strip().isdigit():
                raise RuntimeError(f"moto's server did not start (log: {self.log_path})")
            self.port = int(line)
            import boto3

            boto3.client("s3", **self.client_kwargs()).list_buckets()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One moto S3 server for the whole session, stopped at the end."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield S3Endpoint(server, server.endpoint, server.client_kwargs(), server.env)
    finally:
        server.stop()


@pytest.fixture(params=["seaweedfs", "moto"])
def any_s3(request: pytest.FixtureRequest) -> S3Endpoint:
    """Each S3 server in turn: SeaweedFS, then moto."""
    endpoint: S3Endpoint = request.getfixturevalue(
        "s3" if request.param == "seaweedfs" else "moto_s3"
    )
    return endpoint


@pytest.fixture(autouse=True)
def lanekit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's own state directory, unless it names one: no test reads or writes the
    real ``~/.local/share/lanekit`` (a rerun on the same machine starts from nothing)."""
    home = tmp_path / "lanekit-home"
    monkeypatch.setenv("LANEKIT_HOME", str(home))
    return home


def zygote_homes() -> set[Path]:
    """Homes whose warm lane zygote runs (its forks, lane supervisors, name it too)."""
    homes = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            homes.add(Path(argv[argv.index(b"vm.lanes.zygote") + 1].decode()))
    return homes


@pytest.fixture(scope="session", autouse=True)
def no_zygote_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Lane starts leave a warm zygote for ten minutes: the session's are stopped."""
    yield
    from vm.lanes import zygote

    base = tmp_path_factory.getbasetemp().resolve()
    for home in zygote_homes():
        if home.resolve().is_relative_to(base):
            zygote.stop(home)


@pytest.fixture(scope="session")
def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory shared by the VM tests, so the kernel and images are built once."""
    return tmp_path_factory.mktemp("vm-home")
