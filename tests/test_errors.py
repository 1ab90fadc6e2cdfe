"""One error shape for every failure, and the correlation id: accepted when sane, generated
otherwise, echoed on every response (errors included) and bound to the log lines."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
import structlog
from structlog.testing import LogCapture

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from tests.conftest import TokenFactory, auth

SESSIONS = "/api/v1/sessions"
SECRET = "secret-internal-detail"
SANE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every structlog event, with the context variables merged in as in production."""
    capture = LogCapture()
    previous = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        cache_logger_on_first_use=False,
    )
    try:
        yield capture
    finally:
        structlog.configure(**previous)


@pytest.fixture
async def client(make_settings: Callable[..., Settings]) -> AsyncIterator[httpx.AsyncClient]:
    """The real app plus one route that fails unexpectedly; app errors become responses."""
    app = create_app(make_settings(max_request_bytes=1024))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"code", "message", "details", "correlation_id"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert response.headers.get_list("x-correlation-id") == [error["correlation_id"]]
    assert isinstance(error, dict)
    return error


async def _chunks(size: int) -> AsyncIterator[bytes]:
    body = b'{"metadata": {"blob": "' + b"x" * size + b'"}}'
    for start in range(0, len(body), 256):
        yield body[start : start + 256]


async def test_every_error_has_the_one_shape(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    user = auth(make_token())

    error = assert_error_shape(await client.get("/no/such/route"), 404, "not_found")
    assert "/no/such/route" in str(error["message"])

    wrong_method = await client.put(SESSIONS, json={}, headers=user)
    assert_error_shape(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "GET, POST"
    # One route per method at this path: every one of them is named, not the first.
    one_session = await client.put(f"{SESSIONS}/{uuid.uuid4()}", json={}, headers=user)
    assert_error_shape(one_session, 405, "method_not_allowed")
    assert one_session.headers["allow"] == "GET, PATCH, DELETE"

    invalid = await client.post(SESSIONS, json={"metadata": 3}, headers=user)
    error = assert_error_shape(invalid, 422, "validation_error")
    assert isinstance(error["details"], list)
    assert error["details"][0]["field"] == "metadata"

    assert_error_shape(await client.get(SESSIONS), 401, "unauthorized")
    reader = auth(make_token(scopes=["sessions:read"]))
    assert_error_shape(await client.post(SESSIONS, json={}, headers=reader), 403, "forbidden")

    big = {**user, "content-type": "application/json"}
    too_big = await client.post(SESSIONS, content=b"x" * 2048, headers=big)
    by_length = assert_error_shape(too_big, 413, "payload_too_large")
    chunked = await client.post(SESSIONS, content=_chunks(4096), headers=big)
    while_read = assert_error_shape(chunked, 413, "payload_too_large")
    # The same answer whether Content-Length said it or the chunks counted it.
    assert by_length["details"] == while_read["details"] == {"max_bytes": 1024}
    assert by_length["message"] == while_read["message"]


async def test_unexpected_exception_is_500_without_internals(
    client: httpx.AsyncClient, logs: LogCapture
) -> None:
    response = await client.get("/boom", headers={"X-Correlation-ID": "boom-42"})
    error = assert_error_shape(response, 500, "internal_error")
    assert error["correlation_id"] == "boom-42"
    assert error["details"] is None
    assert SECRET not in response.text
    assert "RuntimeError" not in response.text
    assert "Traceback" not in response.text

    lines = [entry for entry in logs.entries if entry.get("log_level") == "error"]
    assert len(lines) == 1, logs.entries
    assert lines[0]["correlation_id"] == "boom-42"
    assert lines[0]["error_type"] == "RuntimeError"


async def test_a_sane_correlation_id_is_echoed_everywhere(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    user = auth(make_token())
    requests: list[tuple[str, str, dict[str, object]]] = [
        ("POST", SESSIONS, {"json": {}}),
        ("GET", SESSIONS, {}),
        ("GET", "/health", {}),
        ("GET", "/no/such/route", {}),
        ("POST", SESSIONS, {"json": {"agent_id": 5}}),
        ("GET", "/boom", {}),
        ("POST", SESSIONS, {"content": b"x" * 2048}),
        ("POST", SESSIONS, {"content": _chunks(4096)}),
    ]
    for number, (method, url, extra) in enumerate(requests):
        sent = f"req-{number}.trace:abc_DEF"
        headers = {**user, "content-type": "application/json", "X-Correlation-ID": sent}
        response = await client.request(method, url, headers=headers, **extra)  # type: ignore[arg-type]
        assert response.headers.get_list("x-correlation-id") == [sent], (method, url)
        if response.status_code >= 400:
            assert response.json()["error"]["correlation_id"] == sent, (method, url)


async def test_a_missing_correlation_id_is_generated(client: httpx.AsyncClient) -> None:
    first = await client.get("/health")
    second = await client.get("/no/such/route")
    generated = [first.headers["x-correlation-id"], second.headers["x-correlation-id"]]
    assert all(SANE.match(value) for value in generated)
    assert generated[0] != generated[1]
    assert second.json()["error"]["correlation_id"] == generated[1]


@pytest.mark.parametrize(
    "insane",
    ["x" * 129, "has spaces in it", "semi;colon", 'quote"d', "tab\there", b"caf\xc3\xa9"],
)
async def test_an_insane_correlation_id_is_replaced(
    client: httpx.AsyncClient, insane: str | bytes
) -> None:
    response = await client.get("/no/such/route", headers={"X-Correlation-ID": insane})
    echoed = response.headers["x-correlation-id"]
    sent = insane.decode("latin-1") if isinstance(insane, bytes) else insane
    assert echoed != sent
    assert SANE.match(echoed)
    assert response.json()["error"]["correlation_id"] == echoed


async def test_the_openapi_document_states_the_error_shape_and_the_bounds(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 shape, never sent here
    session = document["paths"][f"{SESSIONS}/{{session_id}}"]
    for status in ("401", "403", "404", "409", "422", "429"):
        body = session["patch"]["responses"][status]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, status
    assert "Retry-After" in session["patch"]["responses"]["429"]["headers"]
    assert set(schemas["ErrorInfo"]["properties"]) == {
        "code",
        "message",
        "details",
        "correlation_id",
    }
    listing = {p["name"]: p for p in document["paths"][SESSIONS]["get"]["parameters"]}
    assert listing["limit"]["schema"]["maximum"] == 100  # MAX_PAGE_SIZE's default
    # A query string cannot carry a null: optional parameters are plain strings.
    assert listing["cursor"]["schema"]["type"] == "string"
    events = document["paths"]["/api/v1/tasks/{task_id}/events"]["get"]
    assert events["responses"]["200"]["content"]["text/event-stream"]["schema"]["required"] == [
        "id",
        "event",
        "data",
    ]
