"""`agent-orchestrator`: serve | worker | migrate | token."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated, NoReturn

import typer
import uvloop
from pydantic import ValidationError

from agent_orchestrator.config import Settings, format_settings_error
from agent_orchestrator.models.principal import USER_SCOPES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _fail(message: str) -> NoReturn:
    typer.echo(f"agent-orchestrator: {message}", err=True)
    raise typer.Exit(code=2)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        _fail(format_settings_error(error))


def _preflight(settings: Settings) -> None:
    """Database reachable and migrated (or migrated now, in development), Redis reachable:
    otherwise one line on stderr and a non-zero exit, before anything listens."""
    from agent_orchestrator.lifecycle import StartupError, preflight

    try:
        asyncio.run(preflight(settings))
    except StartupError as error:
        _fail(str(error))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="interface to bind (SERVICE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on (SERVICE_PORT)")] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only: run no tasks in this process")
    ] = False,
) -> None:
    """Run the API, and a task worker in the same process unless --no-worker.

    Embedded default: SQLite in DATA_DIR, in-process queue and events."""
    import uvicorn

    from agent_orchestrator.app import create_app
    from agent_orchestrator.lifecycle import StartupError
    from agent_orchestrator.observability.logging import configure_logging
    from agent_orchestrator.websocket.server import server_options, tune_collector

    settings = load_settings()
    configure_logging(settings.log_level)
    bind_host = host or settings.service_host
    bind_port = port if port is not None else settings.service_port
    if no_worker and not settings.uses_redis:
        _fail("--no-worker needs REDIS_URI: without Redis the queue lives in this process")
    _preflight(settings)
    mode = "production" if settings.uses_redis else "embedded"
    role = "API only" if no_worker else "API + worker"
    typer.echo(
        f"agent-orchestrator ({mode} mode, {role}, "
        f"{settings.resolved_database_url().split(':')[0]})"
        f" listening on http://{bind_host}:{bind_port}  (docs: /docs)",
        err=True,
    )
    config = uvicorn.Config(
        create_app(settings, run_worker=not no_worker, schema_checked=True),  # _preflight
        host=bind_host,
        port=bind_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        **server_options(settings),  # WebSocket limits, pings, trusted proxies
    )
    server = uvicorn.Server(config)
    tune_collector()
    try:
        server.run()
    except StartupError as error:
        _fail(str(error))
    if not server.started:
        _fail("the server did not start (see the log above)")


@app.command()
def worker() -> None:
    """Run a task worker: up to MAX_CONCURRENT_TASKS tasks at once, until SIGTERM/SIGINT,
    then stop claiming and finish or release running tasks within SHUTDOWN_GRACE."""
    import signal

    from agent_orchestrator.lifecycle import StartupError, build_state, close_state
    from agent_orchestrator.observability.logging import configure_logging
    from agent_orchestrator.state import build_verifier
    from agent_orchestrator.websocket.server import tune_collector

    settings = load_settings()
    configure_logging(settings.log_level)
    if not settings.uses_redis:
        _fail("worker needs REDIS_URI: in embedded mode `serve` runs the worker itself")
    _preflight(settings)
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.service_host)

    async def run() -> None:
        state = await build_state(
            settings, build_verifier(settings), run_worker=True, schema_checked=True
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        typer.echo(
            f"agent-orchestrator worker {state.worker.worker_id if state.worker else ''} running",
            err=True,
        )
        try:
            await stop.wait()
        finally:
            await close_state(state)

    tune_collector()
    try:
        # uvloop, as uvicorn gives `serve`: the event loop is a large share of a worker's
        # CPU per task (bench/RESULTS.md, chat profile).
        uvloop.run(run())
    except StartupError as error:
        _fail(str(error))


@app.command()
def migrate() -> None:
    """Apply database migrations up to the newest."""
    from agent_orchestrator.db.engine import create_engine
    from agent_orchestrator.db.migrate import current_revision, upgrade

    settings = load_settings()

    async def run() -> str | None:
        engine = create_engine(settings.resolved_database_url())
        try:
            await upgrade(engine)
            return await current_revision(engine)
        finally:
            await engine.dispose()

    revision = asyncio.run(run())
    typer.echo(f"database at revision {revision}", err=True)


@app.command()
def token(
    tenant: Annotated[str, typer.Option(help="tenant id (claim tenant_id)")],
    user: Annotated[str, typer.Option(help="user id (claim sub)")],
    scope: Annotated[
        list[str] | None, typer.Option(help="scope to grant; repeat. Default: all but admin")
    ] = None,
    ttl: Annotated[int | None, typer.Option(help="lifetime in seconds")] = None,
) -> None:
    """Print a signed JWT for local use and scripts, and nothing else, on stdout."""
    from agent_orchestrator.state import build_verifier

    settings = load_settings()
    lifetime = ttl if ttl is not None else settings.token_default_ttl
    if lifetime <= 0:
        _fail("--ttl must be positive")
    if not tenant or not user:
        _fail("--tenant and --user must not be empty")
    try:
        signed = build_verifier(settings).issue(
            tenant_id=tenant,
            user_id=user,
            scopes=list(scope) if scope else list(USER_SCOPES),
            ttl_seconds=lifetime,
            now=time.time(),
        )
    except ValueError as error:
        _fail(str(error))
    sys.stdout.write(signed + "\n")


if __name__ == "__main__":
    app()
