"""How every store turns a message's raw idempotency key into the key it stores.

A raw key can be anything a header, a ``Nats-Msg-Id`` or a key function
holds: kilobytes long, with a NUL byte, with characters a KV key does not
allow. Stored as it is, a long key made the kv store's KV subject overflow
the server's control line (the server closes the connection) and
PostgreSQL's index row (every message with it failed as if the store were
down), and PostgreSQL text cannot hold a NUL byte.

So a store keeps a key in its usual form (``kv``: base64url; the others: the
key itself) while that form is at most :data:`MAX_KEY_BYTES` bytes, and
otherwise its :func:`digest`: :data:`DIGEST_MARK` and the SHA-256 of the raw
key's UTF-8 bytes in hex, 65 characters whatever the key. Short keys keep the
form they always had, so records stored before digests existed are found.

The forms never meet: a digest starts with :data:`DIGEST_MARK`, which
base64url never writes, and :func:`plain_encoder` digests a raw key that
itself starts with the mark.
"""

from __future__ import annotations

import hashlib

from fnhost.idempotency import KeyEncoder

__all__ = ["DIGEST_MARK", "MAX_KEY_BYTES", "digest", "plain_encoder"]

MAX_KEY_BYTES = 256
"""The longest stored form of a key (after the function's prefix), in bytes, kept as it is."""

DIGEST_MARK = "="
"""What a digest starts with: allowed in KV keys, never written by (unpadded) base64url."""


def digest(raw: str) -> str:
    """The fixed-length stand-in of ``raw``: ``=`` and its SHA-256 in hex."""
    data = raw.encode("utf-8", "surrogatepass")  # a key function may return any str
    return DIGEST_MARK + hashlib.sha256(data).hexdigest()


def plain_encoder(prefix: str) -> KeyEncoder:
    """Keys stored as ``prefix`` and the raw key (memory, Redis, PostgreSQL), or its
    digest when the key is longer than :data:`MAX_KEY_BYTES` in UTF-8, holds a
    NUL byte or a lone surrogate, or starts with :data:`DIGEST_MARK`."""

    def encode(raw: str) -> str:
        try:
            data = raw.encode()
        except UnicodeEncodeError:
            return prefix + digest(raw)
        if len(data) > MAX_KEY_BYTES or b"\x00" in data or raw.startswith(DIGEST_MARK):
            return prefix + digest(raw)
        return prefix + raw

    return encode
