"""The warm zygote that forks lane supervisors: each start gets a supervisor that is the
program ``python -m vm.lanes.supervisor`` would be (the client's environment, its own
session, its log and answer), the zygote ends when its code changes, when it idles, when
asked, and a killed one is replaced. Supervisors here fail at once (their lane is not in
the store), which is all the plumbing needs; real lanes start through it in every other
lane test."""

from __future__ import annotations

import json
import os
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
    log = (home / "lanes" / "ghost" / "supervisor.log").read_text()
    assert log.count("error: no lane named 'ghost'") == 4
    assert "warm for" in (home / "lanes" / "zygote.log").read_text()
    sock = home / "lanes" / zygote.SOCKET
    assert sock.stat().st_mode & 0o777 == 0o600
    assert (home / "lanes").stat().st_mode & 0o777 == 0o700


def test_a_forked_supervisor_is_a_session_of_its_own_with_the_clients_environment(
    home: Path, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own session and parent (not the zygote's tree), and the environment of the
    start that asked, not of the one that started the zygote."""
    bucket = s3.new_bucket()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = f"s3://{bucket}/lanes"
    assert start(home, store) == f"error: no lane named 'ghost' in {store}/"
    (zygote_pid,) = zygote_pids(home)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = start(home, store)
    assert refused.startswith("error: ") and "no lane named" not in refused, refused
    assert zygote_pids(home) == [zygote_pid]

    # A supervisor that stays a while: it retries an endpoint nobody answers.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    log = home / "lanes" / "ghost" / "supervisor.log"
    read_end, write_end = os.pipe()
    try:
        with open(log, "ab") as f:
            pid = zygote.fork_supervisor(
                home, ["ghost", store], dict(os.environ), f.fileno(), write_end
            )
        os.close(write_end)
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        parent, group, session = int(stat[1]), int(stat[2]), int(stat[3])
        assert session == group == pid  # leads its own, as a spawned supervisor does
        assert parent != zygote_pid
        assert Path(f"/proc/{pid}/comm").read_text() == "lane ghost\n"  # ps -o comm, top
    finally:
        os.kill(pid, signal.SIGKILL)
        os.close(read_end)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=30)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_a_zygote_of_other_code_is_replaced(home: Path) -> None:
    assert start(home) == no_lane(home)
    (old,) = zygote_pids(home)
    with socket.socket(socket.AF_UNIX) as sock:  # what a client of other code asks
        sock.connect(str(home / "lanes" / zygote.SOCKET))
        sock.sendall(json.dumps({"args": [], "fingerprint": "other code"}).encode() + b"\n")
        assert json.loads(sock.makefile("rb").readline()) == {"stale": True}
    wait_for(lambda: old not in zygote_pids(home), timeout=30)
    assert start(home) == no_lane(home)
    (new,) = zygote_pids(home)
    assert new != old


def test_a_killed_zygote_is_replaced_and_a_garbled_request_is_refused(home: Path) -> None:
    assert start(home) == no_lane(home)
    (old,) = zygote_pids(home)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(home / "lanes" / zygote.SOCKET))
        sock.sendall(b"{not json\n")
        assert "error" in json.loads(sock.makefile("rb").readline())
    assert zygote_pids(home) == [old]  # it goes on
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
    assert len(zygote_pids(home)) == 1


def test_an_idle_zygote_ends_and_zero_disables_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(zygote.IDLE_ENV, "1")
    assert start(home) == no_lane(home)
    wait_for(lambda: not zygote_pids(home), timeout=60)  # a liveness bound, not a timing
    assert not (home / "lanes" / zygote.SOCKET).exists()
    monkeypatch.setenv(zygote.IDLE_ENV, "0")
    assert start(home) == no_lane(home)  # spawned directly
    time.sleep(0.5)
    assert zygote_pids(home) == []
