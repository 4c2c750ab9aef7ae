"""Settings: defaults <- TOML file <- environment, and every bad value names its field."""

from __future__ import annotations

import typing
from pathlib import Path

import msgspec
import pytest

from pipeline.claude.config import load_settings
from pipeline.claude.settings import (
    DlqSettings,
    RedisSettings,
    ResultSettings,
    RetrySettings,
    RuntimeSettings,
    Settings,
)
from pipeline.runtime.errors import ConfigError

SECTIONS: dict[str, type[msgspec.Struct]] = {
    "redis": RedisSettings,
    "runtime": RuntimeSettings,
    "retry": RetrySettings,
    "dlq": DlqSettings,
    "results": ResultSettings,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def config_error(*args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


def assert_names(err: ConfigError, field: str) -> None:
    assert err.field == field
    assert field in str(err)


# --- defaults, file, environment -------------------------------------------------------------


def test_defaults_without_file_or_env() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.prefix == "pipeline"
    assert s.redis.url == "redis://localhost:6379/0"
    assert s.runtime.lease_ms == 15_000
    assert s.runtime.block_ms == 2000
    assert s.redis.socket_timeout_s * 1000 > s.runtime.block_ms
    assert s.retry.max_attempts == 6
    assert s.results.ttl_s == 3600
    assert s.stages == {}


def test_toml_file_by_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'prefix = "acme"\n[redis]\nurl = "redis://cache:6380/2"\n'
        "[runtime]\nlease_ms = 5000\n[retry]\nmax_attempts = 3\n",
    )
    s = load_settings(path, env={})
    assert s.prefix == "acme"
    assert s.redis.url == "redis://cache:6380/2"
    assert s.runtime.lease_ms == 5000
    assert s.retry.max_attempts == 3
    assert s.runtime.block_ms == RuntimeSettings().block_ms  # untouched fields keep defaults


def test_toml_file_from_pipeline_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[runtime]\nlease_ms = 7000\n")
    s = load_settings(env={"PIPELINE_CONFIG": str(path)})
    assert s.runtime.lease_ms == 7000


def test_explicit_path_wins_over_pipeline_config(tmp_path: Path) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text("[runtime]\nlease_ms = 7000\n")
    arg_file = write(tmp_path, "[runtime]\nlease_ms = 8000\n")
    s = load_settings(arg_file, env={"PIPELINE_CONFIG": str(env_file)})
    assert s.runtime.lease_ms == 8000


def test_env_overrides() -> None:
    s = load_settings(
        env={
            "REDIS_URL": "redis://elsewhere:6390/1",
            "PIPELINE_PREFIX": "staging",
            "PIPELINE_RUNTIME__LEASE_MS": "20000",
            "PIPELINE_RETRY__BASE_MS": "50",
        }
    )
    assert s.redis.url == "redis://elsewhere:6390/1"
    assert s.prefix == "staging"
    assert s.runtime.lease_ms == 20000
    assert isinstance(s.runtime.lease_ms, int)
    assert s.retry.base_ms == 50


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RUNTIME__LEASE_MS", "12345")
    monkeypatch.delenv("PIPELINE_CONFIG", raising=False)
    assert load_settings().runtime.lease_ms == 12345


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'prefix = "fromfile"\n[redis]\nurl = "redis://file:1/0"\n[runtime]\nlease_ms = 5000\n'
        "concurrency = 9\n",
    )
    s = load_settings(
        path,
        env={
            "REDIS_URL": "redis://env:2/0",
            "PIPELINE_PREFIX": "fromenv",
            "PIPELINE_RUNTIME__LEASE_MS": "20000",
        },
    )
    assert s.redis.url == "redis://env:2/0"
    assert s.prefix == "fromenv"
    assert s.runtime.lease_ms == 20000
    assert s.runtime.concurrency == 9  # the file still supplies what env does not override


def test_keyword_overrides_beat_env() -> None:
    s = load_settings(env={"PIPELINE_RUNTIME__LEASE_MS": "20000"}, runtime__lease_ms=999)
    assert s.runtime.lease_ms == 999


def test_rediss_url_with_credentials_accepted() -> None:
    url = "rediss://user:pass@host:6380/0"
    assert load_settings(env={"REDIS_URL": url}).redis.url == url
    assert load_settings(env={"REDIS_URL": "unix:///tmp/redis.sock"}).redis.url


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "1.5", ""])
def test_non_integer_env_value_names_field(value: str) -> None:
    err = config_error(env={"PIPELINE_RUNTIME__LEASE_MS": value})
    assert_names(err, "runtime.lease_ms")


def test_non_integer_file_value_names_field(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, '[runtime]\nlease_ms = "soon"\n'), env={})
    assert_names(err, "runtime.lease_ms")


def test_unknown_setting_names_field(tmp_path: Path) -> None:
    assert_names(config_error(env={"PIPELINE_RUNTIME__NOPE": "1"}), "runtime.nope")
    err = config_error(write(tmp_path, "[runtime]\nnope = 1\n"), env={})
    assert_names(err, "runtime.nope")
    assert "unknown" in str(err)


def _numeric(ftype: object) -> bool:
    """int/float, also behind `Annotated[int, Meta(...)]` constraints."""
    if typing.get_origin(ftype) is typing.Annotated:
        ftype = typing.get_args(ftype)[0]
    return ftype in (int, float)


@pytest.mark.parametrize(
    "field",
    [
        f"{section}.{name}"
        for section, kind in SECTIONS.items()
        for name, ftype in ((f.name, f.type) for f in msgspec.structs.fields(kind))
        if _numeric(ftype)
    ],
)
def test_negative_value_names_field(field: str) -> None:
    section, name = field.split(".")
    env = {f"PIPELINE_{section.upper()}__{name.upper()}": "-1"}
    assert_names(config_error(env=env), field)


def test_zero_lease_rejected() -> None:
    assert_names(config_error(env={"PIPELINE_RUNTIME__LEASE_MS": "0"}), "runtime.lease_ms")


@pytest.mark.parametrize("timeout_s", ["2", "1.5"])
def test_socket_timeout_must_exceed_block_time(timeout_s: str) -> None:
    env = {"PIPELINE_RUNTIME__BLOCK_MS": "2000", "PIPELINE_REDIS__SOCKET_TIMEOUT_S": timeout_s}
    err = config_error(env=env)
    assert_names(err, "redis.socket_timeout_s")
    assert "block_ms" in str(err)
    env["PIPELINE_REDIS__SOCKET_TIMEOUT_S"] = "2.001"
    assert load_settings(env=env).redis.socket_timeout_s == 2.001


@pytest.mark.parametrize("prefix", ["a b", "p{1}", "a:b", "", "a*"])
def test_bad_prefix_chars(prefix: str) -> None:
    err = config_error(env={"PIPELINE_PREFIX": prefix})
    assert_names(err, "prefix")


def test_good_prefix_chars() -> None:
    assert load_settings(env={"PIPELINE_PREFIX": "Acme_prod-2.x"}).prefix == "Acme_prod-2.x"


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "tcp://h:1"])
def test_bad_url_scheme(url: str) -> None:
    assert_names(config_error(env={"REDIS_URL": url}), "redis.url")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    err = config_error(missing, env={})
    assert err.field == "config"
    assert str(missing) in str(err)
    assert "not found" in str(err)
    err = config_error(env={"PIPELINE_CONFIG": str(missing)})
    assert str(missing) in str(err)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[runtime\nlease_ms = \n")
    err = config_error(path, env={})
    assert err.field == "config"
    assert "TOML" in str(err)
    assert str(path) in str(err)


def test_stage_override_bad_type_names_stage_field(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, '[stages.claude-call]\nconcurrency = "x"\n'), env={})
    assert_names(err, "stages.claude-call.concurrency")


def test_stage_override_unknown_setting(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[stages.router]\nnope = 1\n"), env={})
    assert_names(err, "stages.router.nope")


def test_stage_section_not_a_table_names_stage(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[stages]\nrouter = 3\n"), env={})
    assert_names(err, "stages.router")


def test_stage_override_negative_value_rejected(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "[stages.claude-call]\nlease_ms = -5\n"), env={})
    assert_names(err, "stages.claude-call.lease_ms")


def test_stage_override_block_time_checked_against_socket_timeout(tmp_path: Path) -> None:
    # socket_timeout_s defaults to 10 s: a stage blocking 60 s would time out client-side.
    err = config_error(write(tmp_path, "[stages.claude-call]\nblock_ms = 60000\n"), env={})
    assert err.field in ("redis.socket_timeout_s", "stages.claude-call.block_ms")


# --- per-stage runtime -----------------------------------------------------------------------


def test_runtime_for_applies_stage_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[runtime]\nlease_ms = 5000\nconcurrency = 10\n"
        '[stages.claude-call]\nconcurrency = 2000\nread_count = "512"\n',
    )
    s = load_settings(path, env={})
    call = s.runtime_for("claude-call")
    assert call.concurrency == 2000
    assert call.read_count == 512
    assert call.lease_ms == 5000  # inherited from [runtime], not the default
    assert s.runtime.concurrency == 10  # the shared settings are untouched
    assert s.runtime_for("router") == s.runtime
    assert s.runtime_for("router").concurrency == 10
