"""Plugin lifecycle: the per-host file and its merge with what the API observed from stage events."""

from __future__ import annotations

import pytest

from forgeflow.plugins.lifecycle import LifecycleState, LifecycleStore, PluginStatus

pytestmark = pytest.mark.fast


def _seen(state: str, updated_at: float, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "plugin": "p", "state": state, "last_error": None, "last_error_type": None, "calls": 0, "failures": 0,
        "last_duration_ms": None, "updated_at": updated_at,
    }  # fmt: skip
    return {**row, **kw}


def test_the_newer_view_wins_and_counts_take_the_larger():
    local = PluginStatus("p", LifecycleState.INITIALIZED, calls=5, failures=0, last_duration_ms=12.0, updated_at=100.0)
    newer = local.merged_with(
        _seen("FAILED", 200.0, last_error="boom", last_error_type="RuntimeError", calls=3, failures=1)
    )
    assert (newer.state, newer.last_error, newer.last_error_type) == (LifecycleState.FAILED, "boom", "RuntimeError")
    assert (newer.calls, newer.failures, newer.updated_at) == (5, 1, 200.0)
    assert newer.last_duration_ms == 12.0  # the observation had no duration: the local one stays
    older = local.merged_with(_seen("FAILED", 50.0, last_error="old", calls=9))
    assert older.state == LifecycleState.INITIALIZED and older.last_error is None
    assert older.calls == 9  # counts take the larger even from an older view
    assert local.merged_with(None) is local


def test_an_unavailable_plugin_stays_unavailable(tmp_path):
    store = LifecycleStore(tmp_path / "plugins.sqlite")
    store.loaded("p", unavailable_reason="missing weights")
    local = store.get("p")
    assert local is not None and local.state == LifecycleState.UNAVAILABLE
    merged = local.merged_with(_seen("INITIALIZED", local.updated_at + 100, calls=4))
    assert merged.state == LifecycleState.UNAVAILABLE
    assert merged.to_dict()["state"] == "UNAVAILABLE"
