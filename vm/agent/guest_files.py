"""File operations the guest agent runs for the host (stat, list, mkdir, remove, ...).

Runs in the guest's minimal Python (builtins only). Each operation takes the CALL's
arguments and returns a value for its REPLY, or raises OSError (or :class:`Refused`),
which the agent turns into an error reply naming the path.

``nofollow`` (what rootfs patches use) resolves every directory on the way to the target
beneath ``/`` without following a symlink, so a patch can never write outside the path it
names, whatever links the image holds.
"""

from __future__ import annotations

import os
import stat as st

_KINDS = ((st.S_ISREG, "file"), (st.S_ISDIR, "directory"), (st.S_ISLNK, "symlink"))


class Refused(Exception):
    """A request the agent will not carry out (the message says why)."""


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "other"


def describe(path: str, info: os.stat_result) -> dict[str, object]:
    return {
        "path": path,
        "kind": kind_of(info.st_mode),
        "size": info.st_size,
        "mode": st.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "modified": info.st_mtime,
    }


def text(args: dict[str, object], key: str = "path") -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value or "\0" in value:
        raise Refused(f"{key} must be a non-empty path")
    return value


def absolute(args: dict[str, object], key: str = "path") -> str:
    path = text(args, key)
    if not path.startswith("/"):
        raise Refused(f"{path!r} is not an absolute path")
    return path


class Parent:
    """The directory holding a path's last component, opened without following symlinks
    when ``nofollow``; use as a context manager, then pass ``.fd`` and ``.name``."""

    def __init__(self, path: str, nofollow: bool, create: bool = False) -> None:
        self.path = path
        self.nofollow = nofollow
        self.create = create
        self.fd = -1
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise Refused(f"{path!r} must be a normalised absolute path other than /")
        self.parts = parts
        self.name = parts[-1]

    def __enter__(self) -> Parent:
        if not self.nofollow:
            self.fd = os.open(os.path.dirname(self.path) or "/", os.O_RDONLY | os.O_DIRECTORY)
            return self
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            walked = ""
            for part in self.parts[:-1]:
                walked += "/" + part
                if self.create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (40, 20):  # ELOOP, ENOTDIR: a symlink or a file
                        raise Refused(
                            f"{walked} is a symlink or not a directory: {self.path} would "
                            "not stay where it names"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def op_stat(args: dict[str, object]) -> object:
    path = absolute(args)
    follow = not args.get("lstat")
    return describe(path, os.stat(path, follow_symlinks=follow))


def op_exists(args: dict[str, object]) -> object:
    return os.path.lexists(absolute(args))


def op_listdir(args: dict[str, object]) -> object:
    path = absolute(args)
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            info = entry.stat(follow_symlinks=False)
            entries.append(describe(entry.path, info))
    entries.sort(key=lambda e: str(e["path"]))
    return entries


def op_mkdir(args: dict[str, object]) -> object:
    path = absolute(args)
    mode = int(args.get("mode") or 0o755)  # type: ignore[call-overload]
    if args.get("parents"):
        os.makedirs(path, mode, exist_ok=True)
        return None
    nofollow = bool(args.get("nofollow"))
    with Parent(path, nofollow, create=nofollow) as parent:
        try:
            os.mkdir(parent.name, mode, dir_fd=parent.fd)
        except FileExistsError:
            if not args.get("exist_ok"):
                raise
            info = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
            if not st.S_ISDIR(info.st_mode):
                raise
    return None


def _remove_tree(fd: int, name: str) -> None:
    """Remove ``name`` under directory ``fd``, recursively, never following a symlink."""
    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not st.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    try:
        for child in os.listdir(sub):
            _remove_tree(sub, child)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)


def op_remove(args: dict[str, object]) -> object:
    path = absolute(args)
    with Parent(path, bool(args.get("nofollow"))) as parent:
        try:
            info = os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            if args.get("missing_ok"):
                return False
            raise
        if st.S_ISDIR(info.st_mode):
            if args.get("recursive"):
                _remove_tree(parent.fd, parent.name)
            else:
                os.rmdir(parent.name, dir_fd=parent.fd)
        else:
            os.unlink(parent.name, dir_fd=parent.fd)
    return True


def op_rename(args: dict[str, object]) -> object:
    source, target = absolute(args, "source"), absolute(args, "target")
    if not args.get("replace", True) and os.path.lexists(target):
        raise FileExistsError(17, "target exists", target)
    os.rename(source, target)
    return None


def _copy_file(source: str, target: str, mode: int) -> None:
    fin = os.open(source, os.O_RDONLY)
    try:
        fout = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            while True:
                n = os.sendfile(fout, fin, None, 1 << 30)
                if n == 0:
                    break
            os.fchmod(fout, mode)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_tree(source: str, target: str) -> None:
    info = os.lstat(source)
    if st.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
    elif st.S_ISDIR(info.st_mode):
        os.mkdir(target, st.S_IMODE(info.st_mode) | 0o700)
        for name in sorted(os.listdir(source)):
            _copy_tree(os.path.join(source, name), os.path.join(target, name))
        os.chmod(target, st.S_IMODE(info.st_mode))
    elif st.S_ISREG(info.st_mode):
        _copy_file(source, target, st.S_IMODE(info.st_mode))
    else:
        raise Refused(f"{source} is neither a file, a directory nor a symlink")


def op_copy(args: dict[str, object]) -> object:
    source, target = absolute(args, "source"), absolute(args, "target")
    if os.path.lexists(target):
        if not args.get("replace"):
            raise FileExistsError(17, "target exists", target)
        op_remove({"path": target, "recursive": True})
    if os.path.isdir(source) and not os.path.islink(source) and not args.get("recursive"):
        raise IsADirectoryError(21, "is a directory (copy it with recursive)", source)
    _copy_tree(source, target)
    return None


def op_chmod(args: dict[str, object]) -> object:
    os.chmod(absolute(args), int(args["mode"]))  # type: ignore[call-overload]
    return None


def op_chown(args: dict[str, object]) -> object:
    uid, gid = args.get("uid"), args.get("gid")
    os.chown(
        absolute(args),
        -1 if uid is None else int(uid),  # type: ignore[call-overload]
        -1 if gid is None else int(gid),  # type: ignore[call-overload]
        follow_symlinks=not args.get("lstat"),
    )
    return None


def op_symlink(args: dict[str, object]) -> object:
    path, target = absolute(args), text(args, "target")
    nofollow = bool(args.get("nofollow"))
    with Parent(path, nofollow, create=nofollow) as parent:
        if args.get("replace"):
            try:
                os.unlink(parent.name, dir_fd=parent.fd)
            except FileNotFoundError:
                pass
        os.symlink(target, parent.name, dir_fd=parent.fd)
    return None


def op_readlink(args: dict[str, object]) -> object:
    return os.readlink(absolute(args))


def open_for_write(args: dict[str, object]) -> int:
    """The fd a streamed write goes to: ``append``, ``replace`` (default True), ``mode``,
    ``parents`` (make missing directories), ``nofollow`` (patches)."""
    path = absolute(args)
    mode = int(args.get("mode") if args.get("mode") is not None else 0o644)  # type: ignore[call-overload]
    flags = os.O_WRONLY | os.O_CREAT
    if args.get("append"):
        flags |= os.O_APPEND
    elif args.get("replace", True):
        flags |= os.O_TRUNC
    else:
        flags |= os.O_EXCL
    nofollow = bool(args.get("nofollow"))
    if args.get("parents") and not nofollow:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    with Parent(path, nofollow, create=nofollow and bool(args.get("parents"))) as parent:
        if nofollow:
            flags |= os.O_NOFOLLOW
        # O_NONBLOCK: a FIFO with no reader fails (ENXIO) instead of stalling the agent.
        fd = os.open(parent.name, flags | os.O_NONBLOCK, mode, dir_fd=parent.fd)
    if args.get("mode") is not None:
        os.fchmod(fd, mode)
    return fd


def open_for_read(args: dict[str, object]) -> tuple[int, int]:
    """(fd, size) of a file to stream to the host."""
    # O_NONBLOCK: a FIFO with no writer must not stall the agent (qemu-ga's did).
    fd = os.open(absolute(args), os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if st.S_ISDIR(info.st_mode):
        os.close(fd)
        raise IsADirectoryError(21, "is a directory", args["path"])
    return fd, info.st_size


OPERATIONS = {
    "stat": op_stat,
    "exists": op_exists,
    "listdir": op_listdir,
    "mkdir": op_mkdir,
    "remove": op_remove,
    "rename": op_rename,
    "copy": op_copy,
    "chmod": op_chmod,
    "chown": op_chown,
    "symlink": op_symlink,
    "readlink": op_readlink,
}
