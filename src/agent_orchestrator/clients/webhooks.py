"""Webhooks a client asked for (a batch's `callback_url`): signed, and never sent where a
caller could use this service to reach inside the network (SSRF).

A URL is checked twice. When it is given (`refusal`): http or https, a host, no user
name or password in it, and, when its host is an address, an address callbacks may
reach. When it is called: every address its host resolves to is checked, the request
connects only to those that pass (the check and the connection use the same answer, so
a name that resolves differently the second time gains nothing), redirects are not
followed, and no proxy from the environment is used. An address may be reached when it
is global unicast, or inside WEBHOOK_ALLOWED_NETWORKS.

The signature follows the Standard Webhooks scheme: `webhook-id`, `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`. Its key is
WEBHOOK_SECRET as the scheme writes secrets, `whsec_` and the key in base64 (what its
libraries take as is), or else the secret's UTF-8 bytes. The id is the same on every
attempt of one delivery, so a receiver can drop repeats.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackRefused(OSError):
    """The URL's host is, or resolves only to, addresses callbacks may not reach."""


class WebhooksDisabled(Exception):
    """This process has no WEBHOOK_SECRET: it sends nothing rather than an unsigned or
    empty-key signature a receiver would have to reject."""


@dataclass(frozen=True)
class Reach:
    """Which addresses a callback may connect to."""

    allowed_networks: tuple[Network, ...] = ()

    def permits(self, address: Address) -> bool:
        if any(address in network for network in self.allowed_networks):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if address in _LOCAL_NAT64:  # its IPv4 address is wherever the network put it
                return False
            inner = _embedded_ipv4(address)
            if inner is not None:
                return self.permits(inner)
        return address.is_global and not address.is_multicast


#: IPv6 prefixes whose last 32 bits are an IPv4 address a gateway or the host reaches:
#: NAT64's well-known prefix, SIIT's ::ffff:0:0:0/96, the deprecated IPv4-compatible
#: ::/96. Python counts them global, whatever IPv4 address they carry.
_IPV4_IN_LAST_32 = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")
)
#: NAT64 prefixes for local use (RFC 8215), where the IPv4 address sits per the network.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo's client, or the
    last 32 bits of a translation prefix), which is what a connection would reach."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in prefix for prefix in _IPV4_IN_LAST_32) and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def refusal(url: str, reach: Reach) -> str | None:
    """Why `url` cannot be a callback, or None. The URL is read as the HTTP client reads
    it (yarl): the host checked is the one it connects to, after IDNA, which folds
    Unicode digits and dots (fullwidth or circled digits, the ideographic full stop) into
    an IP address a plain parse would take for a name. Host names are resolved only when
    the callback is sent (a name's addresses may change meanwhile)."""
    try:
        parsed = yarl.URL(url)
        port = parsed.explicit_port
        host = parsed.raw_host
    except (ValueError, UnicodeError) as error:
        return f"not a valid URL ({error})"
    if parsed.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not host:
        return "must name a host"
    if parsed.raw_user is not None or parsed.raw_password is not None:
        return "must not carry a user name or password"
    if port == 0:
        return "must not name port 0"
    address = _address(host)
    if address is not None and not reach.permits(address):
        return f"{host} is not an address callbacks may reach"
    if address is None and host.rstrip(".").lower().endswith("localhost"):
        return f"{host} is not a host callbacks may reach"
    return None


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


#: How the Standard Webhooks scheme marks a secret written in base64.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a marker of the format, not a secret


def signing_key(secret: str) -> bytes:
    """The HMAC key of WEBHOOK_SECRET: `whsec_<base64>` decoded, else its UTF-8 bytes.
    Raises ValueError for a `whsec_` secret that is not base64 of at least one byte."""
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode()
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except ValueError as error:
        raise ValueError(f"a {SECRET_PREFIX} secret must be base64 ({error})") from error
    if not key:
        raise ValueError(f"a {SECRET_PREFIX} secret must hold at least one byte")
    return key


def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class _CheckedResolver(AbstractResolver):
    """The system resolver, keeping only the addresses callbacks may reach."""

    def __init__(self, reach: Reach, inner: AbstractResolver | None = None) -> None:
        self._reach = reach
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [
            entry for entry in found if self._reach.permits(ipaddress.ip_address(entry["host"]))
        ]
        if not kept:
            raise CallbackRefused(f"{host} resolves only to addresses callbacks may not reach")
        return kept

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True)
class WebhookAnswer:
    status: int


class WebhookSender:
    def __init__(
        self,
        secret: bytes | None,
        reach: Reach,
        *,
        timeout: float,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """`secret`: the signing key (None: WEBHOOK_SECRET is unset, and `send` refuses).
        `resolver`: where names are looked up (the system's, by default); whatever it
        answers is checked before any connection."""
        self._secret = secret
        self._reach = reach
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            checked = _CheckedResolver(self._reach, self._resolver)
            connector = aiohttp.TCPConnector(resolver=checked, use_dns_cache=False, limit=20)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False
            )
        return self._session

    async def send(self, url: str, webhook_id: str, payload: dict[str, Any]) -> WebhookAnswer:
        """POST the signed payload once. Raises CallbackRefused for a URL it may not
        reach, and aiohttp's errors (or TimeoutError) when the receiver cannot be reached;
        any answer, whatever its status, is returned."""
        if self._secret is None:
            raise WebhooksDisabled("WEBHOOK_SECRET is not set in this process")
        reason = refusal(url, self._reach)
        if reason is not None:  # checked again: the setting may have changed since
            raise CallbackRefused(reason)
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "agent-orchestrator-webhooks",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, webhook_id, timestamp, body),
        }
        try:
            async with self._client().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                await answer.content.read(65_536)  # a little of it, to reuse the connection
                return WebhookAnswer(answer.status)
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, CallbackRefused):
                raise error.os_error from None
            raise

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
