"""NATS connection options from the manifest, and the callbacks that log and react.

Defaults differ from nats-py's on purpose (RELIABILITY.md): reconnect
forever (nats-py gives up after about two minutes), ping every 20 s with 3
outstanding (nats-py's 120 s hides a dead peer for minutes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from fnhost.errors import FnhostError
from fnhost.manifest import NatsConfig

log = logging.getLogger("fnhost.nats")

RECONNECT_WAIT = 1.0
"""Seconds between reconnect attempts; nats-py adds up to 100 ms of jitter (250 ms with TLS)."""


class ConnectError(FnhostError):
    """The first connection to NATS was refused for a reason retrying cannot fix."""


class _Refused(Exception):
    """Raised from the error callback to end nats-py's retry loop of the first connect."""


def refusal(exc: BaseException) -> str | None:
    """Why a server refused us for good (credentials, certificate), else ``None``.

    Only the first connect fails on these: a host that ran fine keeps retrying
    through them, since a server being reconfigured may refuse for a moment.
    """
    if isinstance(exc, nats.errors.AuthorizationError):
        return "authorization failed (check user/password, token, nkey or creds)"
    text = str(exc)
    if "authorization violation" in text.lower() or "authentication" in text.lower():
        return f"{text.removeprefix('nats: ')} (check user/password, token, nkey or creds)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc}"
    return None


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """An SSL context from ``nats.tls`` (CA to trust, client cert and key), or ``None``."""
    if config.tls is None:
        return None
    context = ssl.create_default_context(cafile=config.tls.ca)
    if config.tls.cert:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def connect_options(config: NatsConfig, servers: list[str], *, name: str) -> dict[str, Any]:
    """Keyword arguments for :func:`nats.connect`."""
    options: dict[str, Any] = {
        "servers": servers,
        "name": config.name or name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT,
        "ping_interval": 20,
        "max_outstanding_pings": 3,
        "allow_reconnect": True,
    }
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.nkey:
        options["nkeys_seed"] = config.nkey
    if config.creds:
        options["user_credentials"] = config.creds
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    return options


async def connect_briefly(
    url: str, config: NatsConfig | None = None, *, name: str = "fnhost-cli"
) -> NatsClient:
    """A connection for one short command (``invoke``, ``dlq``, ``deploy``, ...).

    It uses the manifest's credentials and TLS like the host, tries twice, and then
    raises :class:`ConnectError` naming the server and why: nats-py's
    ``max_reconnect_attempts=0`` means *forever*, and its default error callback
    prints a traceback per try.
    """
    errors: list[Exception] = []

    async def note(exc: Exception) -> None:
        errors.append(exc)

    options = connect_options(config or NatsConfig(), url.split(","), name=name)
    options.update(
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        connect_timeout=3,
        error_cb=note,
    )
    try:
        return await nats.connect(**options)
    except (nats.errors.NoServersError, OSError) as exc:
        # A refusal (credentials, certificate) explains more than what followed it,
        # e.g. the reset of the connection the server closed after refusing.
        refusals = [why for why in map(refusal, errors) if why]
        last: BaseException = errors[-1] if errors else exc
        why = refusals[-1] if refusals else str(last) or type(last).__name__
        raise ConnectError(f"cannot connect to NATS at {url}: {why}") from None


async def connect(
    config: NatsConfig,
    servers: list[str],
    *,
    name: str,
    on_reconnect: Callable[[], None] | None = None,
    on_closed: Callable[[], None] | None = None,
    on_slow_consumer: Callable[[nats.errors.SlowConsumerError], None] | None = None,
    connect_timeout: float = 5.0,
) -> NatsClient:
    """Connect with fnhost's defaults; disconnects and reconnects are logged.

    nats-py reports each message it drops for a subscription that fell behind
    (``SlowConsumerError``) to ``on_slow_consumer`` instead of the log.

    While no server answers, the first connect retries forever (a host may
    start before its server). A server that refuses the credentials or the TLS
    handshake ends it with :class:`ConnectError`: retrying cannot fix that.
    """
    nc = NatsClient()
    first_connect = True

    async def disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        log.info("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
        if on_reconnect is not None:
            on_reconnect()

    async def closed() -> None:
        log.info("NATS connection closed")
        if on_closed is not None:
            on_closed()

    async def error(exc: Exception) -> None:
        if first_connect:
            why = refusal(exc)
            if why is not None:
                raise _Refused(why) from exc
        if on_slow_consumer is not None and isinstance(exc, nats.errors.SlowConsumerError):
            on_slow_consumer(exc)
            return
        log.warning("NATS error: %s", exc)

    options = connect_options(config, servers, name=name)
    options["connect_timeout"] = connect_timeout
    try:
        await nc.connect(
            **options,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            closed_cb=closed,
            error_cb=error,
        )
    except _Refused as exc:
        await _abandon(nc)
        current = getattr(nc, "_current_server", None)  # the server that refused us
        where = current.uri.netloc if current is not None else ", ".join(servers)
        raise ConnectError(f"cannot connect to NATS at {where}: {exc}") from None
    first_connect = False
    log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
    return nc


async def _abandon(nc: NatsClient) -> None:
    """Close a client whose first connect failed (its socket is still open)."""
    try:
        async with asyncio.timeout(2):
            await nc.close()
    except TimeoutError:
        # nats-py's close() does not return after a failed TLS handshake.
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            transport.close()
