"""The allow-list of sandbox images, each with a healthcheck and pinned to a built digest.

The contract is crewhaus's ``sandbox-image-registry``: register / lookup / has / list /
allowed references, duplicate ids refused, the built-in ``python``, ``javascript`` and
``shell`` present from the start, health status per entry and a healthcheck runner that
takes an injected probe. Unlike the seed, a :class:`Registry` is an object you construct,
and with a state directory it persists to one JSON file that every change rewrites under
an exclusive ``flock`` (read, modify, write to a temporary file, fsync, rename), so two
processes registering at once both land and a reader never sees half a file.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ImageNotFoundError, ImageRegistrationError

ID_PATTERN = r"^[a-z][a-z0-9_-]*$"
_ID_RE = re.compile(r"[a-z][a-z0-9_-]*")
MAX_ID = 64
MAX_REFERENCE = 255
MAX_ARG = 4096
MAX_ARGS = 256
MAX_DESCRIPTION = 1024
DEFAULT_TIMEOUT_MS = 5_000

# The registry-reference grammar (distribution/reference), ASCII only: an optional
# domain[:port]/, lowercase path components, an optional :tag, an optional @sha256 digest.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE_RE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?"
)
DIGEST_RE = re.compile(r"[a-f0-9]{64}")


@dataclasses.dataclass(frozen=True)
class Healthcheck:
    """Argv run in the guest before the first exec; passes on ``expected_exit_code``."""

    argv: tuple[str, ...]
    expected_exit_code: int = 0
    timeout_ms: float = DEFAULT_TIMEOUT_MS


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    id: str
    image: str
    healthcheck: Healthcheck
    default_entrypoint: tuple[str, ...]
    description: str = ""
    digest: str | None = None
    """sha256 of the built raw disk this entry boots; None until built or pulled."""

    @property
    def pinned_reference(self) -> str:
        base = self.image.split("@", 1)[0]
        return f"{base}@sha256:{self.digest}" if self.digest else self.image

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "healthcheck": {
                "argv": list(self.healthcheck.argv),
                "expected_exit_code": self.healthcheck.expected_exit_code,
                "timeout_ms": self.healthcheck.timeout_ms,
            },
            "default_entrypoint": list(self.default_entrypoint),
            "description": self.description,
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageEntry:
        hc = data["healthcheck"]
        return cls(
            id=data["id"],
            image=data["image"],
            healthcheck=Healthcheck(
                tuple(hc["argv"]),
                hc["expected_exit_code"],
                hc.get("timeout_ms", DEFAULT_TIMEOUT_MS),
            ),
            default_entrypoint=tuple(data["default_entrypoint"]),
            description=data.get("description", ""),
            digest=data.get("digest"),
        )


@dataclasses.dataclass(frozen=True)
class ImageStatus:
    id: str
    image: str
    digest: str | None
    healthy: bool
    last_healthy_at: str | None
    """ISO 8601 time of the last passing healthcheck."""
    last_error: str | None


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    exit_code: int
    stderr: str = ""


Probe = Callable[[ImageEntry], Awaitable[ProbeResult]]


BUILTIN_IMAGES: tuple[ImageEntry, ...] = (
    ImageEntry(
        id="python",
        image="lanekit/python:bookworm",
        healthcheck=Healthcheck(("python3", "-c", "print('ok')"), 0, 20_000),
        default_entrypoint=("python3", "-c"),
        description="Debian 12 minbase with python3.",
    ),
    ImageEntry(
        id="javascript",
        image="lanekit/javascript:bookworm",
        healthcheck=Healthcheck(("node", "-e", "console.log('ok')"), 0, 20_000),
        default_entrypoint=("node", "-e"),
        description="Debian 12 minbase with nodejs.",
    ),
    ImageEntry(
        id="shell",
        image="lanekit/shell:busybox",
        healthcheck=Healthcheck(("sh", "-c", "echo ok"), 0, 5_000),
        default_entrypoint=("sh", "-c"),
        description="busybox, built from the host's busybox-static with no network.",
    ),
)
BUILTIN_IDS = frozenset(e.id for e in BUILTIN_IMAGES)


def validate_id(image_id: object) -> str:
    if not isinstance(image_id, str) or not image_id:
        raise ImageRegistrationError("id is required")
    if len(image_id) > MAX_ID or not _ID_RE.fullmatch(image_id):
        raise ImageRegistrationError(
            f"id {image_id!r} must match {ID_PATTERN} (lowercase ASCII, no spaces) "
            f"and be at most {MAX_ID} characters"
        )
    return image_id


def validate_reference(image: object) -> str:
    if not isinstance(image, str) or not image:
        raise ImageRegistrationError("image reference is required")
    if image.startswith("-"):
        raise ImageRegistrationError(f"image {image!r} looks like a CLI flag — refused")
    if any(ch.isspace() for ch in image):
        raise ImageRegistrationError(f"image {image!r} contains whitespace — refused")
    if len(image) > MAX_REFERENCE or not _REFERENCE_RE.fullmatch(image):
        raise ImageRegistrationError(
            f"image {image!r} is not a valid registry reference "
            "(like name:tag or host:port/path/name:tag, optionally @sha256:<64 hex>)"
        )
    return image


def _validate_argv(argv: object, what: str) -> tuple[str, ...]:
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence) or len(argv) == 0:
        raise ImageRegistrationError(f"{what} must be a non-empty argv array")
    if len(argv) > MAX_ARGS:
        raise ImageRegistrationError(f"{what} has more than {MAX_ARGS} arguments")
    for arg in argv:
        if not isinstance(arg, str):
            raise ImageRegistrationError(f"{what} argv entries must be strings")
        if "\n" in arg or "\r" in arg:
            raise ImageRegistrationError(f"{what} argv entries may not contain newlines")
        if "\0" in arg:
            raise ImageRegistrationError(f"{what} argv entries may not contain NUL bytes")
        if len(arg) > MAX_ARG:
            raise ImageRegistrationError(f"{what} argv entries are limited to {MAX_ARG} characters")
    if not argv[0]:
        raise ImageRegistrationError(f"{what} argv[0] may not be empty")
    return tuple(argv)


def validate_healthcheck(hc: Healthcheck) -> Healthcheck:
    argv = _validate_argv(hc.argv, "healthcheck.command")
    code = hc.expected_exit_code
    if isinstance(code, bool) or not isinstance(code, int):
        raise ImageRegistrationError("healthcheck.expectedExitCode must be an integer")
    if not 0 <= code <= 255:
        raise ImageRegistrationError("healthcheck.expectedExitCode must be an integer in 0..255")
    timeout = hc.timeout_ms
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ImageRegistrationError("healthcheck.timeoutMs must be a positive number")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ImageRegistrationError("healthcheck.timeoutMs must be a positive number")
    return Healthcheck(argv, code, timeout)


def validate_entry(entry: ImageEntry) -> ImageEntry:
    validate_id(entry.id)
    validate_reference(entry.image)
    healthcheck = validate_healthcheck(entry.healthcheck)
    entrypoint = _validate_argv(entry.default_entrypoint, "defaultEntrypoint")
    if not isinstance(entry.description, str) or len(entry.description) > MAX_DESCRIPTION:
        raise ImageRegistrationError(
            f"description must be text of at most {MAX_DESCRIPTION} characters"
        )
    if any(ord(ch) < 32 for ch in entry.description):
        raise ImageRegistrationError("description may not contain control characters")
    if entry.digest is not None and not DIGEST_RE.fullmatch(entry.digest):
        raise ImageRegistrationError("digest must be 64 lowercase hex characters (sha256)")
    return dataclasses.replace(entry, healthcheck=healthcheck, default_entrypoint=entrypoint)


def _now_iso(when: float | None = None) -> str:
    return (
        datetime.fromtimestamp(time.time() if when is None else when, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _fresh_state() -> dict[str, Any]:
    return {
        "version": 1,
        "entries": {e.id: {"entry": e.to_json(), **_blank_status()} for e in BUILTIN_IMAGES},
    }


def _shape_problem(state: object) -> str | None:
    """What makes ``state`` (read back from the file) not a registry, if anything."""
    if not isinstance(state, dict) or not isinstance(state.get("entries"), dict):
        return "no table of entries"
    for image_id, record in state["entries"].items():
        if not isinstance(record, dict) or not isinstance(record.get("entry"), dict):
            return f"entry {image_id!r} has no image"
        if not _blank_status().keys() <= record.keys():
            return f"entry {image_id!r} has no health record"
        try:
            ImageEntry.from_json(record["entry"])
        except KeyError as exc:
            return f"entry {image_id!r} has no {exc}"
        except (TypeError, ValueError) as exc:
            return f"entry {image_id!r} is malformed: {exc}"
    return None


def _blank_status() -> dict[str, Any]:
    return {"healthy": False, "last_healthy_at": None, "last_error": None}


class Registry:
    """The image allow-list: ``Registry(path)`` persists to that file, ``Registry()`` in memory."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory = _fresh_state() if self.path is None else None

    @contextlib.contextmanager
    def _state(self, write: bool) -> Iterator[dict[str, Any]]:
        if self._memory is not None:
            yield self._memory
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            try:
                with open(self.path, encoding="utf-8") as f:
                    state = json.load(f)
            except FileNotFoundError:
                state = _fresh_state()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ImageRegistrationError(
                    f"the registry file {self.path} is corrupt ({exc}); "
                    "move it away to start afresh"
                ) from None
            if (problem := _shape_problem(state)) is not None:
                raise ImageRegistrationError(
                    f"the registry file {self.path} is not a registry ({problem}); "
                    "move it away to start afresh"
                )
            for builtin in BUILTIN_IMAGES:
                state["entries"].setdefault(
                    builtin.id, {"entry": builtin.to_json(), **_blank_status()}
                )
            yield state
            if write:
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.path)
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)

    @staticmethod
    def _record(state: dict[str, Any], image_id: str, *, listing: bool = False) -> dict[str, Any]:
        record: dict[str, Any] | None = state["entries"].get(image_id)
        if record is None:
            if listing:
                known = ", ".join(sorted(state["entries"])) or "(empty)"
                raise ImageNotFoundError(
                    f"sandbox image {image_id!r} is not registered — known: {known}"
                )
            raise ImageNotFoundError(f"sandbox image {image_id!r} is not registered")
        return record

    def register(self, entry: ImageEntry) -> ImageEntry:
        """Add an entry; an id that exists (the built-ins included) is refused."""
        entry = validate_entry(entry)
        with self._state(write=True) as state:
            if entry.id in state["entries"]:
                raise ImageRegistrationError(
                    f"sandbox image id {entry.id!r} is already registered — pick a different id"
                )
            state["entries"][entry.id] = {"entry": entry.to_json(), **_blank_status()}
        return entry

    def pin(self, image_id: str, digest: str) -> ImageEntry:
        """Point an entry at a newly built image; its health is unknown again."""
        if not DIGEST_RE.fullmatch(digest):
            raise ImageRegistrationError("digest must be 64 lowercase hex characters (sha256)")
        with self._state(write=True) as state:
            record = self._record(state, image_id, listing=True)
            entry = dataclasses.replace(ImageEntry.from_json(record["entry"]), digest=digest)
            state["entries"][image_id] = {"entry": entry.to_json(), **_blank_status()}
        return entry

    def lookup(self, image_id: str) -> ImageEntry:
        with self._state(write=False) as state:
            return ImageEntry.from_json(self._record(state, image_id, listing=True)["entry"])

    def has(self, image_id: str) -> bool:
        with self._state(write=False) as state:
            return image_id in state["entries"]

    def list(self) -> list[ImageEntry]:
        with self._state(write=False) as state:
            entries = state["entries"]
            return [ImageEntry.from_json(entries[k]["entry"]) for k in sorted(entries)]

    def allowed_references(self) -> builtins.list[str]:
        return [e.image for e in self.list()]

    def mark_healthy(self, image_id: str, when: float | None = None) -> None:
        """``when`` is seconds since the epoch (default: now)."""
        with self._state(write=True) as state:
            record = self._record(state, image_id)
            record.update(healthy=True, last_healthy_at=_now_iso(when), last_error=None)

    def mark_unhealthy(self, image_id: str, error: str) -> None:
        with self._state(write=True) as state:
            record = self._record(state, image_id)
            record.update(healthy=False, last_error=error)

    def statuses(self) -> builtins.list[ImageStatus]:
        with self._state(write=False) as state:
            out = []
            for image_id in sorted(state["entries"]):
                record = state["entries"][image_id]
                out.append(
                    ImageStatus(
                        id=image_id,
                        image=record["entry"]["image"],
                        digest=record["entry"].get("digest"),
                        healthy=record["healthy"],
                        last_healthy_at=record["last_healthy_at"],
                        last_error=record["last_error"],
                    )
                )
            return out

    async def run_healthchecks(
        self, probe: Probe, ids: Sequence[str] | None = None
    ) -> builtins.list[ImageStatus]:
        """Probe each entry in turn; a probe that fails or raises marks only its own entry."""
        entries = self.list() if ids is None else [self.lookup(i) for i in ids]
        for entry in entries:
            try:
                result = await probe(entry)
            except Exception as exc:
                self.mark_unhealthy(entry.id, str(exc) or type(exc).__name__)
                continue
            if result.exit_code == entry.healthcheck.expected_exit_code:
                self.mark_healthy(entry.id)
            else:
                detail = result.stderr.strip()[:200]
                self.mark_unhealthy(entry.id, f"healthcheck exit {result.exit_code}: {detail}")
        return self.statuses()
