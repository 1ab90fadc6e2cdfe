"""A batch's webhook: signed (Standard Webhooks), sent once the batch ends, retried on
answers the receiver may get over and not on others, and never sent where a caller
could use the service to reach inside the network (SSRF), by address or by name."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from agent_orchestrator.clients.webhooks import (
    CallbackRefused,
    Reach,
    WebhooksDisabled,
    WebhookSender,
    _CheckedResolver,
    parse_networks,
    refusal,
    signing_key,
)
from agent_orchestrator.config import Settings
from tests.batch_helpers import signature_of
from tests.conftest import TokenFactory, auth, running_app
from tests.doubles.http_thread import QuietHandler, serving

SECRET = "whk-test-secret-0123456789"
LOOPBACK = ["127.0.0.1/32"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "http or https"),
        ("https:///hook", "host"),
        ("https://user:pw@example.com/hook", "user name"),
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://192.168.0.7/hook", "192.168.0.7"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("http://0.0.0.0/hook", "0.0.0.0"),
        ("http://[::1]/hook", "::1"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:7f00:1"),  # as the client reads it
        ("http://[fd00::1]/hook", "fd00::1"),
        ("http://224.0.0.1/hook", "224.0.0.1"),
        ("http://localhost:9000/hook", "localhost"),
        ("http://api.localhost./hook", "api.localhost."),
        ("http://example.com:0/hook", "port 0"),
        ("http://example.com:99999/hook", "valid URL"),
        # Unicode digits and dots that the HTTP client folds into an IP address (IDNA):
        # fullwidth, circled, the ideographic full stop.
        ("http://\uff11\uff12\uff17.0.0.1:8080/hook", "127.0.0.1"),
        ("http://127\u30020\u30020\u30021/hook", "127.0.0.1"),
        ("http://\u2460\u2461\u2466.0.0.1/hook", "127.0.0.1"),
        ("http://\uff11\uff16\uff19.\uff12\uff15\uff14.169.254/meta", "169.254.169.254"),
        # IPv6 addresses that stand for an inside IPv4 one: NAT64, local NAT64, 6to4,
        # SIIT, IPv4-compatible, Teredo (its client 10.0.0.1).
        ("http://[64:ff9b::a00:1]/hook", "64:ff9b::a00:1"),
        ("http://[64:ff9b:1::a00:1]/hook", "64:ff9b:1::a00:1"),
        ("http://[2002:a00:1::]/hook", "2002:a00:1::"),
        ("http://[::ffff:0:a00:1]/hook", "::ffff:0:a00:1"),
        ("http://[::a00:1]/hook", "::a00:1"),
        ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/hook", "2001:0:4136"),
    ],
)
def test_callback_urls_that_could_reach_inside_are_refused(url: str, reason: str) -> None:
    found = refusal(url, Reach())
    assert found is not None
    assert reason in found, found


def test_public_hosts_and_allowed_networks_pass() -> None:
    assert refusal("https://example.com/hooks/batch?x=1", Reach()) is None
    assert refusal("http://93.184.216.34:8443/hook", Reach()) is None
    allowed = Reach(parse_networks(["127.0.0.1/32", "10.0.0.0/8"]))
    assert refusal("http://127.0.0.1:8080/hook", allowed) is None
    assert refusal("http://10.9.9.9/hook", allowed) is None
    assert refusal("http://127.0.0.2/hook", allowed) is not None  # outside the /32
    # IPv6 forms of a public IPv4 address are as good as it; an IDN host is a name.
    assert refusal("http://[64:ff9b::5db8:d822]/hook", Reach()) is None  # 93.184.216.34
    assert refusal("http://[2002:5db8:d822::1]/hook", Reach()) is None
    assert refusal("https://m\u00fcnchen.example/hook", Reach()) is None


async def test_a_name_that_resolves_inside_is_refused_when_called() -> None:
    """The check at submission cannot see where a name points; the resolver the sender
    connects through drops every address callbacks may not reach."""
    resolver = _CheckedResolver(Reach())
    try:
        with pytest.raises(CallbackRefused):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    allowed = _CheckedResolver(Reach(parse_networks(["127.0.0.0/8", "::1/128"])))
    try:
        found = await allowed.resolve("localhost", 80)
    finally:
        await allowed.close()
    assert found
    assert all(entry["host"] in ("127.0.0.1", "::1") for entry in found)


async def test_the_sender_checks_again_before_it_connects() -> None:
    """WEBHOOK_ALLOWED_NETWORKS may have changed since the URL was accepted."""
    with receiver([200]) as (url, seen):
        sender = WebhookSender(SECRET.encode(), Reach(), timeout=2)
        try:
            with pytest.raises(CallbackRefused):
                await sender.send(url, "msg_1", {"x": 1})
        finally:
            await sender.aclose()
    assert seen == []


async def test_a_process_without_the_secret_sends_nothing() -> None:
    """A worker whose WEBHOOK_SECRET is unset signs nothing, not even with an empty key."""
    with receiver([200]) as (url, seen):
        sender = WebhookSender(None, Reach(parse_networks(LOOPBACK)), timeout=2)
        try:
            with pytest.raises(WebhooksDisabled):
                await sender.send(url, "msg_1", {"x": 1})
        finally:
            await sender.aclose()
    assert seen == []


class RebindingDns(AbstractResolver):
    """A name server as a DNS-rebinding attacker runs one, at the edge this machine has
    no real one for: each lookup of the name answers the next address of `answers`."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        entry: ResolveResult = {
            "hostname": host,
            "host": address,
            "port": port,
            "family": socket.AF_INET,
            "proto": 0,
            "flags": socket.AI_NUMERICHOST,
        }
        return [entry]

    async def close(self) -> None:
        pass


async def test_a_rebinding_name_reaches_only_the_address_that_was_checked() -> None:
    """The name first answers an address callbacks may reach (127.0.0.2, allowed here),
    then the receiver's own (127.0.0.1, not allowed). The connection goes to the checked
    answer, which nothing listens on: the receiver is never reached, and the name was
    looked up once."""
    dns = RebindingDns(["127.0.0.2", "127.0.0.1"])
    reach = Reach(parse_networks(["127.0.0.2/32"]))
    with receiver([200]) as (url, seen):
        port = url.split(":")[2].split("/")[0]
        sender = WebhookSender(SECRET.encode(), reach, timeout=2, resolver=dns)
        try:
            with pytest.raises(aiohttp.ClientConnectorError):
                await sender.send(f"http://hooks.rebind.test:{port}/hooks", "msg_1", {"x": 1})
            # Looked up again, the name now answers the receiver's address: refused.
            with pytest.raises(CallbackRefused):
                await sender.send(f"http://hooks.rebind.test:{port}/hooks", "msg_2", {"x": 2})
        finally:
            await sender.aclose()
    assert seen == []
    assert dns.lookups == 2  # once per POST: the connection used the answer checked


@contextmanager
def receiver(answers: list[int]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback answering with `answers` in turn (the last one
    repeated); yields its URL and the requests it received."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["content-length"]))
            with lock:
                seen.append({"headers": dict(self.headers.items()), "body": body})
                status = answers[min(len(seen), len(answers)) - 1]
            self.reply(status)

    with serving(Handler) as base_url:
        yield f"{base_url}/hooks/batch", seen


async def _until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def callback_task(client: httpx.AsyncClient, headers: dict[str, str]) -> Any:
    """The batch's webhook task, once it has ended."""
    deadline = time.monotonic() + 20
    while True:
        listed = (await client.get("/api/v1/tasks", headers=headers)).json()["items"]
        found = [task for task in listed if task["kind"] == "batch_callback"]
        if found and found[0]["status"] not in ("queued", "running"):
            return found[0]
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.05)


async def webhook_of_a_batch(settings: Settings, headers: dict[str, str], url: str) -> Any:
    """Submit a one-item batch with `url` as its callback; its webhook task once ended."""
    async with running_app(settings) as client:
        body = {"items": [{"message": "a"}], "callback_url": url}
        response = await client.post("/api/v1/batch", json=body, headers=headers)
        assert response.status_code == 202, response.text
        return await callback_task(client, headers)


def webhook_settings(make_backend_settings: Callable[..., Settings]) -> Settings:
    return make_backend_settings(
        webhook_secret=SECRET,
        webhook_allowed_networks=LOOPBACK,
        retry_backoff_initial=0.05,
        retry_backoff_max=0.2,
    )


@pytest.mark.parametrize(
    ("secret", "receivers_key"),
    [
        # as the scheme writes secrets: the library takes the same string
        ("whsec_" + base64.b64encode(b"0123456789abcdef0123").decode(), None),
        # any other string: its UTF-8 bytes, handed to the library as bytes
        (SECRET, SECRET.encode()),
    ],
)
async def test_receivers_verify_the_signature_with_the_schemes_own_library(
    secret: str, receivers_key: bytes | None
) -> None:
    with receiver([204]) as (url, seen):
        reach = Reach(parse_networks(LOOPBACK))
        sender = WebhookSender(signing_key(secret), reach, timeout=2)
        try:
            answer = await sender.send(url, "msg_2Lh9", {"type": "batch.completed", "n": 1})
        finally:
            await sender.aclose()
    assert answer.status == 204
    headers, body = seen[0]["headers"], seen[0]["body"]
    verified = Webhook(receivers_key or secret).verify(body, headers)
    assert verified == {"type": "batch.completed", "n": 1}
    with pytest.raises(WebhookVerificationError):  # and a tampered body is caught
        Webhook(receivers_key or secret).verify(body.replace(b"1", b"2"), headers)


def attempts(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "nooble_orchestrator_webhook_attempts_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_the_ended_batch_is_posted_signed_and_retried_until_accepted(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    before = {outcome: attempts(outcome) for outcome in ("retried", "accepted")}
    with receiver([503, 200]) as (url, seen):
        async with running_app(webhook_settings(make_backend_settings)) as client:
            headers = auth(make_token())
            response = await client.post(
                "/api/v1/batch",
                json={"items": [{"message": "a"}, {"message": "b"}], "callback_url": url},
                headers=headers,
            )
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]
            await _until(lambda: len(seen) >= 2)
            task = await callback_task(client, headers)
            view = (await client.get(f"/api/v1/batch/{batch_id}", headers=headers)).json()
    assert len(seen) == 2  # the 503, then the 200: nothing after it was accepted
    assert {outcome: attempts(outcome) - before[outcome] for outcome in before} == {
        "retried": 1,
        "accepted": 1,
    }
    assert task["status"] == "succeeded"
    assert task["attempt"] == 2
    assert task["result"] == {"status_code": 200}
    ids = {request["headers"]["webhook-id"] for request in seen}
    assert ids == {task["id"]}  # one id for every attempt: receivers drop repeats
    for request in seen:
        headers_seen = request["headers"]
        assert headers_seen["content-type"] == "application/json"
        assert abs(int(headers_seen["webhook-timestamp"]) - time.time()) < 60
        expected = signature_of(
            SECRET, headers_seen["webhook-id"], headers_seen["webhook-timestamp"], request["body"]
        )
        assert hmac.compare_digest(headers_seen["webhook-signature"], expected)
    payload = json.loads(seen[-1]["body"])
    assert payload["type"] == "batch.completed"
    assert payload["batch"]["id"] == batch_id
    assert payload["batch"]["status"] == "completed"
    assert payload["batch"]["counts"]["succeeded"] == 2
    assert payload["batch"] == view


async def test_a_refusing_receiver_is_not_retried(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    with receiver([400]) as (url, seen):
        settings = webhook_settings(make_backend_settings)
        task = await webhook_of_a_batch(settings, auth(make_token()), url)
    assert task["status"] == "failed"
    assert task["attempt"] == 1
    assert task["error"]["code"] == "callback_rejected"
    assert "400" in task["error"]["message"]
    assert len(seen) == 1


async def test_an_unreachable_receiver_is_retried_then_the_task_fails(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    with receiver([200]) as (url, _):
        pass  # closed: nothing listens on its port any more
    settings = webhook_settings(make_backend_settings).model_copy(
        update={"webhook_max_attempts": 2}
    )
    task = await webhook_of_a_batch(settings, auth(make_token()), url)
    assert task["status"] == "failed"
    assert task["attempt"] == 2
    assert task["error"]["code"] == "callback_unreachable"


async def test_internal_callback_urls_are_refused_at_submission(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = make_backend_settings(webhook_secret=SECRET)  # no network allowed
    async with running_app(settings) as client:
        body = {"items": [{"message": "a"}], "callback_url": "http://127.0.0.1:9/hook"}
        response = await client.post("/api/v1/batch", json=body, headers=auth(make_token()))
        assert response.status_code == 422
        details = response.json()["error"]["details"]
        assert details == [
            {
                "field": "callback_url",
                "in": "body",
                "message": "127.0.0.1 is not an address callbacks may reach",
            }
        ]
        # A public name with a NUL, a space or a control character in it is no URL (the
        # NUL once went on to the database: a 500 on PostgreSQL).
        for url in ("https://example.com/a\x00b", "https://example.com/a b", "https://e.com/\x7f"):
            body = {"items": [{"message": "a"}], "callback_url": url}
            response = await client.post("/api/v1/batch", json=body, headers=auth(make_token()))
            assert response.status_code == 422, (url, response.text)
            [detail] = response.json()["error"]["details"]
            assert detail["field"] == "callback_url", detail
        listed = await client.get("/api/v1/batch", headers=auth(make_token()))
        assert listed.json()["items"] == []


@pytest.mark.parametrize("secret", ["whsec_not*base64", "whsec_"])
def test_a_whsec_secret_that_does_not_decode_stops_start_up(secret: str) -> None:
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        Settings(webhook_secret=secret, _env_file=None)  # type: ignore[call-arg]
