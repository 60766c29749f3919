"""Sandbox images and microVMs: an allow-list registry, an image builder, a qemu launcher.

``vm`` composes the other two packages: root disks come from :mod:`blockstore` over NBD,
host filesystems from :mod:`vfs` over virtiofs.
"""

from .errors import (
    BootError,
    BuildError,
    ExecTimeout,
    GuestAgentError,
    HealthcheckFailed,
    ImageNotFoundError,
    ImageRegistrationError,
    KernelError,
    UnsafeArchive,
    VMError,
)
from .registry import (
    BUILTIN_IDS,
    BUILTIN_IMAGES,
    Healthcheck,
    ImageEntry,
    ImageStatus,
    Probe,
    ProbeResult,
    Registry,
)

__all__ = [
    "BUILTIN_IDS",
    "BUILTIN_IMAGES",
    "BootError",
    "BuildError",
    "ExecTimeout",
    "GuestAgentError",
    "Healthcheck",
    "HealthcheckFailed",
    "ImageEntry",
    "ImageNotFoundError",
    "ImageRegistrationError",
    "ImageStatus",
    "KernelError",
    "Probe",
    "ProbeResult",
    "Registry",
    "UnsafeArchive",
    "VMError",
]
