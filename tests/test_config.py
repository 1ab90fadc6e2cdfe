"""Configuration: the spec's defaults, DATABASE_URL/REDIS_URI forms, invalid values named,
production's mandatory variables, the development secret key and the `token` command."""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from agent_orchestrator.config import Settings, format_settings_error
from agent_orchestrator.models.principal import Scope
from tests.conftest import clean_env
from tests.processes import CLI

JWT_LINE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n$")
FromEnv = Callable[..., Settings]
ALL_BUT_ADMIN = {scope.value for scope in Scope} - {Scope.ADMIN.value}


@pytest.fixture
def from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FromEnv:
    """Settings built the way the service builds them: from the environment only (every
    variable of ours cleared first; the working directory holds no .env)."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)

    def build(**env: str) -> Settings:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=tmp_path,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_spec_defaults(from_env: FromEnv) -> None:
    settings = from_env()
    assert settings.service_port == 8008
    assert settings.max_concurrent_tasks == 100
    assert settings.global_rate_limit == 1000
    assert settings.tenant_rate_limit == 100
    assert settings.session_ttl == 3600
    assert settings.task_timeout == 60
    assert settings.retry_attempts == 3
    assert settings.websocket_max_connections == 10000
    assert settings.log_level == "INFO"
    assert settings.environment == "development"
    assert settings.database_url is None
    assert settings.redis_uri is None
    assert settings.data_dir == Path("data")
    assert not settings.uses_redis
    assert settings.should_auto_migrate


def test_values_come_from_the_environment(from_env: FromEnv) -> None:
    settings = from_env(
        SERVICE_PORT="9001", SESSION_TTL="120", LOG_LEVEL="debug", ALLOWED_ORIGINS="a, b"
    )
    assert settings.service_port == 9001
    assert settings.session_ttl == 120
    assert settings.log_level == "DEBUG"
    assert settings.allowed_origins == ["a", "b"]


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        ("postgresql://u:p@db.example:5432/app", "postgresql+asyncpg://u:p@db.example:5432/app"),
        ("postgres://u@db.example/app", "postgresql+asyncpg://u@db.example/app"),
        ("postgresql+asyncpg://u@db.example/app", "postgresql+asyncpg://u@db.example/app"),
        ("sqlite:///relative/orch.db", "sqlite+aiosqlite:///relative/orch.db"),
        ("sqlite:////abs/orch.db", "sqlite+aiosqlite:////abs/orch.db"),
        ("sqlite+aiosqlite:////abs/orch.db", "sqlite+aiosqlite:////abs/orch.db"),
    ],
)
def test_database_url_forms(from_env: FromEnv, given: str, resolved: str) -> None:
    url = from_env(DATABASE_URL=given).resolved_database_url()
    assert url == resolved
    assert make_url(url).get_driver_name() in {"asyncpg", "aiosqlite"}


def test_no_database_url_means_sqlite_in_data_dir(from_env: FromEnv, tmp_path: Path) -> None:
    url = make_url(from_env(DATA_DIR=str(tmp_path / "state")).resolved_database_url())
    assert url.get_driver_name() == "aiosqlite"
    assert url.database == str((tmp_path / "state" / "orchestrator.db").resolve())


def test_redis_uri_forms(from_env: FromEnv) -> None:
    assert from_env(REDIS_URI="redis://cache:6379/0").uses_redis
    assert from_env(REDIS_URI="rediss://:pw@cache:6380/1").redis_uri == "rediss://:pw@cache:6380/1"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_CONCURRENT_TASKS", "-1"),
        ("MAX_CONCURRENT_TASKS", "0"),
        ("GLOBAL_RATE_LIMIT", "-5"),
        ("TENANT_RATE_LIMIT", "-1"),
        ("SESSION_TTL", "-3600"),
        ("SESSION_TTL", "0"),
        ("TASK_TIMEOUT", "-1"),
        ("RETRY_ATTEMPTS", "-1"),
        ("WEBSOCKET_MAX_CONNECTIONS", "-10"),
        ("SERVICE_PORT", "-1"),
        ("SERVICE_PORT", "70000"),
        ("MAX_REQUEST_BYTES", "-1"),
        ("SESSION_TTL", "an hour"),
        ("LOG_LEVEL", "LOUD"),
        ("ENVIRONMENT", "staging"),
        ("JWT_ALGORITHM", "none"),
        ("DATABASE_URL", "mysql://db.example/app"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "postgresql:///no-host"),
        ("DATABASE_URL", "sqlite:///:memory:"),
        ("DATABASE_URL", "sqlite+aiosqlite://"),
        ("REDIS_URI", "http://cache:6379"),
        ("REDIS_URI", "redis://"),
        ("REDIS_URI", "cache:6379"),
        ("CONVERSATION_SERVICE_URL", "ftp://conversation"),
        ("IDENTITY_SERVICE_URL", "identity:8000"),
    ],
)
def test_invalid_values_are_rejected_naming_the_variable(
    from_env: FromEnv, name: str, value: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        from_env(**{name: value})
    message = format_settings_error(raised.value)
    assert message.startswith("invalid configuration: ")
    assert name in message
    assert "\n" not in message


def test_serve_refuses_invalid_values_in_one_line(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "serve",
        TENANT_RATE_LIMIT="-5",
        DATABASE_URL="mysql://db.example/app",
        DATA_DIR=str(tmp_path / "data"),
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TENANT_RATE_LIMIT" in lines[0]
    assert "DATABASE_URL" in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "data").exists(), "nothing is created before the settings are valid"


def test_production_without_required_variables_fails_fast(tmp_path: Path) -> None:
    result = _run(tmp_path, "serve", ENVIRONMENT="production")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in ("DATABASE_URL", "REDIS_URI", "SECRET_KEY", "SERVICE_TOKEN"):
        assert name in lines[0]
    assert not (tmp_path / "data").exists(), "production never falls back to SQLite"


def test_production_names_only_what_is_missing(tmp_path: Path) -> None:
    result = _run(
        tmp_path,
        "serve",
        ENVIRONMENT="production",
        REDIS_URI="redis://127.0.0.1:6379/0",
        SECRET_KEY="k" * 48,
        SERVICE_TOKEN="t" * 32,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATABASE_URL" in lines[0]
    for name in ("REDIS_URI", "SECRET_KEY", "SERVICE_TOKEN"):
        assert name not in lines[0]


def test_development_secret_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = _run(tmp_path, "token", "--tenant", "t1", "--user", "u1", DATA_DIR=str(data))
    key_file = data / "secret_key"
    assert first.returncode == 0, first.stderr
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32

    second = _run(tmp_path, "token", "--tenant", "t2", "--user", "u2", DATA_DIR=str(data))
    assert second.returncode == 0, second.stderr
    assert key_file.read_text().strip() == key, "the key is generated once, then reused"
    for result, tenant in ((first, "t1"), (second, "t2")):
        claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"])
        assert claims["tenant_id"] == tenant


def test_token_prints_only_a_jwt_with_every_scope_but_admin(tmp_path: Path) -> None:
    key = "s" * 48
    result = _run(tmp_path, "token", "--tenant", "acme", "--user", "alice", SECRET_KEY=key)
    assert result.returncode == 0, result.stderr
    assert JWT_LINE.match(result.stdout), result.stdout
    claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["tenant_id"] == "acme"
    assert set(claims["scopes"].split()) == ALL_BUT_ADMIN
    assert claims["exp"] - claims["iat"] == 3600
    assert not (tmp_path / "data" / "secret_key").exists(), "SECRET_KEY set: nothing generated"


def test_token_with_scopes_and_ttl(tmp_path: Path) -> None:
    key = "s" * 48
    result = _run(
        tmp_path,
        "token",
        "--tenant",
        "acme",
        "--user",
        "ops",
        "--scope",
        "admin",
        "--scope",
        "sessions:read",
        "--ttl",
        "90",
        SECRET_KEY=key,
    )
    assert result.returncode == 0, result.stderr
    assert JWT_LINE.match(result.stdout)
    claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"])
    assert set(claims["scopes"].split()) == {"admin", "sessions:read"}
    assert claims["exp"] - claims["iat"] == 90

    refused = _run(tmp_path, "token", "--tenant", "a", "--user", "b", "--ttl", "0", SECRET_KEY=key)
    assert refused.returncode != 0
    assert refused.stdout == ""


def test_rate_limits_take_zero_for_off_and_tenant_tiers_as_json(from_env: FromEnv) -> None:
    settings = from_env(
        GLOBAL_RATE_LIMIT="0", IP_RATE_LIMIT="0", TENANT_RATE_LIMITS='{"acme": 1000, "trial": 20}'
    )
    assert (settings.global_rate_limit, settings.ip_rate_limit) == (0, 0)
    assert settings.tenant_rate_limits == {"acme": 1000, "trial": 20}
    assert (settings.user_rate_limit, settings.tenant_rate_limit) == (60, 100)
    for bad in ('{"acme": -1}', '{"acme": "lots"}', "acme=1000"):
        with pytest.raises(ValidationError) as raised:
            from_env(TENANT_RATE_LIMITS=bad)
        assert "TENANT_RATE_LIMITS" in format_settings_error(raised.value), bad


def test_an_empty_path_variable_means_unset(from_env: FromEnv) -> None:
    settings = from_env(JWT_PUBLIC_KEY_FILE="", AGENTS_FILE="")
    assert settings.jwt_public_key_file is None
    assert settings.agents_file is None
