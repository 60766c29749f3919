"""Who a process is and which host it runs on, robustly enough to tell a dead lease holder.

A hostname is no identity (machines and containers share them) and a pid means something
only inside its pid namespace, and only until it is reused. So a host is named by the
kernel's boot id plus the pid namespace, and a process by its pid plus its start time.
"""

from __future__ import annotations

import os

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def host_identity() -> str | None:
    """``BOOT_ID/PID_NAMESPACE_INODE`` of this process's host, or None where /proc cannot
    say (then no pid from a lease may be judged here)."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        # A /proc mounted for another pid namespace would answer for other processes.
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def process_identity(pid: int) -> str | None:
    """``PID:START_TIME`` of a running process (start time in clock ticks since boot,
    field 22 of /proc/PID/stat); None if there is no such process or it is a zombie."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    fields = stat[stat.rfind(b")") + 1 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return f"{pid}:{int(fields[19])}"
