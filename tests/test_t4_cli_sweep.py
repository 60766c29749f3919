"""Every subcommand with malformed arguments: a non-zero exit, one clear line, never a
traceback. argparse's own refusals keep their usage line; ours are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BAD: list[tuple[list[str], str]] = [
    (["s3", "serve", "--port", "99999"], "--port 99999"),
    (["s3", "serve", "--port", "80"], "--port 80"),
    (["s3", "check", "http://x/y"], "URL"),
    (["s3", "check", "file://{tmp}/no/such/dir"], ""),
    (["disk", "create", "file://{tmp}/s/d", "--size", "100000000T"], "invalid"),
    (["disk", "create", "file://{tmp}/s/d", "--size", "abc"], "invalid size"),
    (["disk", "create", "file://{tmp}/s/d", "--size", "0"], "invalid size"),
    (["disk", "create", "file://{tmp}/s/d@tag", "--size", "1G"], "disk fork"),
    (["disk", "create", "file://{tmp}/s/d", "--size", "1G", "--block-size", "3K"], "power of two"),
    (["disk", "create", "file://{tmp}/s/d"], "--size"),
    (["disk", "create", "ftp://x/y", "--size", "1G"], "unsupported"),
    (["disk", "info", "file://{tmp}/s/missing"], "no disk named"),
    (["disk", "info", "file://{tmp}/s/d@t"], "not a checkpoint"),
    (["disk", "checkpoint", "file://{tmp}/s/missing", "t1"], "no disk named"),
    (["disk", "checkpoint", "file://{tmp}/s/d", "bad tag"], "invalid"),
    (["disk", "fork", "file://{tmp}/s/d", "file://{tmp}/s/e"], "needs a checkpoint"),
    (["disk", "fork", "file://{tmp}/s/d@t", "file://{tmp}/other/e"], "same store"),
    (["disk", "gc", "file://{tmp}/no-store"], "no disks"),
    (["disk", "gc", "file://{tmp}/s", "--grace", "-1"], "--grace"),
    (["disk", "export", "file://{tmp}/s/missing", "{tmp}/out.raw"], "no disk named"),
    (["disk", "import", "{tmp}/missing.raw", "file://{tmp}/s/i"], "No such file"),
    (["disk", "release", "file://{tmp}/s/missing"], "no disk named"),
    (["disk", "serve", "file://{tmp}/s/missing", "--nbd", "unix:{tmp}/x.sock"], "no disk"),
    (["disk", "serve", "file://{tmp}/s/d", "--nbd", "tcp:8.8.8.8:10809"], "loopback"),
    (["disk", "serve", "file://{tmp}/s/d", "--nbd", "unix:{tmp}/x", "--max-connections", "0"], ""),
    (["disk", "mount", "file://{tmp}/s/d", "{tmp}/no/such/mnt"], "not a directory"),
    (["image", "build"], "exactly one"),
    (["image", "build", "--from-dir", "{tmp}/none", "--id", "x"], "not a directory"),
    (["image", "build", "--from-dir", "{tmp}", "--id=-bad"], "must match"),
    (["image", "build", "--debian", "bookworm;rm", "--id", "x"], "invalid"),
    (["image", "build", "--from-oci", "{tmp}/none.tar", "--id", "x"], ""),
    (["image", "register", "--id", "bad id", "--ref", "a/b:1", "--healthcheck", "true"], "id"),
    (["image", "register", "--id", "ok", "--ref", "-bad", "--healthcheck", "true"], ""),
    (["image", "push", "nosuch", "--store", "file://{tmp}/s"], "digest"),
    (["image", "pull", "123", "--store", "file://{tmp}/s"], "digest"),
    (["image", "pull", "0" * 64, "--store", "file://{tmp}/s"], "push it from a host"),
    (["image", "check", "nosuch"], "nosuch"),
    (["vm", "run", "--image", "shell", "--timeout", "0", "--", "true"], "--timeout"),
    (["vm", "run", "--image", "shell", "--cwd", "rel", "--", "true"], "absolute"),
    (["vm", "run", "--image", "shell", "--wait", "-1", "--", "true"], "--wait"),
    (["vm", "run", "--image", "shell"], "command"),
    (["vm", "run", "--image", "nosuch", "--", "true"], "nosuch"),
    (["vm", "run", "--image", "shell", "--env", "NOEQUALS", "--", "true"], "KEY=VALUE"),
    (["vm", "run", "--image", "shell", "--mount", "nope", "--", "true"], "--mount"),
    (["vm", "run", "--image", "shell", "--mount", "/w={tmp}/none", "--", "true"], "directory"),
    (["vm", "run", "--image", "shell", "--mount", "rel=memory", "--", "true"], "absolute"),
    (["vm", "run", "--image", "shell", "--cpus", "0", "--", "true"], "cpus"),
    (["vm", "run", "--image", "shell", "--memory", "1", "--", "true"], "memory"),
    (["vm", "run", "--image", "shell", "--disk", "bogus://x/y", "--", "true"], "unsupported"),
    (["vfs", "mount", "--memory", "{tmp}/no/such"], "not a directory"),
    (["vfs", "mount", "--passthrough", "{tmp}/none", "{tmp}"], ""),
    (["vfs", "mount", "--memory", "--max-bytes", "lots", "{tmp}"], "invalid size"),
    (["bench", "nosuch"], "unknown benchmark"),
    (["disk", "create", "file://{tmp}/s/d", "--size", "inf"], "invalid size"),
    (["disk", "create", "file://{tmp}/s/d", "--size", "nan"], "invalid size"),
    (["disk", "create", "file://{tmp}/s/", "--size", "1M"], "names a store"),
    (["disk", "create", "file://{tmp}/s/a\nb", "--size", "1M"], "line breaks"),
    (["disk", "gc", "file://{tmp}/s", "--grace", "nan"], "--grace"),
    (["disk", "checkpoint", "file://{tmp}/s/d@t1", "t2"], "without @t1"),
    (["disk", "fork", "file://{tmp}/s/nosuch@t", "file://{tmp}/s/n"], "no disk named 'nosuch'"),
    (["disk", "import", "{tmp}", "file://{tmp}/s/i"], "Is a directory"),
    (["disk", "import", "/dev/null", "file://{tmp}/s/i"], "not a regular file"),
    (["disk", "import", "{tmp}/home/../s", "file://{tmp}/s/i@tag"], "without @tag"),
    (["vm", "run", "--image", "shell", "--wait", "nan", "--", "true"], "--wait"),
    (["lane", "logs", "ghost", "-f", "--store", "file://{tmp}/s"], "no lane"),
    (["vfs", "mount", "--memory", "--max-inodes", "-1", "{tmp}"], "--max-inodes"),
    (["disk", "create", "file://{tmp}/s/b", "--size", "1M", "--base", ""], "--base"),
    (
        ["lane", "create", "l0", "--image", "shell", "--store", "file://{tmp}/s", "--cpus", "-3"],
        "cpus -3",
    ),
    (
        ["lane", "create", "l0", "--image", "shell", "--store", "file://{tmp}/s", "--memory", "0"],
        "memory 0",
    ),
]


def run(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, "LANEKIT_HOME": str(home)}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_malformed_arguments_everywhere(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = run(["disk", "create", f"file://{tmp_path}/s/d", "--size", "1M"], home)
    assert made.returncode == 0, made.stderr
    cases = [([a.format(tmp=tmp_path) for a in args], want) for args, want in BAD]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: run(case[0], home), cases))
    failures = []
    for (args, want), done in zip(cases, results, strict=True):
        err = done.stderr
        lines = [line for line in err.splitlines() if line.strip()]
        ours = [line for line in lines if not line.startswith(("usage:", " "))]
        ok = (
            done.returncode != 0
            and "Traceback" not in err + done.stdout
            and len(ours) == 1
            and want in err
        )
        if not ok:
            failures.append(f"{args}: exit {done.returncode}: {err[-600:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("helpful", [["vm", "run", "--help"], ["disk", "serve", "--help"]])
def test_help_documents_signals_and_exit_codes(helpful: list[str], tmp_path: Path) -> None:
    done = run(helpful, tmp_path)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "SIGTERM" in text and "second" in text


def test_store_errors_name_the_fix(tmp_path: Path, s3: object) -> None:
    env = dict(s3.env)  # type: ignore[attr-defined]

    def lanekit(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
            timeout=120, env={**os.environ, **env, **extra, "LANEKIT_HOME": str(tmp_path)},
        )  # fmt: skip

    for args in (
        ["disk", "info", "s3://nosuchbucket/x/y"],
        ["disk", "create", "s3://nosuchbucket/x/y", "--size", "1G"],
        ["vm", "run", "--image", "shell", "--disk", "s3://nosuchbucket/x/y", "--", "true"],
    ):  # the same verdict everywhere: a missing bucket is never made behind the user's back
        done = lanekit(*args)
        assert done.returncode == 1 and "bucket 'nosuchbucket' does not exist" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    bucket = s3.new_bucket()  # type: ignore[attr-defined]
    done = lanekit("disk", "info", f"s3://{bucket}/x/y", AWS_SECRET_ACCESS_KEY="wrong")
    assert done.returncode == 1 and "S3 refused the credentials for" in done.stderr
    assert done.stderr.count("\n") == 1


def test_failed_disk_commands_keep_what_was_there(tmp_path: Path) -> None:
    """An export that cannot finish leaves the file it was to replace; an import that
    cannot finish leaves no disk (a retry starts clean); a refused GC deletes nothing."""
    home, store = tmp_path / "home", f"file://{tmp_path}/s"
    assert run(["disk", "create", f"{store}/huge", "--size", "1000T"], home).returncode == 0
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    done = run(["disk", "export", f"{store}/huge", str(precious)], home)
    assert done.returncode == 1
    assert done.stderr.startswith(f"lanekit: error: cannot export to {precious}")
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "s"]
    unreadable = tmp_path / "secret.raw"
    unreadable.write_bytes(b"x" * 4096)
    unreadable.chmod(0)
    done = subprocess.run(  # as nobody: root reads any file
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
         "-m", "tools.cli", "disk", "import", str(unreadable), f"file://{tmp_path}/ns/i"],
        capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
        env={**os.environ, "LANEKIT_HOME": str(home)},
    )  # fmt: skip
    assert done.returncode == 1 and "cannot read" in done.stderr, done.stderr
    assert not (tmp_path / "ns").exists()
    young = run(["disk", "create", f"{store}/young", "--size", "1M"], home)
    assert young.returncode == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*"))
    assert run(["disk", "gc", store, "--grace", "nan"], home).returncode == 2
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*")) == before


def test_an_interrupted_import_leaves_no_disk(tmp_path: Path) -> None:
    """Ctrl-C once the disk is made: the half-imported disk goes, so a retry works."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(64 << 20))
    url = f"file://{tmp_path}/s/i"
    head = tmp_path / "s" / "disks" / "i" / "head"
    importing = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "disk", "import", str(source), url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "LANEKIT_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    try:
        while not head.exists():
            assert importing.poll() is None, importing.communicate()
            time.sleep(0.002)
        importing.send_signal(signal.SIGINT)
        out, err = importing.communicate(timeout=120)
    finally:
        importing.kill()
    assert importing.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert not head.exists()
    again = run(["disk", "import", str(source), url], tmp_path / "home")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("path", "content", "command"),
    [
        ("lanes.db", "garbage", ["lane", "ls"]),
        ("images/registry.json", "[]", ["image", "list"]),
        ("images/registry.json", '{"entries": {"x": 3}}', ["image", "list"]),
        ("images/registry.json", '{"entries": {"x": {"entry": {}}}}', ["image", "list"]),
    ],
)
def test_a_corrupt_state_file_names_itself(
    tmp_path: Path, path: str, content: str, command: list[str]
) -> None:
    home = tmp_path / "home"
    (home / path).parent.mkdir(parents=True, exist_ok=True)
    (home / path).write_text(content)
    done = run(command, home)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and str(home / path) in done.stderr
    assert "move it away" in done.stderr
    assert (home / path).read_text() == content
