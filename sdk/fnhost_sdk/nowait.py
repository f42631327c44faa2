"""Publishing without a coroutine, for the few publishes a host sends per message.

nats-py's ``Client.publish`` is a coroutine that validates the subjects and
encodes the header dict on every call: 2.6 µs for a publish with one header,
against 0.9 µs for the same command encoded once and appended to the client's
outgoing buffer (bench/README.md, "sixteenth session"). A host with the kv
idempotency store sends a lease, a share of a record write and an ack per
message.

:func:`publish_nowait` appends the command itself, and only while the client
is plainly connected. Everything else (a reconnect's buffering, a full
buffer, a drain, a client whose internals differ from the nats-py versions
this was written against) it leaves to ``Client.publish`` by returning
``False``. Unlike ``Client.publish`` it does not check the subjects: it is
for subjects the caller built from checked parts or the server sent (an ack
subject), never for a user's. It relies on the buffer
and flusher nats-py 2.16 keeps in ``_pending``, ``_pending_data_size``,
``_flush_queue`` and ``_flusher_task``; the test suite checks they still work
with the nats-py it installs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

__all__ = ["EncodedHeaders", "publish_nowait"]


class EncodedHeaders(dict[str, str]):
    """Message headers encoded once as a NATS header block (``block``).

    Still a plain dict, so ``Client.publish`` takes the same object when
    :func:`publish_nowait` hands the publish back. Keys and values are used as
    given: build one only from constants and values you control.
    """

    __slots__ = ("block",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__(headers)
        lines = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
        self.block = f"NATS/1.0\r\n{lines}\r\n".encode()


def publish_nowait(
    nc: NatsClient,
    subject: str,
    payload: bytes = b"",
    reply: str = "",
    headers: EncodedHeaders | None = None,
) -> bool:
    """Queue a publish on ``nc``'s outgoing buffer now; ``False``: nothing was queued,
    ``await nc.publish(...)`` instead (it buffers, raises or flushes as nats-py does).

    ``subject`` and ``reply`` must be valid subjects (no whitespace): they are
    sent as they are.

    The command leaves with the next write of nats-py's flusher, in order with
    every publish queued before it, as ``Client.publish``'s would.
    """
    try:
        connected = nc._status == nc.CONNECTED  # not reconnecting, not draining
        flusher = nc._flusher_task
        flush_queue = nc._flush_queue
        pending_size = nc._pending_data_size
    except AttributeError:
        return False
    if (
        not connected
        or flusher is None
        or flusher.done()
        or flush_queue is None
        or len(payload) > nc._max_payload
    ):
        return False
    if headers is None:
        command = b"PUB %s %s %d\r\n%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(payload),
            payload,
        )
    else:
        block = headers.block
        command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(block),
            len(block) + len(payload),
            block,
            payload,
        )
    if 0 < nc._max_pending_size < pending_size + len(command):
        return False  # nc.publish flushes with its timeout first
    nc._pending.append(command)
    nc._pending_data_size = pending_size + len(command)
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    if flush_queue.empty():
        # Wake the flusher as Client.publish does; nothing waits for its write.
        flush_queue.put_nowait(flusher.get_loop().create_future())
    return True
