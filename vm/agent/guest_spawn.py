"""Starting a command in the guest: pipes or a PTY, a session of its own, its own cgroup.

Runs in the guest's minimal Python. Under TCG a ``fork`` of the agent costs about 10 ms
and a Python-level ``execvpe`` walk of $PATH in the child 40 ms more, so the common case
(root, no PTY) uses ``posix_spawn`` (a vfork: 9 ms) with $PATH resolved here, and only a
command run as another user is forked (posix_spawn cannot change ids).

A command the agent cannot start still becomes a process, the way a shell reports it:
a message on its stderr and exit status 127 (not found) or 126 (no such directory, not
executable), so callers see one behaviour whatever went wrong.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal.py would import enum
import fcntl
import grp
import os
import pwd
import stat
import struct

TIOCSWINSZ = 0x5414
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
"""Big pipes: a writer fills more before the agent has to wake, and each read is larger."""
CGROUP_TOP = "/sys/fs/cgroup/cgroup.procs"
_DEFAULT_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD, _signal.SIGINT)


class Refused(Exception):
    """The request itself is wrong (an unknown user, say): the caller gets an error."""


class Started:
    def __init__(
        self, pid: int, outs: dict[int, int], stdin: int, tty: int | None, cgroup: str | None
    ) -> None:
        self.pid = pid
        self.outs = outs
        """Our read ends by channel (1 stdout, 2 stderr; a PTY's master for both)."""
        self.stdin = stdin
        self.tty = tty
        self.cgroup = cgroup
        """Where the command started: the one asked for, or None (the agent could not
        enter it, so the command is not in it: kill it by its process group)."""


def resolve_user(spec: object) -> tuple[int, int, list[int], str] | None:
    """(uid, gid, groups, home) for ``name``, ``uid``, ``name:group`` or ``uid:gid``."""
    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        raise Refused("user must be text: a name, a uid, or uid:gid")
    name, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid, home, user = entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_name
    except KeyError:
        if not name.isdigit():
            raise Refused(f"unknown user {name!r} in the guest's /etc/passwd") from None
        uid, gid, home, user = int(name), int(name), "/", ""
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise Refused(f"unknown group {group!r} in the guest's /etc/group") from None
    groups = [gid]
    if user:
        groups += [g.gr_gid for g in grp.getgrall() if user in g.gr_mem and g.gr_gid != gid]
    return uid, gid, groups, home


def set_size(fd: int, rows: int, cols: int) -> None:
    rows, cols = max(1, min(rows, 10000)), max(1, min(cols, 10000))
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def which(command: str, path: str) -> str | None:
    """Where ``command`` is, searched in ``path`` (relative entries from the cwd)."""
    if "/" in command:
        return command
    for directory in path.split(":"):
        candidate = (directory or ".") + "/" + command
        try:
            info = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: the default size works too
    return r, w


def start(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    user: tuple[int, int, list[int], str] | None,
    tty: tuple[int, int] | None,
    stdin: bool,
    cgroup: str | None,
) -> Started:
    """Start ``argv``; the child's ends of its pipes or PTY are closed here."""
    child_fds: list[int] = []
    if tty is not None:
        master, slave = os.openpty()
        set_size(master, *tty)
        child_fds.append(slave)
        ends = [slave, slave, slave]
        outs = {1: master}
        ours_in = master
    else:
        stdin_r, ours_in = _pipe() if stdin else (os.open("/dev/null", os.O_RDONLY), -1)
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        ends = [stdin_r, out_w, err_w]
        child_fds += ends
        outs = {1: out_r, 2: err_r}
    try:
        # Entered before anything is started (the forked child of a command run as another
        # user, or what reports a failure, is the command's process too).
        if cgroup is not None and not _enter(cgroup):
            cgroup = None
            _enter(None)  # not left in another command's cgroup either
        pid = _launch(argv, env, cwd, user, ends, tty is not None)
    except BaseException:
        for fd in {*outs.values(), ours_in} - {-1}:  # the agent lives on: no leak
            os.close(fd)
        raise
    finally:
        for fd in set(child_fds):
            os.close(fd)
    return Started(pid, outs, ours_in, master if tty is not None else None, cgroup)


def _launch(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    user: tuple[int, int, list[int], str] | None,
    ends: list[int],
    tty: bool,
) -> int:
    if user is not None:
        env.setdefault("HOME", user[3])
    try:
        os.chdir(cwd)
    except OSError as exc:
        return _failure(f"lanekit: cannot change to directory {cwd}: {exc.strerror}", 126, ends)
    try:
        program = which(argv[0], env.get("PATH", ""))
        if program is None:
            return _failure(f"lanekit: {argv[0]}: command not found", 127, ends)
        if user is not None:
            return _fork(program, argv, env, user, ends, tty)
        try:
            return _spawn(program, argv, env, ends, tty)
        except OSError as exc:
            return _failure(f"lanekit: {argv[0]}: {exc.strerror}", 126, ends)
    finally:
        os.chdir("/")


_inside: str | None = None
"""The command cgroup the agent is in, None for the top. It stays a little after a spawn
(see :func:`leave`): moving out at once (0.45 ms under TCG) would take the one vCPU from
the command it just started."""


def _enter(cgroup: str | None) -> bool:
    """Move the agent into ``cgroup`` (None: the top) so that what it spawns next starts
    inside it (a child moved after the spawn could fork an escapee first); False if it
    could not (it stays where it was)."""
    global _inside
    if cgroup == _inside:
        return True
    try:
        with open((cgroup + "/cgroup.procs") if cgroup else CGROUP_TOP, "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        return False
    _inside = cgroup
    return True


def inside() -> str | None:
    return _inside


def leave(cgroup: str | None = None) -> bool:
    """Out of ``cgroup`` (None: out of any command's), before it is killed or removed, or
    once its command has run a while (inside, the agent would go with a command that kills
    its own cgroup, and counts in its usage); False if it is still in it (then it must not
    be killed through its cgroup)."""
    if _inside is not None and (cgroup is None or _inside == cgroup):
        _enter(None)
    return _inside is None if cgroup is None else _inside != cgroup


def _spawn(program: str, argv: list[str], env: dict[str, str], ends: list[int], tty: bool) -> int:
    actions: list[tuple[object, ...]] = []
    if tty:
        # Opened after setsid, the PTY becomes the new session's controlling terminal.
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.ttyname(ends[0]), os.O_RDWR, 0))
        actions += [(os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
    else:
        actions += [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(ends)]
    return os.posix_spawn(
        program,
        argv,
        env,
        file_actions=actions,
        setsid=True,
        setsigdef=_DEFAULT_SIGNALS,
        setsigmask=(),
    )


def _fork(
    program: str,
    argv: list[str],
    env: dict[str, str],
    user: tuple[int, int, list[int], str],
    ends: list[int],
    tty: bool,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns
        _signal.set_wakeup_fd(-1)
        for sig in _DEFAULT_SIGNALS:
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
        if tty:
            os.login_tty(ends[0])
        else:
            os.setsid()
            for target, fd in enumerate(ends):
                os.dup2(fd, target)
        uid, gid, groups, _ = user
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        os.execve(program, argv, env)
    except BaseException as exc:
        message = exc.strerror if isinstance(exc, OSError) else exc
        os.write(2, f"lanekit: cannot start {argv[0]}: {message}\n".encode())
    finally:
        os._exit(126)


def _failure(message: str, code: int, ends: list[int]) -> int:
    """A process that prints ``message`` on its stderr and exits ``code``."""
    os.chdir("/")
    shell = "/lanekit/busybox" if os.path.exists("/lanekit/busybox") else "/bin/sh"
    return _spawn(
        shell, ["sh", "-c", 'printf "%s\\n" "$1" >&2; exit "$2"', "lanekit", message, str(code)],
        {}, ends, False,
    )  # fmt: skip
