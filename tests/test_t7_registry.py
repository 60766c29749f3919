"""The image registry: crewhaus's registry tests translated to pytest, then stricter ones."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest

from vm import (
    Healthcheck,
    ImageEntry,
    ImageNotFoundError,
    ImageRegistrationError,
    ProbeResult,
    Registry,
)

DIGEST = "a" + "b" * 63


def go_entry(**changes: object) -> ImageEntry:
    fields: dict[str, object] = {
        "id": "go",
        "image": "golang:1.23-alpine",
        "default_entrypoint": ("go", "run", "-"),
        "healthcheck": Healthcheck(("go", "version"), 0),
    }
    fields.update(changes)
    return ImageEntry(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "file"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    return Registry() if request.param == "memory" else Registry(tmp_path / "registry.json")


# ------------------------------------------------- the seed's tests, translated


def test_builtin_trio_present(registry: Registry) -> None:
    assert registry.has("python") and registry.has("javascript") and registry.has("shell")
    py = registry.lookup("python")
    assert py.image == "lanekit/python:bookworm"
    assert py.default_entrypoint == ("python3", "-c")
    assert registry.lookup("javascript").image == "lanekit/javascript:bookworm"
    assert registry.lookup("shell").image == "lanekit/shell:busybox"


def test_register_with_healthcheck_contract(registry: Registry) -> None:
    entry = registry.register(
        go_entry(healthcheck=Healthcheck(("go", "version"), 0, 2000), description="Go 1.23 alpine")
    )
    assert entry.id == "go"
    assert entry.image == "golang:1.23-alpine"
    assert entry.healthcheck.argv == ("go", "version")
    assert registry.lookup("go").image == "golang:1.23-alpine"
    assert registry.lookup("go").description == "Go 1.23 alpine"


def test_list_sorted_with_builtins(registry: Registry) -> None:
    registry.register(go_entry())
    assert [e.id for e in registry.list()] == ["go", "javascript", "python", "shell"]


def test_allowed_references(registry: Registry) -> None:
    refs = registry.allowed_references()
    assert "lanekit/python:bookworm" in refs
    assert "lanekit/javascript:bookworm" in refs
    assert "lanekit/shell:busybox" in refs


def test_unknown_id_lists_known(registry: Registry) -> None:
    with pytest.raises(ImageNotFoundError, match="known: javascript, python, shell"):
        registry.lookup("ghost")


def test_duplicate_refused(registry: Registry) -> None:
    registry.register(go_entry())
    with pytest.raises(ImageRegistrationError, match="already registered"):
        registry.register(go_entry())


def test_builtin_not_reregistrable(registry: Registry) -> None:
    with pytest.raises(ImageRegistrationError, match="already registered"):
        registry.register(
            go_entry(
                id="python",
                image="python:3.13-slim",
                default_entrypoint=("python3", "-c"),
                healthcheck=Healthcheck(("python3", "-c", "print(1)"), 0),
            )
        )


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("--privileged", "CLI flag"),
        ("alpine:3.19 --privileged", "whitespace"),
        ("alpine:3.19\n--privileged", "whitespace"),
        ("alpine:$(id)", "valid registry reference"),
    ],
)
def test_seed_reference_rejections(registry: Registry, image: str, message: str) -> None:
    with pytest.raises(ImageRegistrationError, match=message):
        registry.register(go_entry(id="evil", image=image))


def test_empty_healthcheck_argv(registry: Registry) -> None:
    with pytest.raises(ImageRegistrationError, match="non-empty argv"):
        registry.register(go_entry(healthcheck=Healthcheck((), 0)))


def test_non_integer_exit_code(registry: Registry) -> None:
    with pytest.raises(ImageRegistrationError, match="integer"):
        registry.register(go_entry(healthcheck=Healthcheck(("go", "version"), 0.5)))  # type: ignore[arg-type]


def test_healthcheck_argv_newline(registry: Registry) -> None:
    with pytest.raises(ImageRegistrationError, match="newlines"):
        registry.register(go_entry(healthcheck=Healthcheck(("go\nversion",), 0)))


def test_empty_entrypoint(registry: Registry) -> None:
    with pytest.raises(ImageRegistrationError, match="non-empty argv"):
        registry.register(go_entry(default_entrypoint=()))


@pytest.mark.parametrize("bad_id", ["GoLang", "go lang"])
def test_bad_ids(registry: Registry, bad_id: str) -> None:
    with pytest.raises(ImageRegistrationError):
        registry.register(go_entry(id=bad_id))


def test_digest_pinned_reference_accepted(registry: Registry) -> None:
    ref = f"rust:1-alpine@sha256:{DIGEST}"
    registry.register(go_entry(id="rust-pinned", image=ref, default_entrypoint=("sh", "-c")))
    assert registry.lookup("rust-pinned").image == ref


def test_statuses_start_unknown(registry: Registry) -> None:
    registry.register(go_entry())
    statuses = registry.statuses()
    assert {"go", "python"} <= {s.id for s in statuses}
    for s in statuses:
        assert s.healthy is False and s.last_healthy_at is None and s.last_error is None


def test_mark_healthy_and_unhealthy(registry: Registry) -> None:
    registry.register(go_entry())
    registry.mark_healthy("go", 1700000000.0)
    (s,) = [x for x in registry.statuses() if x.id == "go"]
    assert s.healthy
    assert datetime.fromisoformat(s.last_healthy_at or "").timestamp() == 1700000000.0
    registry.mark_unhealthy("go", "image pull denied")
    (s,) = [x for x in registry.statuses() if x.id == "go"]
    assert not s.healthy and s.last_error == "image pull denied"


def test_mark_unknown_raises(registry: Registry) -> None:
    with pytest.raises(ImageNotFoundError):
        registry.mark_healthy("ghost")
    with pytest.raises(ImageNotFoundError):
        registry.mark_unhealthy("ghost", "nope")


async def test_run_healthchecks_isolates_failures(registry: Registry) -> None:
    registry.register(go_entry())
    calls: list[str] = []

    async def probe(entry: ImageEntry) -> ProbeResult:
        calls.append(entry.id)
        if entry.id == "javascript":
            return ProbeResult(17, "node: not found")
        if entry.id == "shell":
            raise RuntimeError("shell probe blew up")
        return ProbeResult(0)

    statuses = {s.id: s for s in await registry.run_healthchecks(probe)}
    assert sorted(calls) == ["go", "javascript", "python", "shell"]
    assert statuses["go"].healthy and statuses["python"].healthy
    assert not statuses["javascript"].healthy
    assert "node: not found" in (statuses["javascript"].last_error or "")
    assert not statuses["shell"].healthy
    assert "shell probe blew up" in (statuses["shell"].last_error or "")


# ------------------------------------------------------------ stricter ones


@pytest.mark.parametrize(
    "image",
    [
        "-rm",
        "alpine;id",
        "alpine|sh",
        "alpine&&id",
        "alpine`id`",
        "alpine>x",
        "Alpine:3",  # uppercase names are not references
        "\u0430lpine:3",  # Cyrillic a
        "alpine:3\u00a0x",
        "alpine:3\u2028",
        "alpine:\uff13",  # fullwidth digit
        "alpine@sha256:abc",
        f"alpine@sha256:{'A' * 64}",
        f"alpine@sha512:{'a' * 64}",
        "alpine:",
        ":3.19",
        "alpine/",
        "/alpine",
        "alpine//x",
        "a" * 256,
        "alpine:" + "t" * 129,
        "../etc/passwd",
        "alpine:3.19\x00",
        "",
    ],
)
def test_stricter_reference_rejections(registry: Registry, image: str) -> None:
    with pytest.raises(ImageRegistrationError):
        registry.register(go_entry(id="evil", image=image))
    assert not registry.has("evil")


@pytest.mark.parametrize(
    "image",
    [
        "alpine",
        "library/alpine:3.19",
        "localhost:5000/team/tool:v1.2_3",
        "registry.example.com/a-b/c__d:latest",
        f"lanekit/shell@sha256:{DIGEST}",
        f"ghcr.io/x/y:1@sha256:{DIGEST}",
    ],
)
def test_references_accepted(registry: Registry, image: str) -> None:
    registry.register(go_entry(id="ok", image=image))
    assert registry.lookup("ok").image == image


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": ""}, "id is required"),
        ({"id": "9go"}, "must match"),
        ({"id": "go.lang"}, "must match"),
        ({"id": "g" * 65}, "at most 64"),
        ({"id": "g\u043e"}, "must match"),  # Cyrillic o
        ({"healthcheck": Healthcheck(("go",), True)}, "integer"),  # type: ignore[arg-type]
        ({"healthcheck": Healthcheck(("go",), 256)}, "0..255"),
        ({"healthcheck": Healthcheck(("go",), 0, 0)}, "positive"),
        ({"healthcheck": Healthcheck(("go",), 0, -5)}, "positive"),
        ({"healthcheck": Healthcheck(("go",), 0, float("nan"))}, "positive"),
        ({"healthcheck": Healthcheck(("go",), 0, float("inf"))}, "positive"),
        ({"healthcheck": Healthcheck("go version", 0)}, "non-empty argv"),  # type: ignore[arg-type]
        ({"healthcheck": Healthcheck(("go", 1), 0)}, "strings"),  # type: ignore[arg-type]
        ({"healthcheck": Healthcheck(("go\x00",), 0)}, "NUL"),
        ({"healthcheck": Healthcheck(("go\r",), 0)}, "newlines"),
        ({"healthcheck": Healthcheck(("",), 0)}, "argv\\[0\\]"),
        ({"healthcheck": Healthcheck(("x" * 5000,), 0)}, "limited"),
        ({"default_entrypoint": ("sh", "a\nb")}, "newlines"),
        ({"description": "x" * 2000}, "at most"),
        ({"description": "a\x1b[31mred"}, "control"),
        ({"digest": "abc"}, "64 lowercase hex"),
    ],
)
def test_stricter_field_rejections(
    registry: Registry, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ImageRegistrationError, match=message):
        registry.register(go_entry(**changes))
    assert not registry.has("go")


def test_pin_records_digest_and_resets_health(registry: Registry) -> None:
    registry.mark_healthy("shell")
    entry = registry.pin("shell", DIGEST)
    assert entry.digest == DIGEST
    assert entry.pinned_reference == f"lanekit/shell:busybox@sha256:{DIGEST}"
    assert registry.lookup("shell").digest == DIGEST
    (s,) = [x for x in registry.statuses() if x.id == "shell"]
    assert s.digest == DIGEST and not s.healthy
    with pytest.raises(ImageRegistrationError):
        registry.pin("shell", "not-a-digest")
    with pytest.raises(ImageNotFoundError, match="known:"):
        registry.pin("ghost", DIGEST)


def test_registries_are_independent_objects(tmp_path: Path) -> None:
    a, b = Registry(), Registry(tmp_path / "r.json")
    a.register(go_entry())
    assert not b.has("go")


def test_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    Registry(path).register(go_entry())
    Registry(path).mark_healthy("go")
    again = Registry(path)
    assert again.lookup("go").image == "golang:1.23-alpine"
    assert next(s for s in again.statuses() if s.id == "go").healthy


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text("{not json")
    with pytest.raises(ImageRegistrationError, match="corrupt"):
        Registry(path).list()


def _register_many(path: str, prefix: str, count: int) -> None:
    registry = Registry(path)
    for i in range(count):
        registry.register(go_entry(id=f"{prefix}{i}"))


def test_two_processes_register_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(path, p, 25)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = {e.id for e in Registry(path).list()}
    assert {f"a{i}" for i in range(25)} <= ids
    assert {f"b{i}" for i in range(25)} <= ids
    assert len(ids) == 53
