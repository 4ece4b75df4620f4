"""An empty, migrated Prefect database kept per Prefect version, so a new home's server skips migrating.

A local Prefect server on a fresh SQLite file first runs all of Prefect's Alembic migrations and
registers its block types: on a 2-core machine that is most of its start-up (5–15 s), paid again
by every new ``FORGEFLOW_HOME`` (a new user's first ``forgeflow run``, each test home, a project of
its own). After a server of this machine has migrated a fresh database once, a copy of it, still
empty of runs, is kept in ``FORGEFLOW_PREFECT_DB_CACHE`` (default ``~/.cache/forgeflow``), named by
the Prefect version; a server whose home has no database yet starts from that copy, and Prefect's
own start-up check finds nothing left to migrate. Another Prefect version makes and uses its own
copy. A server whose database is not the default SQLite file (``PREFECT_API_DATABASE_CONNECTION_URL``,
PostgreSQL say) neither takes nor makes one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: The files of a Prefect home the copy holds: the database and the record of registered block types.
DB_FILE = "prefect.db"
MEMO_FILE = "memo_store.toml"


def _prefect_version() -> str | None:
    try:
        return version("prefect")
    except PackageNotFoundError:
        return None


def _uses_default_database() -> bool:
    return not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")


def cached_copy(cache_dir: Path) -> Path | None:
    """Where this Prefect version's empty database is kept (None: no Prefect installed)."""
    prefect_version = _prefect_version()
    return Path(cache_dir) / f"prefect-{prefect_version}.db" if prefect_version else None


def seed_home(prefect_home: Path, cache_dir: Path | None) -> bool:
    """Give a Prefect home without a database the kept empty one; whether it did."""
    if cache_dir is None or not _uses_default_database() or (Path(prefect_home) / DB_FILE).exists():
        return False
    copy = cached_copy(cache_dir)
    if copy is None or not copy.is_file():
        return False
    Path(prefect_home).mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(copy, Path(prefect_home) / DB_FILE)
        memo = copy.with_suffix(".memo.toml")
        if memo.is_file():
            shutil.copyfile(memo, Path(prefect_home) / MEMO_FILE)
    except OSError:
        (Path(prefect_home) / DB_FILE).unlink(missing_ok=True)  # half a copy: Prefect migrates afresh
        return False
    return True


def prepare_home(prefect_home: Path, cache_dir: Path | None, env: dict[str, str]) -> bool:
    """Before a server of ``prefect_home`` starts with ``env``: seed the home (:func:`seed_home`) and,
    when seeded, tell the server there is nothing to migrate or register (the caller's ``env`` still
    wins). Returns whether the server will make a fresh database, of which :func:`keep_copy` keeps a
    copy once the server answers."""
    seeded = seed_home(prefect_home, cache_dir)
    if seeded:  # this Prefect version's database, migrated and with its block types: nothing to redo
        env.setdefault("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")
        env.setdefault("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
    return not seeded and not (Path(prefect_home) / DB_FILE).exists()


def keep_copy(prefect_home: Path, cache_dir: Path | None) -> bool:
    """Keep the database of a server that has just migrated a fresh one (and has run nothing yet),
    unless a copy is kept already; whether it did. A consistent snapshot (SQLite's backup), written
    next to its place and renamed into it, so concurrent servers never see half a copy."""
    if cache_dir is None or not _uses_default_database():
        return False
    copy = cached_copy(cache_dir)
    source = Path(prefect_home) / DB_FILE
    if copy is None or copy.exists() or not source.is_file():
        return False
    tmp: str | None = None
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=copy.name, suffix=".tmp", dir=copy.parent)
        os.close(fd)
        with (
            contextlib.closing(sqlite3.connect(source, timeout=30)) as src,
            contextlib.closing(sqlite3.connect(tmp)) as dst,
        ):
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        memo = Path(prefect_home) / MEMO_FILE
        if memo.is_file():
            shutil.copyfile(memo, copy.with_suffix(".memo.toml"))
        os.replace(tmp, copy)
    except (OSError, sqlite3.Error):
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
    return True
