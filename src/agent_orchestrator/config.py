"""Settings: every variable of the spec (section 4.1) plus the ones this service adds.

Each field's env name is its upper-case name. `docs/configuration.md` and `.env.example`
list the same variables; `tests/test_config_docs.py` fails when they drift apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from agent_orchestrator.clients.webhooks import signing_key

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
#: Requests per minute; 0 turns that limit off.
PerMinute = Annotated[int, Field(ge=0, le=100_000_000)]

#: The variables production refuses to start without (the spec marks them required).
PRODUCTION_REQUIRED = ("DATABASE_URL", "REDIS_URI", "SECRET_KEY", "SERVICE_TOKEN")

#: JWT algorithms: signed with SECRET_KEY here, or by another issuer whose public key this
#: service holds (JWT_PUBLIC_KEY_FILE).
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384"})

#: Downstream services of spec section 3.1, by the variable holding their base URL.
DOWNSTREAM_URL_FIELDS = (
    "conversation_service_url",
    "agent_execution_service_url",
    "workflow_engine_url",
    "tool_registry_url",
    "agent_management_url",
    "query_service_url",
    "embedding_service_url",
    "ingestion_service_url",
    "identity_service_url",
)


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"
    TEST = "test"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None or value == "":
        return None
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"{name} must start with one of {', '.join(s + '://' for s in schemes)}")
    if parts.scheme.startswith("sqlite"):
        if parts.path.lstrip("/") in ("", ":memory:"):
            # Each connection would get its own empty database (migrations on one,
            # requests on another), and everything would vanish at exit.
            raise ValueError(f"{name}: in-memory SQLite is not supported; name a file")
        return value
    if not parts.hostname:
        raise ValueError(f"{name} has no host")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    #: the issuer's key from JWT_PUBLIC_KEY_FILE, loaded by validation
    _public_key: Any = PrivateAttr(default=None)
    _webhook_key: bytes | None = PrivateAttr(default=None)

    # --- spec section 4.1 -------------------------------------------------------------
    database_url: str | None = None
    redis_uri: str | None = None
    service_port: Annotated[int, Field(ge=1, le=65535)] = 8008
    log_level: str = "INFO"
    environment: Environment = Environment.DEVELOPMENT
    secret_key: SecretStr | None = None
    conversation_service_url: str | None = None
    agent_execution_service_url: str | None = None
    workflow_engine_url: str | None = None
    tool_registry_url: str | None = None
    agent_management_url: str | None = None
    query_service_url: str | None = None
    embedding_service_url: str | None = None
    identity_service_url: str | None = None
    service_token: SecretStr | None = None
    max_concurrent_tasks: PositiveInt = 100
    global_rate_limit: PerMinute = 1000
    tenant_rate_limit: PerMinute = 100
    session_ttl: PositiveInt = 3600
    task_timeout: PositiveFloat = 60.0
    retry_attempts: Annotated[int, Field(ge=0, le=20)] = 3
    websocket_max_connections: PositiveInt = 10000

    # --- ours -------------------------------------------------------------------------
    ingestion_service_url: str | None = None
    service_host: str = "127.0.0.1"
    redis_namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "orchestrator"
    data_dir: Path = Path("./data")
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auto_migrate: bool | None = None
    jwt_algorithm: str = "HS256"
    #: PEM public key file for RS*/ES* tokens (another issuer signs them; we only verify)
    jwt_public_key_file: Path | None = None
    #: or the issuer's JWKS URL (keys by `kid`, fetched when a token needs one)
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    token_default_ttl: PositiveInt = 3600
    identity_cache_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_request_bytes: PositiveInt = 1_048_576
    max_page_size: Annotated[int, Field(gt=0, le=1000)] = 100
    default_page_size: PositiveInt = 20
    session_cache_size: PositiveInt = 10_000
    db_pool_size: PositiveInt = 10
    db_pool_pre_ping: bool = False
    #: OTLP/HTTP base URL (".../v1/traces" is appended); unset: no spans at all
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: Annotated[str, Field(min_length=1, max_length=128)] = "agent-orchestrator"

    # --- rate limits (docs/configuration.md, "Rate limits") -------------------------------
    user_rate_limit: PerMinute = 60
    ip_rate_limit: PerMinute = 300
    #: per-tenant overrides of TENANT_RATE_LIMIT (tiers), as JSON: {"acme": 1000}
    tenant_rate_limits: Annotated[dict[str, PerMinute], NoDecode] = Field(default_factory=dict)

    # --- task engine --------------------------------------------------------------------
    lease_ttl: Annotated[float, Field(ge=1, le=600)] = 10.0
    reconcile_interval: Annotated[float, Field(gt=0, le=300)] = 2.0
    queued_stale_after: Annotated[float, Field(gt=0, le=3600)] = 10.0
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 25.0
    queue_interactive: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")] = "interactive"
    queue_bulk: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,32}$")] = "bulk"
    bulk_concurrency: PositiveInt = 10
    retry_backoff_initial: PositiveFloat = 0.5
    retry_backoff_max: PositiveFloat = 30.0
    task_handler_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0

    # --- chat and downstream services ---------------------------------------------------
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None
    llm_model: str = "gpt-4o-mini"
    llm_timeout: PositiveFloat = 60.0
    echo_chunk_delay: Annotated[float, Field(ge=0, le=5)] = 0.0
    agents_file: Path | None = None
    history_limit: Annotated[int, Field(ge=0, le=1000)] = 50
    chat_busy_policy: str = "enqueue"
    downstream_timeout: PositiveFloat = 10.0
    step_retry_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    step_retry_initial: PositiveFloat = 0.2
    circuit_failure_threshold: PositiveInt = 5
    circuit_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    circuit_window_seconds: PositiveFloat = 30.0
    circuit_open_seconds: PositiveFloat = 10.0
    circuit_half_open_probes: PositiveInt = 1
    service_concurrency: PositiveInt = 50
    service_retry_concurrency: Annotated[int, Field(ge=0, le=10_000)] = 3

    # --- LLM token budgets per tenant (services/token_budget.py) ---------------------------
    tenant_token_budget: Annotated[int, Field(ge=0)] = 0
    tenant_token_budgets: Annotated[dict[str, Annotated[int, Field(ge=0)]], NoDecode] = Field(
        default_factory=dict
    )

    # --- batches and webhooks (docs/api.md#batches) ----------------------------------------
    batch_max_items: Annotated[int, Field(ge=1, le=100_000)] = 1000
    batch_default_parallel: PositiveInt = 4
    batch_max_parallel: Annotated[int, Field(ge=1, le=1000)] = 32
    webhook_secret: SecretStr | None = None
    webhook_timeout: PositiveFloat = 10.0
    webhook_max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- events ------------------------------------------------------------------------
    events_ttl: PositiveInt = 86_400
    events_stream_cap: PositiveInt = 10_000
    sse_keepalive_seconds: PositiveFloat = 15.0

    # --- WebSocket gateway (docs/realtime.md) ---------------------------------------------
    ws_max_connections_per_tenant: PositiveInt = 1000
    ws_max_connections_per_ip: PositiveInt = 100
    ws_allow_missing_origin: bool = True
    ws_auth_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    ws_max_frame_bytes: Annotated[int, Field(ge=1024, le=16_777_216)] = 65_536
    ws_send_queue: Annotated[int, Field(ge=4, le=100_000)] = 256
    ws_ping_interval: Annotated[float, Field(gt=0, le=3600)] = 20.0
    ws_ping_timeout: Annotated[float, Field(gt=0, le=3600)] = 20.0
    ws_idle_timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    ws_messages_per_second: Annotated[float, Field(gt=0, le=10_000)] = 20.0
    ws_max_subscriptions: Annotated[int, Field(gt=0, le=10_000)] = 100
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator(
        "allowed_origins",
        "task_handler_modules",
        "trusted_proxies",
        "webhook_allowed_networks",
        mode="before",
    )
    @classmethod
    def _origins(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("jwt_public_key_file", "agents_file", mode="before")
    @classmethod
    def _optional_path(cls, value: Any) -> Any:
        # `NAME=` in an env file means unset, not the current directory.
        return None if value == "" else value

    @field_validator("tenant_rate_limits", "tenant_token_budgets", mode="before")
    @classmethod
    def _tenant_tiers(cls, value: Any) -> Any:
        # Read here rather than by pydantic-settings, whose error for text that is not
        # JSON names no variable.
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value) if value.strip() else {}
        except ValueError as error:
            raise ValueError('must be a JSON object such as {"acme": 1000}') from error

    @field_validator("trusted_proxies", "webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as error:
                name = (info.field_name or "").upper()
                raise ValueError(f"{name}: {item!r} is not an IP address or network") from error
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("jwt_algorithm")
    @classmethod
    def _algorithm(cls, value: str) -> str:
        if value not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            names = ", ".join(sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS))
            raise ValueError(f"JWT_ALGORITHM must be one of {names}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        schemes = ("postgresql", "postgres", "postgresql+asyncpg", "sqlite", "sqlite+aiosqlite")
        return _check_url("DATABASE_URL", value, schemes)

    @field_validator("redis_uri")
    @classmethod
    def _redis_uri(cls, value: str | None) -> str | None:
        return _check_url("REDIS_URI", value, ("redis", "rediss"))

    @field_validator("chat_busy_policy")
    @classmethod
    def _busy_policy(cls, value: str) -> str:
        if value not in {"enqueue", "reject", "interrupt"}:
            raise ValueError("CHAT_BUSY_POLICY must be enqueue, reject or interrupt")
        return value

    @field_validator(
        *DOWNSTREAM_URL_FIELDS, "llm_base_url", "otel_exporter_otlp_endpoint", "jwt_jwks_url"
    )
    @classmethod
    def _service_url(cls, value: str | None) -> str | None:
        return _check_url("service URL", value, ("http", "https"))

    @model_validator(mode="after")
    def _production_requirements(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            missing = [name for name in PRODUCTION_REQUIRED if not getattr(self, name.lower())]
            if missing:
                raise ValueError(
                    "ENVIRONMENT=production requires " + ", ".join(missing) + " to be set"
                )
        key_sources = (self.jwt_public_key_file is not None) + (self.jwt_jwks_url is not None)
        if key_sources > 1:
            raise ValueError("set JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL, not both")
        if (self.jwt_algorithm in PUBLIC_KEY_ALGORITHMS) != (key_sources == 1):
            raise ValueError(
                "JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL is required with JWT_ALGORITHM "
                f"{', '.join(sorted(PUBLIC_KEY_ALGORITHMS))}, and only with those"
            )
        if self.jwt_public_key_file is not None:
            # Loaded once, here: a file that cannot serve stops start-up naming the variable.
            self._public_key = public_key(self.jwt_algorithm, self.jwt_public_key_file)
        if self.webhook_secret is not None:
            # Derived once, here, like the public key: a whsec_ secret must decode.
            try:
                self._webhook_key = signing_key(self.webhook_secret.get_secret_value())
            except ValueError as error:
                raise ValueError(f"WEBHOOK_SECRET: {error}") from error
        if self.queue_interactive == self.queue_bulk:
            raise ValueError("QUEUE_INTERACTIVE and QUEUE_BULK must differ")
        if self.default_page_size > self.max_page_size:
            raise ValueError("DEFAULT_PAGE_SIZE must not exceed MAX_PAGE_SIZE")
        if self.batch_default_parallel > self.batch_max_parallel:
            raise ValueError("BATCH_DEFAULT_PARALLEL must not exceed BATCH_MAX_PARALLEL")
        return self

    # --- derived ------------------------------------------------------------------------
    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION

    @property
    def max_attempts(self) -> int:
        """First attempt plus RETRY_ATTEMPTS retries."""
        return 1 + self.retry_attempts

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_uri)

    @property
    def should_auto_migrate(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return not self.is_production

    def resolved_database_url(self) -> str:
        """The async SQLAlchemy URL: asyncpg for PostgreSQL, aiosqlite for SQLite."""
        if not self.database_url:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'orchestrator.db').resolve()}"
        url = self.database_url
        for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        for prefix in ("sqlite+aiosqlite://", "sqlite://"):
            if url.startswith(prefix):
                return "sqlite+aiosqlite://" + url[len(prefix) :]
        return url

    def webhook_key(self) -> bytes | None:
        """The HMAC key of batch webhooks (None: WEBHOOK_SECRET unset, webhooks off)."""
        return self._webhook_key

    def verification_key(self) -> Any:
        """What verifies tokens: the loaded public key for RS*/ES*, None when the keys come
        from JWT_JWKS_URL, else the secret."""
        if self._public_key is not None:
            return self._public_key
        if self.jwt_jwks_url is not None:
            return None
        return self.resolved_secret_key()

    def resolved_secret_key(self) -> str:
        """SECRET_KEY, or in development a key generated once and kept in DATA_DIR."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        if self.is_production:  # unreachable: validation requires it
            raise RuntimeError("SECRET_KEY is required in production")
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Written whole to a private temporary file, then linked into place: a process
            # starting at the same moment sees either no file or the complete key, and the
            # key is never readable by others, not even briefly.
            descriptor, temporary = tempfile.mkstemp(dir=self.data_dir, prefix=".secret_key.")
            try:
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_urlsafe(48))
                with contextlib.suppress(FileExistsError):  # another process won the race
                    os.link(temporary, path)
            finally:
                os.unlink(temporary)
        return path.read_text().strip()


def public_key(algorithm: str, path: Path) -> Any:
    """The public key in the PEM file `path`, loaded for `algorithm`; ValueError naming
    JWT_PUBLIC_KEY_FILE when it cannot be read, is not such a key, or is a private key
    (which has no business on the servers that only verify)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import get_default_algorithms

    try:
        pem = path.read_bytes()
    except OSError as error:
        raise ValueError(f"JWT_PUBLIC_KEY_FILE: cannot read {path}: {error.strerror}") from error
    wanted = (rsa.RSAPublicKey,) if algorithm.startswith("RS") else (ec.EllipticCurvePublicKey,)
    try:
        key = get_default_algorithms()[algorithm].prepare_key(pem)
    except Exception as error:  # PyJWT's and cryptography's many ways of saying no
        raise ValueError(f"JWT_PUBLIC_KEY_FILE: {path} is not a PEM key for {algorithm}") from error
    if not isinstance(key, wanted):
        raise ValueError(
            f"JWT_PUBLIC_KEY_FILE: {path} must hold the issuer's public key for {algorithm}, "
            "and never a private key"
        )
    return key


def format_settings_error(error: Exception) -> str:
    """One line naming each offending variable, for start-up failures."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        name = ".".join(str(loc) for loc in item["loc"]).upper()
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "invalid configuration: " + "; ".join(parts)
