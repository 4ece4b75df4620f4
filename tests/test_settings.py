"""Settings: every knob from a FORGEFLOW_* variable, the derived paths, and what children read back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from forgeflow.settings import Settings, get_settings

pytestmark = pytest.mark.fast


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No FORGEFLOW_* variable and no .env file in the working directory."""
    for name in list(os.environ):
        if name.startswith("FORGEFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings()
    assert settings.home == tmp_path / ".forgeflow"
    assert (settings.runner, settings.reuse_workers, settings.api_host, settings.api_port) == (
        "process",
        True,
        "127.0.0.1",
        8700,
    )
    assert settings.api_token is None and settings.database_url is None


def test_variables_and_a_dotenv_file_are_read(clean_env, tmp_path):
    clean_env.setenv("FORGEFLOW_HOME", str(tmp_path / "home"))
    clean_env.setenv("FORGEFLOW_RUNNER", "inline")
    clean_env.setenv("FORGEFLOW_DEVICE_SLOTS", '{"cpu": 3, "cuda:0": 1}')
    clean_env.setenv("FORGEFLOW_MEDIA_INPUT_ROOTS", '["/data/a", "/data/b"]')
    clean_env.setenv("FORGEFLOW_REUSE_WORKERS", "false")
    clean_env.setenv("FORGEFLOW_API_TOKEN", "s3cret")
    (tmp_path / ".env").write_text("FORGEFLOW_MAX_STAGES=7\n")
    settings = Settings()
    assert settings.home == tmp_path / "home" and settings.runner == "inline"
    assert settings.device_slots == {"cpu": 3, "cuda:0": 1}
    assert settings.media_input_roots == [Path("/data/a"), Path("/data/b")]
    assert settings.reuse_workers is False and settings.max_stages == 7
    assert settings.api_token.get_secret_value() == "s3cret" and "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FORGEFLOW_RUNNER", "thread"),
        ("FORGEFLOW_POOL_SIZE", "0"),
        ("FORGEFLOW_STAGE_MEMORY_LIMIT_MB", "32"),
        ("FORGEFLOW_API_PORT", "70000"),
        ("FORGEFLOW_WS_QUEUE_SIZE", "5"),
        ("FORGEFLOW_MAX_STAGE_TIMEOUT_S", "0"),
    ],
)
def test_out_of_range_values_are_refused(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert info.value.errors()[0]["loc"] == (name.removeprefix("FORGEFLOW_").lower(),)


def test_derived_paths_and_database_url(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.media_root == tmp_path / "media" and settings.spool_dir == tmp_path / "spool"
    assert settings.jobs_dir == tmp_path / "jobs" and settings.logs_dir == tmp_path / "logs"
    assert settings.cache_dir == tmp_path / "cache" and settings.lifecycle_db == tmp_path / "plugins.sqlite"
    assert settings.engine_socket_path == tmp_path / "engine.sock"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'forgeflow.sqlite'}"
    other = Settings(home=tmp_path, engine_socket=tmp_path / "x.sock", database_url="postgresql://h/db")
    assert other.engine_socket_path == tmp_path / "x.sock" and other.resolved_database_url == "postgresql://h/db"


def test_pool_size_of_a_plugin(tmp_path):
    settings = Settings(home=tmp_path, pool_size=3, pool_sizes={"pose-estimator": 1})
    assert (settings.pool_size_of("pose-estimator"), settings.pool_size_of("testkit")) == (1, 3)


def test_to_env_is_read_back_as_the_same_settings_without_secrets(clean_env, tmp_path):
    settings = Settings(
        home=tmp_path / "home",
        runner="inline",
        reuse_workers=False,
        device_slots={"cpu": 2},
        media_input_roots=[tmp_path / "media-in"],
        pool_sizes={"classifier": 4},
        api_token=SecretStr("api-secret"),
        ingest_token=SecretStr("ingest-secret"),
    )
    env = settings.to_env()
    assert env["FORGEFLOW_REUSE_WORKERS"] == "false" and env["FORGEFLOW_RUNNER"] == "inline"
    assert "FORGEFLOW_API_TOKEN" not in env and "FORGEFLOW_INGEST_TOKEN" not in env
    assert "FORGEFLOW_DATABASE_URL" not in env  # None is left out
    assert not any("secret" in v for v in env.values())
    for name, value in env.items():
        clean_env.setenv(name, value)
    again = Settings()
    assert again.model_dump(exclude={"api_token", "ingest_token"}) == settings.model_dump(
        exclude={"api_token", "ingest_token"}
    )
    assert again.api_token is None and again.ingest_token is None


def test_get_settings_is_cached_until_cleared(clean_env, tmp_path):
    clean_env.setenv("FORGEFLOW_HOME", str(tmp_path / "one"))
    first = get_settings()
    clean_env.setenv("FORGEFLOW_HOME", str(tmp_path / "two"))
    assert get_settings() is first and first.home == tmp_path / "one"
    get_settings.cache_clear()
    assert get_settings().home == tmp_path / "two"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/data/videos", [Path("/data/videos")]),  # the plain folder README documents
        (f"/data/a{os.pathsep}/data/b", [Path("/data/a"), Path("/data/b")]),
        ('["/data/a", "/data/b"]', [Path("/data/a"), Path("/data/b")]),
        ("", []),
    ],
)
def test_media_input_roots_accept_every_documented_form(clean_env, value, expected):
    clean_env.setenv("FORGEFLOW_MEDIA_INPUT_ROOTS", value)
    assert get_settings().media_input_roots == expected


@pytest.mark.parametrize("name", ["FORGEFLOW_POOL_SIZES", "FORGEFLOW_DEVICE_SLOTS"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"cpu": 2, "cuda:0": 1}', {"cpu": 2, "cuda:0": 1}),
        ("cpu=2,cuda:0=1", {"cpu": 2, "cuda:0": 1}),
        (" pose-estimator = 3 ", {"pose-estimator": 3}),
        ("", {}),
    ],
)
def test_per_name_counts_accept_json_and_pairs(clean_env, name, value, expected):
    clean_env.setenv(name, value)
    settings = get_settings()
    assert getattr(settings, name.removeprefix("FORGEFLOW_").lower()) == expected


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("FORGEFLOW_DEVICE_SLOTS", "cpu", "name=count pairs like cpu=2"),
        ("FORGEFLOW_POOL_SIZES", '{"pose": ', "not a JSON object"),
        ("FORGEFLOW_POOL_SIZES", "pose=many", "valid integer"),
        ("FORGEFLOW_MEDIA_INPUT_ROOTS", '["/a", ', "not a JSON list"),
        ("FORGEFLOW_RUNNER", "podman", "'process', 'docker' or 'inline'"),
        ("FORGEFLOW_REUSE_WORKERS", "maybe", "valid boolean"),
        ("FORGEFLOW_API_PORT", "http", "valid integer"),
        ("FORGEFLOW_MAX_STAGE_TIMEOUT_S", "-1", "greater than 0"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_variable(clean_env, name, value, says):
    from forgeflow.settings import InvalidSettings

    clean_env.setenv(name, value)
    with pytest.raises(InvalidSettings) as info:
        get_settings()
    message = str(info.value)
    assert message.startswith("ForgeFlow cannot start")
    assert f"{name}={value!r}" in message and says in message
    assert "expected:" in message  # the accepted forms, from the setting's description


def test_the_cli_stops_with_that_message(clean_env, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "FORGEFLOW_DEVICE_SLOTS": "cpu", "FORGEFLOW_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", "plugins", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "FORGEFLOW_DEVICE_SLOTS='cpu'" in done.stderr and "Traceback" not in done.stderr
