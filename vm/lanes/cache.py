"""This host's cache of lanes: which lanes it knows (and in which store), and what it last
saw of them. SQLite in WAL mode under ``$LANEKIT_HOME``; never the truth about who runs a
lane (that is the lease in the store): ``lane ls`` refreshes every row from the store."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LaneError

SCHEMA = """
CREATE TABLE IF NOT EXISTS lanes (
    name TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    s3_endpoint TEXT,
    state TEXT NOT NULL,
    host TEXT,
    pid INTEGER,
    updated REAL NOT NULL
)
"""


@dataclasses.dataclass(frozen=True)
class CachedLane:
    name: str
    store: str
    s3_endpoint: str | None
    state: str
    host: str | None
    pid: int | None
    updated: float


class LaneCache:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, home: Path) -> LaneCache:
        """The cache of the state directory ``home``."""
        return cls(home / "lanes.db")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0)
        try:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
            except sqlite3.DatabaseError as exc:
                if "locked" in str(exc):
                    raise LaneError(
                        f"this host's lane cache {self.path} stayed locked by another "
                        "lanekit for 10 s: try again"
                    ) from None
                raise LaneError(
                    f"this host's lane cache {self.path} is unreadable ({exc}); move it "
                    "away: it only caches what the stores hold, and `lanekit lane ls "
                    "--store URL` finds the lanes again"
                ) from None
            with db:
                yield db
        finally:
            db.close()

    def get(self, name: str) -> CachedLane | None:
        if not self.path.exists():
            return None  # a lookup that fails leaves no cache behind
        with self._db() as db:
            row = db.execute(
                "SELECT name, store, s3_endpoint, state, host, pid, updated FROM lanes "
                "WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else CachedLane(*row)

    def all(self) -> list[CachedLane]:
        if not self.path.exists():
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT name, store, s3_endpoint, state, host, pid, updated FROM lanes "
                "ORDER BY name"
            ).fetchall()
        return [CachedLane(*row) for row in rows]

    def put(
        self,
        name: str,
        store: str,
        s3_endpoint: str | None,
        state: str,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO lanes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, store, s3_endpoint, state, host, pid, time.time()),
            )

    def forget(self, name: str) -> None:
        if not self.path.exists():
            return
        with self._db() as db:
            db.execute("DELETE FROM lanes WHERE name = ?", (name,))
