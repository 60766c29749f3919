"""Every subcommand with malformed arguments: a non-zero exit, one clear line, never a
traceback. argparse's own refusals keep their usage line; ours are one line."""

from __future__ import annotations

import os
import subprocess
import sys
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
