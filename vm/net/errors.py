"""The network's errors: a bad configuration (refused before boot) and failures to set the
network up (the boot fails closed)."""

from __future__ import annotations

from ..errors import BootError, VMError


class NetworkError(VMError):
    """Something about a sandbox's network."""


class NetworkConfigError(NetworkError):
    """A network configuration, rule, secret or published port is malformed."""


class NetworkSetupError(NetworkError, BootError):
    """The sandbox's network could not be set up, so the sandbox does not boot."""
