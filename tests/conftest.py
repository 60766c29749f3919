"""Shared fixtures: a real SeaweedFS S3 server on loopback, isolated state directories."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockstore import S3ObjectStore
from tools.s3server import S3Server


@dataclass
class S3Endpoint:
    """What a test needs to talk to the fixture server."""

    server: S3Server
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


@pytest.fixture
def lanekit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "lanekit-home"
    monkeypatch.setenv("LANEKIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def vm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory shared by the VM tests, so the kernel and images are built once."""
    return tmp_path_factory.mktemp("vm-home")
