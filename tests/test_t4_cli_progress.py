"""Progress on long work: shown on a terminal, silent otherwise and with --quiet; imports
skip the holes of sparse files instead of reading zeros."""

from __future__ import annotations

import hashlib
import os
import pty
import subprocess
import sys
from pathlib import Path

from blockstore.sparse import data_ranges


def under_a_terminal(args: list[str], home: Path) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["LANEKIT_HOME"] = str(home)
        os.execv(sys.executable, [sys.executable, "-m", "tools.cli", *args])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_image_builds_show_their_phases_on_a_terminal_only(tmp_path: Path) -> None:
    code, out = under_a_terminal(["image", "build", "shell"], tmp_path / "a")
    assert code == 0 and b"making the ext4 filesystem" in out and b"installing busybox" in out
    code, out = under_a_terminal(["-q", "image", "build", "shell"], tmp_path / "b")
    assert code == 0 and b"making the ext4" not in out
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "image", "build", "shell"], capture_output=True,
        env={**os.environ, "LANEKIT_HOME": str(tmp_path / "c")}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and b"making" not in done.stderr + done.stdout


def test_import_reads_only_data_and_shows_a_bar(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(10 << 30)
        f.seek(5 << 30)
        f.write(os.urandom(1 << 20))
    with open(sparse, "rb") as f:
        ranges = data_ranges(f.fileno(), 10 << 30)
    assert sum(n for _, n in ranges) < 8 << 20  # the holes are not read
    url = f"file://{tmp_path}/store/imported"
    code, out = under_a_terminal(["disk", "import", str(sparse), url], tmp_path / "home")
    assert code == 0, out
    assert b"import" in out and b"B/s" in out  # the bar: bytes, rate
    exported = tmp_path / "out.raw"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "disk", "export", url, str(exported)],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(exported, "rb") as f:
        f.seek(5 << 30)
        with open(sparse, "rb") as g:
            g.seek(5 << 30)
            assert (
                hashlib.sha256(f.read(1 << 20)).digest() == hashlib.sha256(g.read(1 << 20)).digest()
            )
