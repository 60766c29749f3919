"""What the guest needs to run the agent: the host's Python interpreter, the few standard
library modules the agent imports (compiled), and the agent's own modules.

Only what the agent really imports is carried, found by importing it with the host's
interpreter under ``-S``: about 0.3 MB of bytecode next to the interpreter, instead of a
40 MB standard library. The interpreter's shared libraries come with it and are loaded
through the runtime's copy of the dynamic loader (see :mod:`vm.guest`), so the agent runs
the same in any image and never mixes with the image's own libraries or Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import BuildError

PYTHON = Path("/usr/bin/python3")
GUEST_PACKAGE = "lanekit_agent"
GUEST_MODULES = ("protocol", "guest_files", "guest_spawn", "guest_io", "guest")
PYTHON_HOME = "python"
"""The interpreter's home under the runtime directory (``/lanekit/python``)."""

_HERE = Path(__file__).parent

_COLLECT = r"""
import importlib.util, json, os, py_compile, sys
package, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, package)
before = set(sys.modules)
import lanekit_agent.guest  # noqa
stdlib = os.path.dirname(os.__file__)
names = {n for n in sys.modules if not n.startswith("lanekit_agent")} - {"__main__"}
names |= {"os", "encodings", "encodings.aliases", "encodings.utf_8", "codecs", "io", "abc",
          "stat", "posixpath", "genericpath", "_collections_abc", "__future__"}
written = []
for name in sorted(names):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "built-in"):
        continue
    origin = spec.origin
    if origin == "frozen":
        base = os.path.join(stdlib, *name.split("."))
        origin = base + "/__init__.py" if os.path.isdir(base) else base + ".py"
        if not os.path.exists(origin):
            continue  # frozen with no source (importlib's bootstrap): in the binary
    if not origin.startswith(stdlib + "/") or not origin.endswith(".py"):
        if origin.endswith(".so"):
            rel = os.path.relpath(origin, stdlib)
            written.append([rel, origin])
        continue
    rel = os.path.relpath(origin, stdlib) + "c"
    target = os.path.join(out, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    py_compile.compile(origin, cfile=target, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    written.append([rel, target])
for module in ("__init__",) + tuple(sys.argv[3:]):
    source = os.path.join(package, "lanekit_agent", module + ".py")
    target = os.path.join(out, "lanekit_agent", module + ".pyc")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    py_compile.compile(source, cfile=target, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    written.append(["lanekit_agent/" + module + ".pyc", target])
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "files": written}))
"""


def agent_sources() -> dict[str, bytes]:
    """The guest package's modules by name (``__init__`` is empty in the guest: the host
    package's one imports trio)."""
    sources = {"__init__": b'"""The lanekit guest agent (see vm/agent/guest.py on the host)."""\n'}
    for name in GUEST_MODULES:
        sources[name] = (_HERE / f"{name}.py").read_bytes()
    return sources


def fingerprint() -> bytes:
    """Changes whenever the agent's sources, the script that collects the stdlib modules
    it imports, or the host interpreter change."""
    digest = hashlib.sha256(hashlib.sha256(_COLLECT.encode()).digest())
    for name, source in sorted(agent_sources().items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(source).digest())
    st = PYTHON.resolve().stat()
    digest.update(f"{PYTHON.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.digest()


def python_binary() -> Path:
    if not PYTHON.exists():
        raise BuildError(f"{PYTHON} is missing: the guest agent runs on the host's Python")
    return PYTHON.resolve()


def agent_files() -> dict[str, tuple[bytes | Path, int]]:
    """Files under the runtime directory: the interpreter, its modules, the agent."""
    binary = python_binary()
    with tempfile.TemporaryDirectory(prefix="lanekit-agent-build-") as tmp:
        package = Path(tmp) / "src"
        (package / GUEST_PACKAGE).mkdir(parents=True)
        for name, source in agent_sources().items():
            (package / GUEST_PACKAGE / f"{name}.py").write_bytes(source)
        out = Path(tmp) / "out"
        try:
            done = subprocess.run(
                [str(binary), "-S", "-I", "-c", _COLLECT, str(package), str(out), *GUEST_MODULES],
                capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise BuildError(f"cannot compile the guest agent with {binary}: {detail}") from None
        listing = json.loads(done.stdout)
        lib = f"{PYTHON_HOME}/lib/python{listing['version']}"
        files: dict[str, tuple[bytes | Path, int]] = {
            f"{PYTHON_HOME}/bin/python3": (binary, 0o755),
            # getpath looks for lib-dynload to settle exec_prefix (and warns without it).
            f"{lib}/lib-dynload/.keep": (b"", 0o644),
        }
        for rel, path in listing["files"]:
            mode = 0o755 if rel.endswith(".so") else 0o644
            files[f"{lib}/{rel}"] = (Path(path).read_bytes(), mode)
        return files


def agent_command(port: str) -> str:
    """The shell command the guest init runs to start the agent on ``port`` (a shell word,
    e.g. ``"$port"``)."""
    return (
        f"PYTHONHOME=/lanekit/{PYTHON_HOME} PYTHONDONTWRITEBYTECODE=1 "
        "/lanekit/lib/ld-linux-x86-64.so.2 --library-path /lanekit/lib "
        f"/lanekit/{PYTHON_HOME}/bin/python3 -S -u -c "
        f"'import sys; from {GUEST_PACKAGE}.guest import main; main(sys.argv[1:])' {port}"
    )


def install_for_host_tests(directory: Path) -> Path:
    """The guest package written under ``directory`` (for running the real agent on the
    host against a socket in tests); returns the directory to put on ``sys.path``."""
    (directory / GUEST_PACKAGE).mkdir(parents=True, exist_ok=True)
    for name, source in agent_sources().items():
        (directory / GUEST_PACKAGE / f"{name}.py").write_bytes(source)
    os.chmod(directory, 0o755)
    return directory
