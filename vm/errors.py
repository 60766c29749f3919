"""The vm package's exceptions; the CLI maps them to messages and exit codes once."""

from __future__ import annotations


class VMError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageRegistrationError(VMError, ValueError):
    """A registry entry failed validation or its id is taken."""


class ImageNotFoundError(VMError, LookupError):
    """No registry entry (or no built image) under that id or digest."""


class BuildError(VMError):
    """An image could not be built from its source; nothing was registered."""


class UnsafeArchive(BuildError):
    """A tarball member would escape the build root or create a device node."""


class KernelError(VMError):
    """The guest kernel or initramfs could not be obtained or built."""


class BootError(VMError):
    """The VM did not come up (qemu exited, or the guest agent never answered)."""


class GuestAgentError(VMError):
    """The guest agent answered with an error, or the channel broke."""


class ExecTimeout(VMError):
    """A command in the guest ran past its timeout and was killed; ``result`` has its output."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class HealthcheckFailed(VMError):
    """The image's registered healthcheck did not pass in the guest."""
