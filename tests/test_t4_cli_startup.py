"""What a command-line process loads before it does anything: every agent command through
``lanekit lane exec`` is a process of its own, so the packages export their heavy parts
lazily and the command modules import them where they are used."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import blockstore
from blockstore.identity import process_identity
from vm.lanes import running_env
from vm.lanes.cache import LaneCache

HEAVY = ("numpy", "boto3", "botocore", "pyfuse3", "cryptography", "tqdm", "blockstore.store",
         "vm.launcher", "vm.lanes.lane", "vfs")  # fmt: skip
"""Packages and modules a command must not load unless it uses them."""


def loaded_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Which of :data:`HEAVY` a fresh interpreter has loaded after running ``code`` (which
    must not exit: the probe prints after it)."""
    probe = f"""
import sys
{code}
heavy = {list(HEAVY)!r}
print(" ".join(m for m in sorted(sys.modules) if m in heavy or m.split(".")[0] in heavy))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, timeout=120, env=env
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split()


def test_building_the_command_line_loads_none_of_the_heavy_parts() -> None:
    assert loaded_after("import tools.cli; tools.cli.build_parser()") == []


def test_the_lane_client_loads_none_of_the_heavy_parts() -> None:
    assert loaded_after("from vm.lanes import connect_running, running_env, LaneError") == []


@pytest.mark.parametrize("package", ["blockstore", "vm.net", "vm.lanes"])
def test_a_lazy_package_gives_every_name_it_exports(package: str) -> None:
    check = f"""
import importlib, inspect, sys
package = importlib.import_module({package!r})
for name in package.__all__:
    value = getattr(package, name)
    assert value is getattr(package, name), name
    if inspect.isclass(value) or inspect.isfunction(value):  # its own, not a namesake
        assert value.__module__.startswith({package!r}), (name, value.__module__)
try:
    package.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("an unknown name resolved")
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()


@pytest.mark.parametrize("package", ["blockstore", "vm.net", "vm.lanes"])
def test_no_lazy_name_is_also_a_submodule(package: str) -> None:
    """Importing a submodule sets the package's attribute of its name: an export of that
    name would turn into the module once anything imported it (``vm.net.policy`` did)."""
    module = importlib.import_module(package)
    submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    assert submodules.isdisjoint(module.__all__), submodules & set(module.__all__)


def test_a_submodule_is_an_attribute_without_importing_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import blockstore; print(blockstore.lease.DEFAULT_TTL)"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and float(done.stdout) > 0, done.stderr


def test_a_command_error_of_a_loaded_package_is_still_one_line(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "vfs", "mount", "--passthrough", "/nonexistent",
         "/nonexistent-mountpoint"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(b"lanekit: error: ") and done.stderr.count(b"\n") == 1


def test_lane_exec_asks_the_store_unless_a_live_supervisor_recorded_the_env(
    tmp_path: Path,
) -> None:
    """The local path needs the lane's env from its supervisor: one that recorded none
    (started by an older lanekit) or is dead sends ``lane exec`` to the store instead."""
    run = tmp_path / "lanes" / "here"
    run.mkdir(parents=True)
    me = {"pid": os.getpid(), "process": process_identity(os.getpid())}
    identity = run / "supervisor.json"
    assert running_env("here", tmp_path) is None  # none ran here
    identity.write_text(json.dumps(me))
    assert running_env("here", tmp_path) is None  # an older supervisor: no env recorded
    identity.write_text(json.dumps({**me, "env": {"TOKEN": "t"}}))
    assert running_env("here", tmp_path) == {"TOKEN": "t"}
    # With a store (--store, or LANEKIT_STORE): only if this host knows the lane from it.
    assert running_env("here", tmp_path, store="file:///a") is None
    LaneCache.of(tmp_path).put("here", "file:///a", None, "running")
    assert running_env("here", tmp_path, store="file:///a") == {"TOKEN": "t"}
    assert running_env("here", tmp_path, store="file:///b") is None
    identity.write_text(json.dumps({**me, "process": "someone else", "env": {}}))
    assert running_env("here", tmp_path) is None  # its pid reused by another process
    with pytest.raises(blockstore.InvalidURL):
        running_env("../escape", tmp_path)


@pytest.mark.parametrize(
    "command", [["exec", "ghost", "--", "true"], ["stop", "ghost"], ["rm", "ghost"], ["ls"]]
)
def test_a_lane_command_about_no_lane_leaves_no_state(tmp_path: Path, command: list[str]) -> None:
    """Asking about lanes this host never knew answers without making its cache."""
    home = tmp_path / "home"
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "lane", *command],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LANEKIT_HOME": str(home)},
    )  # fmt: skip
    if command != ["ls"]:
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "knows no lane 'ghost'" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
    assert not home.exists() or list(home.iterdir()) == [], list(home.iterdir())


def test_the_command_exits_quickly_but_still_runs_atexit_and_flushes_output() -> None:
    """``run`` skips only the collector's final passes: a command's exit code, its buffered
    output and the atexit handlers (temporary directories, logging) all survive it."""
    probe = """
import atexit, sys
atexit.register(lambda: print("atexit ran"))
print("x" * 100000)
sys.argv = ["lanekit", "disk", "info", "file:///nonexistent-lanekit-dir/d"]
from tools.cli import run
run()
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout.endswith(b"atexit ran\n") and len(done.stdout) > 100000
    assert done.stderr.startswith(b"lanekit: error: ")
    script = Path(sys.executable).parent / "lanekit"
    assert "tools.cli import run" in script.read_text()
