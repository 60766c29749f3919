"""Where lanekit keeps its state: one directory, ``$LANEKIT_HOME``, so tests can isolate it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    """The registry, image store and kernel cache under one state directory (imported
    here: a command that needs only the directory should not load the image code)."""
    from .images import ImageStore
    from .kernel import KernelCache
    from .registry import Registry

    return (
        Registry(home / "images" / "registry.json"),
        ImageStore(home / "images"),
        KernelCache(home / "kernels"),
    )
