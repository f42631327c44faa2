"""NATS decentralized auth for tests, built with ``nkeys`` alone (no ``nsc``).

``make_operator_setup`` creates an operator, an account (JetStream enabled)
and a user, signs the JWT chain (operator -> account -> user), and returns the
server config (operator mode, memory resolver) plus the user's creds file text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass

import nkeys


def new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey pair of the given role (``nkeys.PREFIX_BYTE_USER``, ...)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(claims: dict[str, object], signer: nkeys.KeyPair) -> str:
    """A NATS JWT (``ed25519-nkey``) of ``claims`` signed by ``signer``."""
    claims = {"iat": int(time.time()), "iss": signer.public_key.decode(), **claims}
    # The jti is the base32 SHA-256 of the claims without it, as nsc computes it.
    digest = hashlib.sha256(json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64(signer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def creds_text(user_jwt: str, user_seed: bytes) -> str:
    """The ``.creds`` file format that ``nsc`` writes."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class OperatorSetup:
    """What a test needs: the server config fragment and a user's creds."""

    server_config: str
    creds: str
    user_public_key: str


_UNLIMITED = -1


def make_operator_setup() -> OperatorSetup:
    """Operator + account (JetStream on) + user, for a server with a memory resolver."""
    operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    operator_pub = operator.public_key.decode()
    account_pub = account.public_key.decode()
    system_pub = system.public_key.decode()
    operator_jwt = encode_jwt(
        {
            "sub": operator_pub,
            "name": "fnhost-test-operator",
            "nats": {"system_account": system_pub, "type": "operator", "version": 2},
        },
        operator,
    )
    limits = {
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
        "imports": _UNLIMITED,
        "exports": _UNLIMITED,
        "wildcards": True,
        "conn": _UNLIMITED,
        "leaf": _UNLIMITED,
        "mem_storage": _UNLIMITED,
        "disk_storage": _UNLIMITED,
        "streams": _UNLIMITED,
        "consumer": _UNLIMITED,
    }
    account_jwt = encode_jwt(
        {
            "sub": account_pub,
            "name": "APP",
            "nats": {"limits": limits, "type": "account", "version": 2},
        },
        operator,
    )
    system_jwt = encode_jwt(
        {
            "sub": system_pub,
            "name": "SYS",
            "nats": {
                "limits": {
                    **limits,
                    "mem_storage": 0,
                    "disk_storage": 0,
                    "streams": 0,
                    "consumer": 0,
                },
                "type": "account",
                "version": 2,
            },
        },
        operator,
    )
    user_jwt = encode_jwt(
        {
            "sub": user.public_key.decode(),
            "name": "fnhost",
            "nats": {
                "pub": {},
                "sub": {},
                "subs": _UNLIMITED,
                "data": _UNLIMITED,
                "payload": _UNLIMITED,
                "type": "user",
                "version": 2,
            },
        },
        account,
    )
    config = (
        f"operator: {operator_jwt}\n"
        f"system_account: {system_pub}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f"  {account_pub}: {account_jwt}\n"
        f"  {system_pub}: {system_jwt}\n"
        "}\n"
    )
    return OperatorSetup(
        server_config=config,
        creds=creds_text(user_jwt, user.seed),
        user_public_key=user.public_key.decode(),
    )
