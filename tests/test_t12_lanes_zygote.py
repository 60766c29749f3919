"""The warm zygote that forks lane supervisors: each start gets a supervisor that is the
program ``python -m vm.lanes.supervisor`` would be (the client's environment, limits,
ignored signals, its own session, its log and answer); the zygote ends when its code
changes, when it idles, when asked, and a killed one is replaced. Supervisors here fail at
once (their lane is not in the store), which is all the plumbing needs; real lanes start
through it in every other lane test (the two-host fixture checks its log)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.blockdev import wait_for
from tests.conftest import S3Endpoint
from vm.lanes import process, zygote


def zygote_pids(home: Path) -> list[int]:
    """The live zygote of ``home``, as a list (empty or one)."""
    pid = zygote.running(home)
    return [] if pid is None else [pid]


def forks(home: Path) -> int:
    """How many supervisors the home's zygotes forked (their log says each)."""
    log = home / "lanes" / zygote.LOG
    return log.read_text().count("forked supervisor") if log.exists() else 0


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    (home / "lanes" / "ghost").mkdir(parents=True)
    try:
        yield home
    finally:
        assert zygote.stop(home)
        wait_for(lambda: not zygote_pids(home), timeout=30)


def start(home: Path, store: str = "") -> str:
    """A supervisor's answer for a lane its store does not have."""
    store = store or f"file://{home}/store"
    return process.spawn_supervisor(
        ["ghost", store], home / "lanes" / "ghost" / "supervisor.log", home, 60
    )


def no_lane(home: Path) -> str:
    return f"error: no lane named 'ghost' in file://{home}/store"


def test_a_warm_zygote_forks_every_start(home: Path) -> None:
    assert start(home) == no_lane(home)
    (first,) = zygote_pids(home)
    for _ in range(3):
        assert start(home) == no_lane(home)
    assert zygote_pids(home) == [first]  # one zygote served them all
    assert forks(home) == 4  # none fell back to a spawn
    log = (home / "lanes" / "ghost" / "supervisor.log").read_text()
    assert log.count("error: no lane named 'ghost'") == 4
    sock = home / "lanes" / zygote.SOCKET
    assert sock.stat().st_mode & 0o777 == 0o600
    assert (home / "lanes").stat().st_mode & 0o777 == 0o700


def test_a_forked_supervisor_takes_its_clients_environment_limits_and_signals(
    home: Path, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment, resource limits, ignored signals and time zone of the start that
    asked, not of the one that started the zygote; its own session, outside the zygote's
    tree."""
    bucket = s3.new_bucket()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = f"s3://{bucket}/lanes"
    assert start(home, store) == f"error: no lane named 'ghost' in {store}/"
    (zygote_pid,) = zygote_pids(home)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = start(home, store)
    assert refused.startswith("error: ") and "no lane named" not in refused, refused
    monkeypatch.setenv("TZ", "JST-9")  # a POSIX zone: no tzdata needed
    hours = {(time.gmtime().tm_hour + 9) % 24}
    start(home, store)
    hours.add((time.gmtime().tm_hour + 9) % 24)
    last = (home / "lanes" / "ghost" / "supervisor.log").read_text().splitlines()[-1]
    assert int(last[:2]) in hours, last  # its log's clock is the client's zone
    assert zygote_pids(home) == [zygote_pid] and forks(home) == 3

    # A supervisor that stays a while: it retries an endpoint nobody answers.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    read_end, write_end = os.pipe()
    pid = None
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (777, hard))
        with open(home / "lanes" / "ghost" / "supervisor.log", "ab") as f:
            env = {**os.environ, "LANEKIT_HOME": str(home)}
            pid = zygote.fork_supervisor(home, ["ghost", store], env, f.fileno(), write_end)
        assert pid is not None
        os.close(write_end)
        wait_for(lambda: Path(f"/proc/{pid}/comm").read_text() == "lane ghost\n")  # ps, top
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        parent, group, session = int(stat[1]), int(stat[2]), int(stat[3])
        assert session == group == pid  # leads its own, as a spawned supervisor does
        assert parent != zygote_pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max open files") and " 777 " in line
                   for line in limits.splitlines()), limits  # fmt: skip
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(next(li for li in status.splitlines() if li.startswith("SigIgn:"))[7:], 16)
        assert ignored & (1 << (signal.SIGHUP - 1))
    finally:
        signal.signal(signal.SIGHUP, hup)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        os.close(read_end)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=30)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def ask(home: Path, raw: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(home / "lanes" / zygote.SOCKET))
        sock.sendall(raw)
        return dict(json.loads(sock.makefile("rb").readline()))


def test_a_zygote_of_other_code_is_replaced(home: Path) -> None:
    assert start(home) == no_lane(home)
    (old,) = zygote_pids(home)
    other = json.dumps({"args": [], "fingerprint": "other code"}).encode() + b"\n"
    assert ask(home, other) == {"stale": True}
    wait_for(lambda: old not in zygote_pids(home), timeout=30)
    assert start(home) == no_lane(home)
    (new,) = zygote_pids(home)
    assert new != old and forks(home) == 2


def test_a_killed_zygote_is_replaced_and_bad_requests_are_refused(home: Path) -> None:
    assert start(home) == no_lane(home)
    (old,) = zygote_pids(home)
    for garbage in (
        b"{not json\n",
        b"[1]\n",
        b"\n",
        b'{"args": 1}\n',
        b'{"fingerprint": 3}\n',
        b"\xff" * 100 + b"\n",
    ):
        assert "error" in ask(home, garbage), garbage
    assert zygote_pids(home) == [old]  # it goes on
    assert ask(home, b'{"fingerprint": "x"}\n') == {"stale": True}  # not ours: it retires
    wait_for(lambda: not zygote_pids(home), timeout=30)
    assert start(home) == no_lane(home)
    (old,) = zygote_pids(home)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not zygote_pids(home), timeout=30)
    assert (home / "lanes" / zygote.SOCKET).exists()  # left behind by the kill
    assert start(home) == no_lane(home)
    (new,) = zygote_pids(home)
    assert new != old


def test_concurrent_first_starts_make_one_zygote(home: Path) -> None:
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(start(home))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [no_lane(home)] * 4
    log = (home / "lanes" / zygote.LOG).read_text()
    assert log.count("warm for") == 1, log  # only one ever served
    assert forks(home) == 4


@pytest.mark.parametrize("idle", ["600", "0"], ids=["forked", "spawned"])
def test_a_start_never_closes_a_descriptor_twice(
    home: Path, monkeypatch: pytest.MonkeyPatch, idle: str
) -> None:
    """A second close of a number another thread has been given since closes that
    thread's file (a concurrent start once lost its zygote socket so): alone, a second
    close is one of a number that is not open."""
    monkeypatch.setenv(zygote.IDLE_ENV, idle)
    real_close = os.close
    not_open: list[int] = []

    def close(fd: int) -> None:
        try:
            os.fstat(fd)
        except OSError:
            not_open.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "close", close)
    assert start(home) == no_lane(home)
    assert not_open == []


def test_an_idle_zygote_ends_and_zero_disables_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(zygote.IDLE_ENV, "1")
    assert start(home) == no_lane(home)
    assert forks(home) == 1
    wait_for(lambda: not zygote_pids(home), timeout=60)  # a liveness bound, not a timing
    assert not (home / "lanes" / zygote.SOCKET).exists()
    monkeypatch.setenv(zygote.IDLE_ENV, "0")
    assert start(home) == no_lane(home)  # spawned directly
    time.sleep(0.5)
    assert zygote_pids(home) == [] and forks(home) == 1
