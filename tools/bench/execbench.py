"""The guest agent against qemu-guest-agent, in one run on the same machine.

- *round trip of ``true``*: exec to exit status, p50 and p99 over many runs, through
  lanekit's agent and through qemu-guest-agent's guest-exec (polled for its status, as
  its protocol requires), on the same boot (both agents run in it);
- *streaming guest -> host*: 64 MiB from a tmpfs file, as ``cat FILE`` through lanekit's
  agent, against ``cat FILE > PORT`` on a raw virtio-serial port of the same VM read by
  the host (the ceiling: no agent, no framing, no pipe);
- *boot to first exec result*: a lanekit sandbox (its agent), the same sandbox with the
  earlier qemu-guest-agent runtime, and a bare qemu boot that powers off at once (floor).
  Both sandboxes do the same first work: the image's healthcheck, then ``true``, both
  from the image's disk (a lanekit sandbox runs the healthcheck before its first exec).
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from vm.launcher import Sandbox
from vm.machine import Machine

from .harness import Report
from .qga import GuestAgent
from .vmboot import _floor_seconds

OURS = "lanekit guest agent"
QGA = "qemu-guest-agent guest-exec"
RAW = "cat to a raw virtio-serial port (ceiling)"
FLOOR = "bare qemu boot, power off at once (floor)"
QGA_RUNTIME = "lanekit sandbox, qemu-guest-agent runtime"
OUR_RUNTIME = "lanekit sandbox, lanekit agent"
STREAM = 64 << 20


class BenchSandbox(Sandbox):
    """A sandbox whose VM also has qemu-guest-agent and a raw port for the ceiling."""

    runtime_variant = "qga"

    def extra_qemu_args(self, runtime: Path) -> list[str]:
        return [
            "-chardev", f"socket,id=qga,path={runtime / 'qga.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            "-chardev", f"socket,id=raw,path={runtime / 'raw.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=raw,name=org.lanekit.bench.0",
        ]  # fmt: skip


class QgaOnlySandbox(BenchSandbox):
    """The runtime as it was: qemu-guest-agent alone answers (lanekit's port removed)."""

    def _qemu_argv(self, *args: object, **kwargs: object) -> list[str]:
        argv = super()._qemu_argv(*args, **kwargs)  # type: ignore[arg-type]
        out: list[str] = []
        skip = False
        for i, arg in enumerate(argv):
            if skip:
                skip = False
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if arg in ("-chardev", "-device") and ("id=agent," in nxt or "chardev=agent," in nxt):
                skip = True
                continue
            out.append(arg)
        return out

    async def _wait_for_agent(self, machine: Machine) -> None:
        """What a lanekit sandbox's first exec does, through qemu-ga: the image's
        healthcheck, then ``true`` (both from the image's disk, cold)."""
        agent = GuestAgent(str(machine.runtime / "qga.sock"))
        with trio.fail_after(self.boot_timeout):
            await agent.wait_ready()
        await qga_run(agent, machine.entry.healthcheck.argv)
        await qga_run(agent, ["true"])
        await agent.aclose()


async def qga_true(agent: GuestAgent) -> None:
    await qga_run(agent, ["/lanekit/busybox", "true"])


async def qga_run(agent: GuestAgent, argv: Sequence[str]) -> None:
    """Run ``argv`` (qemu-ga searches $PATH) until it exits, polling as its protocol asks."""
    pid = await agent.exec_start(argv[0], list(argv[1:]), [], None)
    delay = 0.001
    while not (await agent.exec_status(pid)).get("exited"):
        await trio.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latencies(machine: Machine, runs: int) -> tuple[list[float], list[float]]:
    agent = GuestAgent(str(machine.runtime / "qga.sock"))
    await agent.wait_ready()
    ours, theirs = [], []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            await machine.exec(["/lanekit/busybox", "true"])
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            await qga_true(agent)
            theirs.append(time.perf_counter() - start)
    finally:
        await agent.aclose()
    return ours, theirs


def _raw_reader(path: Path, total: int, done: threading.Event, got: list[int]) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    n = 0
    while n < total:
        data = sock.recv(1 << 20)
        if not data:
            break
        n += len(data)
    got.append(n)
    done.set()
    sock.close()


async def _streams(machine: Machine) -> tuple[float, float]:
    await machine.exec_text(["sh", "-c", f"head -c {STREAM} /dev/zero > /tmp/stream"])
    start = time.perf_counter()
    handle = await machine.exec_stream(["cat", "/tmp/stream"])
    total = 0
    async for event in handle:
        total += len(event.data)
    ours = time.perf_counter() - start
    assert total == STREAM
    find = (
        "for d in /sys/class/virtio-ports/*; do read n <$d/name; "
        '[ "$n" = org.lanekit.bench.0 ] && echo /dev/${d##*/}; done'
    )
    port = (await machine.exec_text(["sh", "-c", find])).strip()
    done, got = threading.Event(), list[int]()
    reader = threading.Thread(
        target=_raw_reader, args=(machine.runtime / "raw.sock", STREAM, done, got), daemon=True
    )
    reader.start()
    await trio.sleep(0.5)
    start = time.perf_counter()
    await machine.exec(["sh", "-c", f"cat /tmp/stream > {port}"])
    await trio.to_thread.run_sync(done.wait, 120)
    raw = time.perf_counter() - start
    assert got == [STREAM], got
    await machine.exec(["rm", "/tmp/stream"])
    return STREAM / ours / 1e6, STREAM / raw / 1e6


async def _boot_to_exec(sandbox: Sandbox) -> float:
    start = time.perf_counter()
    async with sandbox.boot() as machine:
        if not isinstance(sandbox, QgaOnlySandbox):
            await machine.exec(["true"])
        return time.perf_counter() - start


def run(*, quick: bool = False) -> Report:
    repeats = 1 if quick else 5
    runs = 20 if quick else 200
    report = Report("exec", __doc__.split("\n\n")[0] if __doc__ else "exec")
    report.metric("round trip of true, p50", "ms", higher_is_better=False, baseline=QGA)
    report.metric("round trip of true, p99", "ms", higher_is_better=False, baseline=QGA)
    report.metric("streaming guest -> host", "MB/s", baseline=RAW)
    report.metric("boot to first exec result", "s", higher_is_better=False, baseline=FLOOR)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-exec-") as tmp:
        home = Path(tmp)
        bench = BenchSandbox("shell", home=home, memory_mib=512)
        bench._local_image()
        from vm.accel import choose_accelerator

        accel = choose_accelerator(bench.kernels.ensure().kernel, home / "accel.json", None)
        report.notes.append(f"accelerator: {accel}; 1 vCPU, 512 MiB; shell image (busybox)")

        async def same_boot() -> None:
            async with bench.boot() as machine:
                await machine.exec(["true"])
                for _ in range(repeats):
                    ours, theirs = await _latencies(machine, runs)
                    for name, values in ((OURS, ours), (QGA, theirs)):
                        middle, tail = statistics.median(values), _percentile(values, 0.99)
                        report.add("round trip of true, p50", name, 1000 * middle)
                        report.add("round trip of true, p99", name, 1000 * tail)
                    ours_mbs, raw_mbs = await _streams(machine)
                    report.add("streaming guest -> host", OURS, ours_mbs)
                    report.add("streaming guest -> host", RAW, raw_mbs)

        trio.run(same_boot)
        plain = Sandbox("shell", home=home, memory_mib=256)
        old = QgaOnlySandbox("shell", home=home, memory_mib=256)
        for _ in range(repeats):
            report.add("boot to first exec result", FLOOR, _floor_seconds(plain, accel))
            report.add("boot to first exec result", OUR_RUNTIME, trio.run(_boot_to_exec, plain))
            report.add("boot to first exec result", QGA_RUNTIME, trio.run(_boot_to_exec, old))
    report.notes.append(
        "Goals: true round trip at most 0.5x qemu-ga's; streaming at least 0.7x the raw port; "
        f"boot to first exec at most 1.05x the qemu-ga runtime and 1.3x the floor. {runs} "
        f"round trips per repeat, {STREAM >> 20} MiB per stream, {repeats} repeats."
    )
    return report
