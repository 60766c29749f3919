"""Where lanekit keeps its state: one directory, ``$LANEKIT_HOME``, so tests can isolate it."""

from __future__ import annotations

import os
from pathlib import Path

from .images import ImageStore
from .kernel import KernelCache
from .registry import Registry


def lanekit_home() -> Path:
    env = os.environ.get("LANEKIT_HOME")
    if env:
        return Path(env).absolute()
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "lanekit"


def state_paths(home: Path) -> tuple[Registry, ImageStore, KernelCache]:
    """The registry, image store and kernel cache under one state directory."""
    return (
        Registry(home / "images" / "registry.json"),
        ImageStore(home / "images"),
        KernelCache(home / "kernels"),
    )
