"""The kept empty Prefect database: made once from a freshly migrated one, given to new homes only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from forgeflow.jobs import prefect_db_cache

pytestmark = pytest.mark.fast


def migrated_home(path: Path) -> Path:
    """A Prefect home whose database looks migrated (WAL mode, as the server leaves it)."""
    path.mkdir(parents=True)
    with sqlite3.connect(path / "prefect.db") as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE alembic_version (version_num TEXT)")
        conn.execute("INSERT INTO alembic_version VALUES ('head')")
    (path / "memo_store.toml").write_text("block_auto_registration = 'abc'\n")
    return path


def version_of(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_a_fresh_database_is_kept_once_and_seeds_only_homes_without_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    cache = tmp_path / "cache"
    source = migrated_home(tmp_path / "first")
    assert prefect_db_cache.keep_copy(source, cache)
    copy = prefect_db_cache.cached_copy(cache)
    assert copy is not None and copy.is_file() and version_of(copy) == "head"
    assert list(cache.glob("*.tmp")) == []  # written aside, renamed into place
    assert prefect_db_cache.keep_copy(source, cache) is False  # one copy per Prefect version

    new = tmp_path / "new-home" / "prefect"
    assert prefect_db_cache.seed_home(new, cache)
    assert version_of(new / "prefect.db") == "head"
    assert (new / "memo_store.toml").read_text() == "block_auto_registration = 'abc'\n"

    used = migrated_home(tmp_path / "used")  # a home with a database of its own keeps it
    with sqlite3.connect(used / "prefect.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'mine'")
    assert prefect_db_cache.seed_home(used, cache) is False
    assert version_of(used / "prefect.db") == "mine"
    assert prefect_db_cache.seed_home(tmp_path / "no-cache", None) is False


def test_a_server_on_another_database_neither_takes_nor_makes_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect@localhost/prefect")
    cache = tmp_path / "cache"
    assert prefect_db_cache.keep_copy(migrated_home(tmp_path / "first"), cache) is False
    assert not cache.exists()
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    assert prefect_db_cache.keep_copy(tmp_path / "first", cache)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect@localhost/prefect")
    assert prefect_db_cache.seed_home(tmp_path / "new", cache) is False
    assert not (tmp_path / "new" / "prefect.db").exists()


def test_a_home_made_ready_for_its_server_says_whether_to_keep_a_copy(tmp_path, monkeypatch):
    """``prepare_home``, as ``LocalPrefectServer`` and ``forgeflow up`` call it: a seeded home's server
    is told there is nothing to migrate (the caller's setting still wins); a home without a kept copy
    makes a fresh database, to be kept once the server answers; a home with a database does neither."""
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    cache = tmp_path / "cache"
    env: dict[str, str] = {}
    assert prefect_db_cache.prepare_home(tmp_path / "first", cache, env) is True  # nothing kept yet
    assert env == {}
    assert prefect_db_cache.keep_copy(migrated_home(tmp_path / "migrated"), cache)

    env = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "true"}
    assert prefect_db_cache.prepare_home(tmp_path / "second", cache, env) is False
    assert env == {"PREFECT_API_DATABASE_MIGRATE_ON_START": "false", "PREFECT_API_BLOCKS_REGISTER_ON_START": "true"}
    assert version_of(tmp_path / "second" / "prefect.db") == "head"

    env = {}
    assert prefect_db_cache.prepare_home(tmp_path / "migrated", cache, env) is False  # its own database
    assert env == {}
