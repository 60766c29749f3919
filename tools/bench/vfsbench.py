"""Host filesystems: our MemoryFS over pyfuse3 vs tmpfs (the ceiling) vs pyfuse3's own example.

Each FUSE filesystem is served by its own process (``lanekit vfs mount --memory`` and
pyfuse3 3.5.0's ``examples/tmpfs.py``, taken from its source distribution on PyPI at run
time and not kept), so the load generator never shares a GIL with the server. Reads are
measured after dropping the page cache, so they go through the filesystem. The FUSE floor
(:mod:`tools.bench.fusefloor`, a raw ``/dev/fuse`` server that stores nothing) runs the
same workload: what the kernel's FUSE round trips alone allow on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vm.proc import spawn

from .harness import Report

TMPFS = "tmpfs (kernel, the ceiling)"
OURS = "lanekit MemoryFS (pyfuse3)"
PEER = "pyfuse3 examples/tmpfs.py"
FLOOR = "FUSE floor (raw /dev/fuse, stores nothing)"

METADATA_SCRIPT = r"""
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
os.mkdir(os.path.join(root, "meta"))
names = [os.path.join(root, "meta", f"f{i:06d}") for i in range(n)]
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
t1 = time.perf_counter()
for p in names:
    os.stat(p)
t2 = time.perf_counter()
for p in names:
    os.unlink(p)
t3 = time.perf_counter()
print(n / (t1 - t), n / (t2 - t1), n / (t3 - t2))
"""


def _drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if os.path.ismount(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the filesystem server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} was not mounted")


@contextlib.contextmanager
def _served(argv: list[str], mountpoint: Path) -> Iterator[Path]:
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # dies with us
    try:
        _wait_mounted(mountpoint, proc)
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _tmpfs(mountpoint: Path) -> Iterator[Path]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def _peer_script(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "--dest", str(work), "pyfuse3==3.5.0"],
        check=True,
    )  # fmt: skip
    sdist = next(work.glob("pyfuse3-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("examples/tmpfs.py"))
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    script = work / "peer_tmpfs.py"
    script.write_bytes(data)
    return script


def _dd(args: list[str]) -> float:
    out = subprocess.run(["dd", *args, "status=progress"], capture_output=True, text=True).stderr
    line = [x for x in out.splitlines() if "copied" in x][-1]
    value, unit = line.rsplit(",", 1)[1].split()
    scale = {"kB/s": 1e-3, "MB/s": 1, "GB/s": 1e3}[unit]
    return float(value) * scale


def _measure(
    report: Report, case: str, root: Path, size_mb: int, big_mb: int, files: int, tree: Path
) -> None:
    if case != PEER:
        big = root / "big"
        write = ["if=/dev/zero", f"of={big}", "bs=1M", f"count={big_mb}", "conv=fsync"]
        report.add(f"sequential write of {big_mb} MiB, 1 MiB requests", case, _dd(write))
        _drop_caches()
        read = [f"if={big}", "of=/dev/null", "bs=1M"]
        report.add(f"sequential read of {big_mb} MiB, 1 MiB requests", case, _dd(read))
        os.unlink(big)
    data = root / "seq"
    write = ["if=/dev/zero", f"of={data}", "bs=1M", f"count={size_mb}", "conv=fsync"]
    report.add("sequential write, 1 MiB requests", case, _dd(write))
    _drop_caches()
    report.add(
        "sequential read, 1 MiB requests", case, _dd([f"if={data}", "of=/dev/null", "bs=1M"])
    )
    _drop_caches()
    fio = subprocess.run(
        ["fio", "--name=r", f"--filename={data}", "--rw=randread", "--bs=4k", "--ioengine=psync",
         "--runtime=5", "--time_based", "--invalidate=1", "--output-format=terse",
         "--terse-version=3"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    report.add("4 KiB random read", case, float(fio.split(";")[7]))
    os.unlink(data)
    out = subprocess.run(
        [sys.executable, "-c", METADATA_SCRIPT, str(root), str(files)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for metric, value in zip(("create", "stat", "unlink"), out, strict=True):
        report.add(f"{metric} of {files:,} small files", case, float(value))
    start = time.monotonic()
    subprocess.run(["tar", "-xf", str(tree), "-C", str(root)], check=True)
    report.add("tar x of a source tree", case, time.monotonic() - start)


def run(*, quick: bool = False) -> Report:
    size_mb = 32 if quick else 64  # pyfuse3's example re-reads whole files: O(n²)
    big_mb = 256 if quick else 1024  # so a large file, for tmpfs and ours only
    files = 2000 if quick else 10_000
    repeats = 1 if quick else 2
    report = Report(
        "vfs", "Host filesystems side by side: tmpfs, lanekit MemoryFS, pyfuse3's example."
    )
    for name in ("sequential write, 1 MiB requests", "sequential read, 1 MiB requests"):
        report.metric(name, "MB/s", baseline=PEER)
    for op in ("write", "read"):
        report.metric(f"sequential {op} of {big_mb} MiB, 1 MiB requests", "MB/s", baseline=TMPFS)
    report.metric("4 KiB random read", "IOPS", baseline=PEER)
    for op in ("create", "stat", "unlink"):
        report.metric(f"{op} of {files:,} small files", "ops/s", baseline=PEER)
    report.metric("tar x of a source tree", "s", higher_is_better=False, baseline=PEER)
    with tempfile.TemporaryDirectory(prefix="lanekit-bench-vfs-") as tmp:
        work = Path(tmp)
        peer = _peer_script(work)
        tree = work / "tree.tar"
        source = (
            Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        )
        subprocess.run(
            ["tar", "-cf", str(tree), "--exclude=site-packages", "--exclude=dist-packages",
             "-C", str(source.parent), source.name],
            check=True,
        )  # fmt: skip
        report.notes.append(
            f"{size_mb} MiB sequential file; tar x of {source} ({tree.stat().st_size >> 20} MiB); "
            f"page cache dropped before reads; the {big_mb} MiB file is not run on pyfuse3's "
            "example, whose writes rewrite the whole file (O(n²))"
        )
        mnt = work / "mnt"
        mnt.mkdir()
        lanekit = [sys.executable, "-m", "tools.cli"]
        floor = [sys.executable, "-m", "tools.bench.fusefloor", str(mnt)]
        cases = [
            (TMPFS, lambda: _tmpfs(mnt)),
            (FLOOR, lambda: _served(floor, mnt)),
            (OURS, lambda: _served([*lanekit, "vfs", "mount", "--memory", str(mnt)], mnt)),
            (PEER, lambda: _served([sys.executable, str(peer), str(mnt)], mnt)),
        ]  # fmt: skip
        for _ in range(repeats):
            for case, mount in cases:
                with mount() as root:
                    _measure(report, case, root, size_mb, big_mb, files, tree)
                if any(mnt.iterdir()):
                    shutil.rmtree(mnt)
                    mnt.mkdir()
    return report
