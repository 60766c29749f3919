"""The `lanekit disk` commands, run as a user would (a subprocess, real exit codes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Endpoint


def lanekit(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=120,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else proc.stdout
    return proc


def test_disk_lifecycle_on_local_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    url = f"file://{store}/vol"
    created = lanekit("disk", "create", url, "--size", "8M", "--block-size", "16K")
    assert created["size"] == 8 << 20 and created["block_size"] == 16 << 10
    src = tmp_path / "src.img"
    payload = os.urandom(3 << 20)
    src.write_bytes(payload + bytes(1 << 20) + b"tail" * 100)
    lanekit("disk", "import", str(src), f"file://{store}/imported")
    info = lanekit("disk", "info", f"file://{store}/imported")
    assert info["size"] == (src.stat().st_size + 511) // 512 * 512
    assert info["stored_blocks"] == 49, "zero blocks are not stored"
    assert info["lease_holder"] is None
    assert info["format"] == 3 and info["integrity"].startswith("checksummed")
    lanekit("disk", "checkpoint", f"file://{store}/imported", "v1")
    assert lanekit("disk", "info", f"file://{store}/imported")["checkpoints"] == ["v1"]
    lanekit("disk", "fork", f"file://{store}/imported@v1", f"file://{store}/copy")
    out = tmp_path / "out.img"
    lanekit("disk", "export", f"file://{store}/copy", str(out))
    exported = out.read_bytes()
    assert exported[: src.stat().st_size] == src.read_bytes()
    lanekit("disk", "export", f"file://{store}/imported@v1", str(out))
    assert out.read_bytes() == exported
    gc = lanekit("disk", "gc", f"file://{store}", "--grace", "0")
    assert gc["deleted"] == 0
    assert gc["heads_and_checkpoints"] == 4


@pytest.mark.parametrize("damage", ["head", "segments", "packs"])
def test_export_of_a_damaged_disk_fails_with_one_line(tmp_path: Path, damage: str) -> None:
    store = tmp_path / "store"
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(512 << 10))
    lanekit("disk", "import", str(src), f"file://{store}/d")
    victim = (
        store / "disks" / "d" / "head" if damage == "head" else next((store / damage).iterdir())
    )
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x08
    victim.write_bytes(bytes(raw))
    proc = lanekit("disk", "export", f"file://{store}/d", str(tmp_path / "out"), ok=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("lanekit: error: corrupt")
    assert str(victim.relative_to(store)) in proc.stderr


def test_gc_removes_temporary_files_left_by_killed_puts(tmp_path: Path) -> None:
    """A local store writes each object to STORE/.tmp first; kill -9 mid-put leaves it there.
    GC removes such files once older than its grace, and spares younger ones (a put in
    progress)."""
    import time

    store = tmp_path / "store"
    lanekit("disk", "create", f"file://{store}/d", "--size", "1M")
    tmp = store / ".tmp"
    tmp.mkdir(exist_ok=True)
    dead = [tmp / f"dead-{i}" for i in range(3)]
    for path in dead:
        path.write_bytes(os.urandom(1000))
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    young = tmp / "young"
    young.write_bytes(b"a put in progress")
    lanekit("disk", "gc", f"file://{store}", "--dry-run")
    assert all(path.exists() for path in dead)
    lanekit("disk", "gc", f"file://{store}")
    assert not any(path.exists() for path in dead)
    assert young.exists()
    from blockstore import LocalObjectStore, collect_garbage

    os.utime(young, (time.time() - 7200, time.time() - 7200))
    assert collect_garbage(LocalObjectStore(store)).temporary_deleted == 1
    assert not young.exists()
    assert lanekit("disk", "info", f"file://{store}/d")["size"] == 1 << 20


def test_disk_create_with_base_and_info(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(1 << 20))
    url = f"file://{tmp_path}/s/d"
    created = lanekit("disk", "create", url, "--base", str(base))
    assert created["size"] == 1 << 20
    import hashlib

    assert created["base_digest"] == hashlib.sha256(base.read_bytes()).hexdigest()
    out = tmp_path / "out.img"
    proc = lanekit("disk", "export", url, str(out), ok=False)
    assert proc.returncode == 1 and "pass that image" in proc.stderr
    lanekit("disk", "export", url, str(out), "--base", str(base))
    assert out.read_bytes() == base.read_bytes()


def test_release_refuses_a_live_holder_unless_forced(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/s/d"
    lanekit("disk", "create", url, "--size", "1M")
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "hold", url, "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        proc = lanekit("disk", "release", url, ok=False)
        assert proc.returncode == 75
        assert f"pid {holder.pid}" in proc.stderr
        assert lanekit("disk", "info", url)["lease_holder"]["pid"] == holder.pid
        released = lanekit("disk", "release", url, "--force")
        assert released.startswith("disk 'd': broke the live lease of host ")
        assert f"pid {holder.pid}" in released and "fenced" in released
        assert lanekit("disk", "info", url)["lease_holder"] is None
        assert "already released" in lanekit("disk", "release", url)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "args, message",
    [
        (["disk", "info", "http://x/y"], "unsupported disk URL"),
        (["disk", "info", "file://relative/d"], "absolute path"),
        (["disk", "create", "file:///tmp/x/bad name", "--size", "1M"], "invalid disk name"),
        (["disk", "create", "file:///tmp/x/d", "--size", "-5"], "invalid size"),
        (["disk", "create", "file:///tmp/x/d", "--size", "1M", "--block-size", "3000"], "power"),
        (["disk", "info", "file://{tmp}/missing/dir/d"], "no disk named"),
        (["disk", "fork", "file:///tmp/x/d", "file:///tmp/x/e"], "needs a checkpoint"),
    ],
)
def test_bad_input_gets_a_clear_error(args: list[str], message: str, tmp_path: Path) -> None:
    proc = lanekit(*(a.format(tmp=tmp_path) for a in args), ok=False)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "missing").exists()  # looking into a store creates nothing


def test_serve_on_a_busy_address_says_so(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/d"
    lanekit("disk", "create", url, "--size", "1M")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = lanekit("disk", "serve", url, "--nbd", f"tcp:127.0.0.1:{port}", ok=False)
    assert proc.returncode == 1
    assert f"cannot listen on tcp:127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert lanekit("disk", "info", url)["lease_holder"] is None


def test_disk_commands_on_s3(s3: S3Endpoint, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/lanes/d"
    lanekit("disk", "create", url, "--size", "4M", env=s3.env)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(1 << 20))
    lanekit("disk", "import", str(src), f"s3://{bucket}/lanes/imp", env=s3.env)
    info = lanekit("disk", "info", f"s3://{bucket}/lanes/imp", env=s3.env)
    assert info["stored_blocks"] == 16
    out = tmp_path / "out"
    lanekit("disk", "export", f"s3://{bucket}/lanes/imp", str(out), env=s3.env)
    assert out.read_bytes() == src.read_bytes()


def test_demo_is_idempotent(lanekit_home: Path) -> None:
    for _ in range(2):
        out = lanekit("demo")
        assert "stored_blocks" in out
    assert (lanekit_home / "disks" / "disks" / "demo" / "head").is_file()


def _serve(url: str, sock: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "disk", "serve", url, "--nbd", f"unix:{sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()  # it says where it serves once it is up
    return proc


def _answers(sock: Path) -> bool:
    probe = subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def test_a_socket_path_in_use_is_refused_and_never_taken(tmp_path: Path) -> None:
    """A second server on a live server's socket path fails in one line (it unlinked the
    live socket and took the path); a path left by a killed server is taken; a server
    stopping removes only the socket it made."""
    for name in ("a", "b"):
        lanekit("disk", "create", f"file://{tmp_path}/s/{name}", "--size", "1M")
    sock = tmp_path / "nbd.sock"
    first = _serve(f"file://{tmp_path}/s/a", sock)
    second: subprocess.Popen[str] | None = None
    try:
        assert _answers(sock)
        refused = lanekit("disk", "serve", f"file://{tmp_path}/s/b", "--nbd", f"unix:{sock}",
                          ok=False)  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "another server is listening" in refused.stderr
        assert _answers(sock)
        first.kill()
        first.wait()
        assert sock.exists()  # left by the killed server: the next one takes it
        first = _serve(f"file://{tmp_path}/s/a", sock)
        assert _answers(sock)
        sock.unlink()  # someone takes the path away; another server binds it
        second = _serve(f"file://{tmp_path}/s/b", sock)
        first.terminate()
        first.wait(30)
        assert sock.exists() and _answers(sock), "the stopping server removed another's socket"
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
