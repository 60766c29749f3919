"""Host and guest see the same workspace: a host edit through the vfs path API reaches a
booted guest whole (no torn view of new bytes at the old size)."""

from __future__ import annotations

from pathlib import Path

import pytest

import vfs
from vm.launcher import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_guest_sees_the_hosts_rewrite_whole(vm_home: Path) -> None:
    workspace = vfs.MemoryFS({"notes.txt": "first line\n"})
    host = workspace.paths_blocking
    with Sandbox("shell", home=vm_home, memory_mib=256).run({"/workspace": workspace}) as m:
        assert m.exec(["cat", "/workspace/notes.txt"]).stdout == b"first line\n"
        longer = b"".join(b"line %d of the rewritten notes\n" % i for i in range(2000))
        host.write_file("notes.txt", longer)
        host.write_file("added.txt", "from the host\n")
        # The host's FUSE caches are invalidated by the write and the guest revalidates
        # attributes of a vfs mount on every look: its very next read sees the whole file
        # (before, a torn view lasted over a minute).
        shown = m.exec(["sh", "-c", "cat /workspace/notes.txt; ls /workspace"])
        assert shown.exit_code == 0
        assert shown.stdout == longer + b"added.txt\nnotes.txt\n"
        host.remove("added.txt")
        assert m.exec(["sh", "-c", "ls /workspace"]).stdout == b"notes.txt\n"
        shorter = b"short\n"
        host.write_file("notes.txt", shorter)
        assert m.exec(["cat", "/workspace/notes.txt"]).stdout == shorter
