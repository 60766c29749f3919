"""lanekit's guest agent: the wire protocol (one module for both ends), the agent that
runs in the guest, and the host's session with it.

The host side is :class:`AgentSession` (calls, processes, file streams over one
virtio-serial port); :mod:`.protocol` is the wire format; :mod:`.guest` and
:mod:`.guest_files` run inside the guest and import nothing outside the standard library's
builtins.
"""

from .client import AgentSession, ExecEvent, ExecHandle, ExecStdin, GuestProcess
from .protocol import VERSION, ProtocolError

__all__ = [
    "VERSION",
    "AgentSession",
    "ExecEvent",
    "ExecHandle",
    "ExecStdin",
    "GuestProcess",
    "ProtocolError",
]
