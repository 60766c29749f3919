"""``lanekit vm run`` as a user runs it: streamed output, stdin, exit codes, signals, a
real terminal, long commands, and durable disks across Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .blockdev import readable, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def lanekit(home: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LANEKIT_HOME": str(home)}
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "tools.cli", *args], env=env, capture_output=True,
        timeout=600, **kwargs,
    )  # fmt: skip


def background(home: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LANEKIT_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "tools.cli", *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_streams_stdin_and_exit_codes(vm_home: Path) -> None:
    data = os.urandom(3 << 20)
    done = lanekit(vm_home, "vm", "run", "--image", "shell", "--memory", "256", "--",
                   "sha256sum", input=data)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    size = 20 << 20
    script = f"head -c {size} /dev/zero; head -c {size} /dev/zero >&2; kill -TERM $$"
    done = lanekit(vm_home, "vm", "run", "--image", "shell", "--memory", "256", "--",
                   "sh", "-c", script)  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stdout == bytes(size)  # never cut at 16 MiB
    assert done.stderr == bytes(size)


def test_bad_arguments_are_one_line(vm_home: Path) -> None:
    for args, message in (
        (["--timeout", "0"], b"--timeout 0"),
        (["--timeout", "-3"], b"positive"),
        (["--cwd", "relative"], b"absolute guest path"),
        (["--wait", "-1"], b"--wait"),
    ):
        done = lanekit(vm_home, "vm", "run", "--image", "shell", *args, "--", "true")
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
        assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1
    done = lanekit(vm_home, "vm", "run", "--help")
    for word in (b"--tty", b"--interactive", b"--force", b"--wait", b"75", b"128+N", b"examples"):
        assert word in done.stdout, word


def test_interactive_shell_under_a_real_terminal(vm_home: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["LANEKIT_HOME"] = str(vm_home)
        os.execv(sys.executable, [sys.executable, "-m", "tools.cli", "vm", "run", "-it",
                                  "--image", "shell", "--memory", "256", "--", "sh"])  # fmt: skip
    seen = b""

    def until(marker: bytes, timeout: float = 180) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            if readable(fd, 1):
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break

    try:
        until(b"# ")  # busybox sh's prompt for root
        os.write(fd, b"echo $((40+2)); stty size\n")
        until(b"42")
        until(b"\n", 10)
        os.write(fd, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_sigterm_keeps_unsynced_data_and_frees_the_disk(vm_home: Path, tmp_path: Path) -> None:
    """A file written without sync, then SIGTERM: the guest syncs and powers off, the disk
    is flushed and released; the next boot starts at once and finds the file."""
    url = f"file://{tmp_path}/disks/kept"
    proc = background(vm_home, "vm", "run", "--image", "shell", "--memory", "256",
                      "--disk", url, "--", "sh", "-c",
                      "echo unsynced > /root/f; echo written; sleep 600")  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"written\n"
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stderr is not None and b"passed to the command" in proc.stderr.read()
    done = lanekit(vm_home, "vm", "run", "--image", "shell", "--memory", "256",
                   "--disk", url, "--", "cat", "/root/f")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"unsynced\n"), done.stderr


def test_a_second_signal_stops_at_once(vm_home: Path, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/disks/hurry"
    proc = background(vm_home, "vm", "run", "--image", "shell", "--memory", "256",
                      "--disk", url, "--", "sh", "-c",
                      "trap '' TERM INT; echo up; while :; do sleep 1; done")  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGTERM)  # ignored by the command
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert b"again: stopping at once" in err and b"Traceback" not in err
    assert proc.returncode == 130
    done = lanekit(vm_home, "disk", "info", url)
    assert b'"lease_holder": null' in done.stdout, done.stdout


def test_kill_minus_nine_leaves_no_vm(vm_home: Path) -> None:
    def ours() -> list[str]:
        out = subprocess.run(["pgrep", "-af", "lanekit-vm-"], capture_output=True, text=True)
        return [p for p in out.stdout.splitlines() if "qemu-system" in p and str(vm_home) in p]

    before = set(ours())
    proc = background(vm_home, "vm", "run", "--image", "shell", "--memory", "256",
                      "--mount", "/w=memory", "--", "sh", "-c", "echo up; sleep 600")  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    time.sleep(12)  # long enough for an idle worker thread to have retired
    assert set(ours()) - before, "the VM died while its launcher lived"
    proc.kill()
    proc.wait()
    wait_for(lambda: set(ours()) <= before, timeout=30)


def test_a_registered_image_says_how_to_build_it(vm_home: Path, tmp_path: Path) -> None:
    """Every command an error suggests is one that works."""
    home = tmp_path / "home"
    home.mkdir()
    (vm_home / "kernels").mkdir(parents=True, exist_ok=True)
    (home / "kernels").symlink_to(vm_home / "kernels")  # a kernel is the host's, not the image's
    done = lanekit(home, "image", "register", "--id", "go", "--ref", "golang:1.23",
                   "--healthcheck", "true")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = lanekit(home, "vm", "run", "--image", "go", "--", "true")
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    message = done.stderr.decode()
    assert "lanekit image build --from-dir DIR --id go" in message
    assert "lanekit image build go`" not in message  # the CLI refuses that one
    tree = tmp_path / "tree" / "bin"
    tree.mkdir(parents=True)
    (tree / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    os.chmod(tree / "busybox", 0o755)
    (tree / "sh").symlink_to("busybox")
    (tree / "true").symlink_to("busybox")
    done = lanekit(home, "image", "build", "--from-dir", str(tmp_path / "tree"), "--id", "go")
    assert done.returncode == 0, done.stderr
    done = lanekit(
        home, "vm", "run", "--image", "go", "--memory", "256", "--", "sh", "-c", "echo ok"
    )
    assert (done.returncode, done.stdout) == (0, b"ok\n"), done.stderr
