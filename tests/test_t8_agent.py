"""The guest agent's protocol and the real agent, run on the host over a socket pair.

The agent is the same code the guest runs (packaged the way the runtime packages it and
started under the host's Python with ``-S``); only the transport differs (a socket instead
of a virtio-serial port). The VM tests (test_t9_vm_agent.py) repeat the essentials on
real boots.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vm.agent import AgentSession, protocol, runtime
from vm.agent.fs import GuestFS
from vm.agent.patches import Patch, PatchError, apply_patches
from vm.agent.runtime import install_for_host_tests
from vm.errors import GuestAgentError

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class HostAgent:
    def __init__(self, session: AgentSession, proc: subprocess.Popen[bytes]) -> None:
        self.session = session
        self.proc = proc

    def rss_peak(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


def _agent_process(tmp_path: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """The agent, packaged as for the guest, on one end of a socket pair."""
    package = install_for_host_tests(tmp_path / "agent-src")
    ours, theirs = socket.socketpair()
    code = "import sys; sys.path.insert(0, sys.argv[1]); from lanekit_agent.guest import main; "
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-S", "-c", code + "main(sys.argv[2:])", str(package),
         "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
    )  # fmt: skip
    theirs.close()
    return ours, proc


async def start_agent(tmp_path: Path, nursery: trio.Nursery) -> HostAgent:
    ours, proc = await trio.to_thread.run_sync(_agent_process, tmp_path)
    session = AgentSession("(socket pair)")
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    await session.open(nursery, stream=stream, timeout=20)
    return HostAgent(session, proc)


@pytest.fixture
async def agent(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[HostAgent]:
    host = await start_agent(tmp_path, nursery)
    try:
        yield host
    finally:
        await host.session.aclose()
        host.proc.wait(10)


# ------------------------------------------------------------ the wire format


def test_values_round_trip() -> None:
    value = {
        "a": None, "b": True, "c": False, "d": -(1 << 62), "e": 1.5, "f": "text \u00e9",
        "g": b"\x00\xff", "h": [1, [2, {"x": "y"}]], "i": {}, "j": [],
    }  # fmt: skip
    assert protocol.unpack(protocol.pack(value)) == value


def test_malformed_values_are_protocol_errors() -> None:
    good = protocol.pack({"op": "spawn", "argv": ["sh", "-c", "true"], "env": {"A": "b"}})
    rng = random.Random(7)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randrange(len(data) + 1)]) if rng.random() < 0.3 else bytes(data)
        try:
            protocol.unpack(cut)
        except protocol.ProtocolError:
            pass
    for bad in (
        b"",
        b"X",
        b"s\xff\xff\xff\xff",
        b"l\xff\xff\xff\x7f",
        b"d\x01\x00\x00\x00i" + bytes(8),
    ):
        with pytest.raises(protocol.ProtocolError):
            protocol.unpack(bad)
    deep: object = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(protocol.ProtocolError):
        protocol.pack(deep)


def test_frames_split_anywhere_and_bad_headers() -> None:
    frames = b"".join(
        protocol.message(protocol.REPLY, i, {"ok": i}) for i in range(50)
    ) + protocol.data_frame(3, protocol.STDOUT, 0, b"x" * 100000)
    reader = protocol.FrameReader()
    got = []
    pos = 0
    rng = random.Random(1)
    while pos < len(frames):
        step = rng.randint(1, 5000)
        reader.feed(frames[pos : pos + step])
        pos += step
        got += reader.frames()
    assert len(got) == 51 and got[-1][0] == protocol.DATA
    reader = protocol.FrameReader()
    reader.feed(b"\x00" * 12)
    with pytest.raises(protocol.ProtocolError, match="bad frame header"):
        reader.frames()
    reader = protocol.FrameReader()
    reader.feed(protocol.HEADER.pack(protocol.MAGIC, protocol.DATA, 0, 1, protocol.MAX_PAYLOAD + 1))
    with pytest.raises(protocol.ProtocolError, match="announces"):
        reader.frames()


async def test_a_peer_that_answers_garbage_is_a_clear_error(nursery: trio.Nursery) -> None:
    """The guest is untrusted: garbage, an oversized frame or a malformed value ends the
    session with a GuestAgentError, never an exception from deep inside the parser."""
    for garbage in (
        b"\x00" * 64,
        protocol.HEADER.pack(protocol.MAGIC, protocol.REPLY, 0, 0, 1 << 30),
        protocol.frame(protocol.REPLY, 0, b"\xff\xfe"),
    ):
        ours, theirs = socket.socketpair()
        session = AgentSession("(fake)")
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))

        async def fake_guest(sock: socket.socket = theirs, junk: bytes = garbage) -> None:
            hello = await trio.to_thread.run_sync(sock.recv, 65536)
            nonce = protocol.parse_message(hello[protocol.HEADER.size :])["nonce"]
            answer = {"magic": protocol.HELLO_MAGIC, "version": 1, "nonce": nonce, "session": "s"}
            sock.sendall(protocol.message(protocol.HELLO, 0, answer))
            await trio.sleep(0.2)
            sock.sendall(junk)

        nursery.start_soon(fake_guest)
        await session.open(nursery, stream=stream, timeout=10)
        with pytest.raises(GuestAgentError, match=r"invalid|broke|closed"):
            with trio.fail_after(10):
                await session.call("stat", path="/")
        await session.aclose()
        theirs.close()


async def test_a_broken_session_lets_go_of_its_connection(nursery: trio.Nursery) -> None:
    """qemu's agent socket serves one client at a time: a session whose HELLO went
    unanswered, or whose peer sent garbage, closes its end at once (else the next
    session's HELLO waits behind it), and a send queued behind a blocked one while the
    session closes is a GuestAgentError, not an AttributeError."""
    ours, theirs = socket.socketpair()
    session = AgentSession("(fake)")
    with pytest.raises(GuestAgentError, match="did not answer"):
        await session.open(
            nursery, stream=trio.SocketStream(trio.socket.from_stdlib_socket(ours)), timeout=0.3
        )
    theirs.settimeout(10)
    while theirs.recv(65536):  # the HELLO, then the end: the session let go
        pass
    theirs.close()

    ours, theirs = socket.socketpair()
    session = AgentSession("(fake)")
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))

    async def guest_that_stops_reading() -> None:
        hello = await trio.to_thread.run_sync(theirs.recv, 65536)
        nonce = protocol.parse_message(hello[protocol.HEADER.size :])["nonce"]
        answer = {"magic": protocol.HELLO_MAGIC, "version": 1, "nonce": nonce, "session": "s"}
        theirs.sendall(protocol.message(protocol.HELLO, 0, answer))

    nursery.start_soon(guest_that_stops_reading)
    await session.open(nursery, stream=stream, timeout=10)
    outcomes: list[BaseException] = []

    async def send_blob() -> None:
        try:
            await session._send(protocol.frame(protocol.CONTROL, 1, bytes(1 << 20)))
        except BaseException as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as senders:
        for _ in range(3):  # the first blocks (nobody reads); the others wait for the lock
            senders.start_soon(send_blob)
        await trio.sleep(0.2)
        await session.aclose()
    assert len(outcomes) == 3
    assert all(isinstance(e, GuestAgentError) for e in outcomes), outcomes
    theirs.close()


async def test_a_socket_nobody_listens_on_is_an_error_not_a_wait_forever(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    left = tmp_path / "agent.sock"  # what a killed supervisor leaves: a socket file, no server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(left))
    sock.close()
    for path in (left, tmp_path / "absent.sock"):
        with pytest.raises(GuestAgentError, match="cannot connect to the guest agent"):
            await AgentSession(str(path)).open(nursery, timeout=0.3)


def test_version_mismatch_is_named(tmp_path: Path) -> None:
    """A host speaking another protocol version gets an answer that says so."""
    ours, proc = _agent_process(tmp_path)
    try:
        ours.sendall(protocol.message(protocol.HELLO, 0, {"versions": [99], "nonce": "n"}))
        reader = protocol.FrameReader()
        ours.settimeout(20)
        while True:
            reader.feed(ours.recv(65536))
            answers = [f for f in reader.frames() if f[0] == protocol.HELLO]
            if answers:
                break
        hello = protocol.parse_message(answers[0][2])
        assert hello["nonce"] == "n" and "speaks protocol 1, not [99]" in str(hello["error"])
    finally:
        ours.close()
        proc.wait(10)


# ------------------------------------------------------------ processes


async def test_exec_basics_and_failures(agent: HostAgent) -> None:
    s = agent.session
    h = await s.spawn(["sh", "-c", "echo out; echo err >&2; exit 3"], env=ENV, cwd="/")
    exit_event, out, err = await h.collect()
    assert (exit_event.exit_code, out, err) == (3, b"out\n", b"err\n")
    exit_event, _, err = await (await s.spawn(["no-such-command"], env=ENV, cwd="/")).collect()
    assert exit_event.exit_code == 127 and b"command not found" in err
    exit_event, _, err = await (await s.spawn(["true"], env=ENV, cwd="/no/such/dir")).collect()
    assert exit_event.exit_code == 126 and b"cannot change to directory" in err
    with pytest.raises(GuestAgentError, match="unknown user"):
        await s.spawn(["true"], env=ENV, cwd="/", user="no-such-user-here")
    with pytest.raises(GuestAgentError, match="argv"):
        await s.spawn([], env=ENV, cwd="/")
    h = await s.spawn(["sleep", "30"], env=ENV, cwd="/")
    with pytest.raises(GuestAgentError, match="not a signal"):
        await h.signal(0)
    await h.signal(signal.SIGINT)
    assert (await h.wait()).exit_code == 130
    h = await s.spawn(["sh", "-c", "echo $HOME $0", "name"], env={**ENV, "HOME": "/h"}, cwd="/")
    assert (await h.collect())[1] == b"/h name\n"
    h = await s.spawn(["id", "-u"], env=ENV, cwd="/", user="nobody")
    assert (await h.collect())[1].strip() == b"65534"


async def test_timeout_kills_the_command(agent: HostAgent) -> None:
    h = await agent.session.spawn(["sleep", "60"], env=ENV, cwd="/", timeout=0.5)
    exit_event = await h.wait()
    assert exit_event.timed_out and exit_event.signal == signal.SIGKILL
    h = await agent.session.spawn(["true"], env=ENV, cwd="/")
    assert (await h.wait()).exit_code == 0


async def test_big_output_streams_with_bounded_memory(agent: HostAgent) -> None:
    """200 MB through a consumer that hashes as it goes: the agent's peak memory stays
    about its window, whatever the producer's speed."""
    size = 200 << 20
    h = await agent.session.spawn(["head", "-c", str(size), "/dev/urandom"], env=ENV, cwd="/")
    digest = hashlib.sha256()
    total = 0
    async for event in h:
        if event.kind == "stdout":
            digest.update(event.data)
            total += len(event.data)
            if total < (8 << 20):
                await trio.sleep(0.001)  # a slow consumer at first: the producer must wait
    assert total == size and h.exit is not None and h.exit.exit_code == 0
    assert agent.rss_peak() < 80 << 20


async def test_stdout_and_stderr_each_in_order(agent: HostAgent) -> None:
    script = "i=0; while [ $i -lt 3000 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done"
    _, out, err = await (
        await agent.session.spawn(["sh", "-c", script], env=ENV, cwd="/")
    ).collect()
    assert out.decode().split() == [f"o{i}" for i in range(3000)]
    assert err.decode().split() == [f"e{i}" for i in range(3000)]


async def test_stdin_round_trip(agent: HostAgent) -> None:
    data = os.urandom(50 << 20)
    h = await agent.session.spawn(["sha256sum"], env=ENV, cwd="/")
    async with trio.open_nursery() as nursery:

        async def feed() -> None:
            for i in range(0, len(data), 1 << 20):
                await h.stdin.write(data[i : i + (1 << 20)])
            await h.stdin.close()

        nursery.start_soon(feed)
        _, out, _ = await h.collect()
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    h = await agent.session.spawn(["head", "-c", "10"], env=ENV, cwd="/")
    async with trio.open_nursery() as nursery:

        async def flood() -> None:  # head exits after 10 bytes: stdin is then closed
            with pytest.raises(BrokenPipeError):
                for _ in range(200):
                    await h.stdin.write(b"y" * (1 << 20))

        nursery.start_soon(flood)
        _, out, _ = await h.collect()
    assert out == b"y" * 10


async def test_fifty_concurrent_processes(agent: HostAgent) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        h = await agent.session.spawn(
            ["sh", "-c", f"sleep 0.$((RANDOM % 5)); head -c {i * 1000} /dev/zero | wc -c"],
            env=ENV, cwd="/",
        )  # fmt: skip
        results[i] = (await h.collect())[1]

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert results == {i: f"{i * 1000}\n".encode() for i in range(50)}


async def test_pty_sessions(agent: HostAgent) -> None:
    h = await agent.session.spawn(
        ["sh", "-c", "stty size; tty"], env=ENV, cwd="/", tty=True, rows=33, cols=101
    )
    _, out, _ = await h.collect()
    assert out.startswith(b"33 101\r\n/dev/pts/")
    h = await agent.session.spawn(["sh", "-i"], env={**ENV, "PS1": "prompt$ "}, cwd="/", tty=True)
    seen = b""

    async def until(marker: bytes) -> None:
        nonlocal seen
        while marker not in seen:
            event = await h.__anext__()
            seen += event.data

    with trio.fail_after(20):
        await until(b"prompt$ ")
        await h.stdin.write(b"echo $((6*7))\n")
        await until(b"42")
        await h.resize(50, 132)
        await h.stdin.write(b"stty size\n")
        await until(b"50 132")
        await h.stdin.write(b"sleep 30\n")
        await trio.sleep(0.3)
        await h.signal(signal.SIGINT)  # to the terminal's foreground job: sleep, not sh
        await h.stdin.write(b"echo back\n")
        await until(b"back")
        await h.stdin.write(b"exit 4\n")
        assert (await h.wait()).exit_code == 4


# ------------------------------------------------------------ files


async def test_files(agent: HostAgent, tmp_path: Path) -> None:
    fs = GuestFS(lambda: _ready(agent.session))
    base = tmp_path / "guest"
    base.mkdir()
    big = os.urandom(9 << 20)
    assert await fs.write(f"{base}/big", big) == len(big)
    assert await fs.read(f"{base}/big") == big
    await fs.write(f"{base}/big", b"!", append=True)
    assert (await fs.stat(f"{base}/big")).size == len(big) + 1
    await fs.mkdir(f"{base}/a/b/c", parents=True)
    await fs.write(f"{base}/a/b/c/f", "text", mode=0o600)
    info = await fs.stat(f"{base}/a/b/c/f")
    assert (info.kind, info.mode, info.size) == ("file", 0o600, 4)
    await fs.copy(f"{base}/a", f"{base}/a2", recursive=True)
    assert await fs.read(f"{base}/a2/b/c/f") == b"text"
    await fs.rename(f"{base}/a2", f"{base}/a3")
    assert [e.path.rsplit("/", 1)[1] for e in await fs.list(str(base))] == ["a", "a3", "big"]
    await fs.symlink("a/b", f"{base}/link")
    assert await fs.readlink(f"{base}/link") == "a/b"
    assert (await fs.stat(f"{base}/link", follow_symlinks=False)).kind == "symlink"
    await fs.remove(f"{base}/a3", recursive=True)
    assert not await fs.exists(f"{base}/a3")
    with pytest.raises(FileNotFoundError) as missing:
        await fs.read(f"{base}/nope")
    assert missing.value.filename == f"{base}/nope"
    with pytest.raises(IsADirectoryError):
        await fs.read(str(base))
    with pytest.raises(OSError, match="Directory not empty"):
        await fs.remove(f"{base}/a")
    os.mkfifo(base / "fifo")  # no writer: the agent must not hang on it
    with trio.fail_after(5):
        assert await fs.read(f"{base}/fifo") == b""
    with pytest.raises(OSError):
        await fs.write(f"{base}/fifo", b"x")  # no reader: refused, not stuck
    assert (await fs.stat("/")).kind == "directory"  # and the agent still answers
    out = tmp_path / "out"
    await fs.copy_out(f"{base}/a", out)
    assert (out / "b" / "c" / "f").read_bytes() == b"text"
    await fs.copy_in(out, f"{base}/back")
    assert await fs.read(f"{base}/back/b/c/f") == b"text"


def test_the_runtime_fingerprint_covers_the_module_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cached initramfs is reused while the fingerprint holds: a change to the script
    that picks the stdlib modules the agent needs must rebuild it."""
    before = runtime.fingerprint()
    monkeypatch.setattr(runtime, "_COLLECT", runtime._COLLECT + "\n# one more module\n")
    assert runtime.fingerprint() != before


async def _ready(session: AgentSession) -> AgentSession:
    return session


async def test_patches_refuse_symlink_escapes(agent: HostAgent, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc" / "evil").symlink_to(outside)
    with pytest.raises(PatchError, match="must be an absolute, normalised"):
        Patch.text("etc/x", "y")
    with pytest.raises(PatchError, match="normalised"):
        Patch.text(f"{root}/etc/../x", "y")
    record = str(tmp_path / "applied")
    greeting = [Patch.text(f"{root}/etc/greeting", "hi\n")]
    assert await apply_patches(agent.session, greeting, record=record) == 1
    with pytest.raises(PatchError, match="symlink"):
        evil = [Patch.text(f"{root}/etc/evil/x", "pwned")]
        await apply_patches(agent.session, evil, record=record)
    assert list(outside.iterdir()) == []
    assert (root / "etc" / "greeting").read_text() == "hi\n"
    assert await apply_patches(agent.session, greeting, record=record) == 0


async def test_the_agent_dies_mid_stream(agent: HostAgent) -> None:
    h = await agent.session.spawn(["sleep", "60"], env=ENV, cwd="/")
    agent.proc.kill()
    with pytest.raises(GuestAgentError, match=r"closed|broke"):
        with trio.fail_after(10):
            await h.wait()
    with pytest.raises(GuestAgentError):
        await agent.session.call("stat", path="/")
