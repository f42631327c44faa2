"""Errors a function raises to steer delivery, and errors a caller sees.

``Retry`` and ``Reject`` are control flow, not failures: the host turns them
into a negative acknowledgement with a delay, or a dead letter.
"""

from __future__ import annotations


class FnhostError(Exception):
    """Base class of every error fnhost raises on purpose."""


class Retry(FnhostError):
    """Ask for another attempt of this message, after ``delay`` seconds.

    With ``delay=None`` the function's ``retry.backoff`` decides the delay.
    On a request or subject trigger there is no redelivery: the caller gets a
    503 error reply (request) or the message is dropped and counted (subject).
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Reject(FnhostError):
    """Refuse this message for good: it goes to the dead-letter subject at once.

    On a request trigger the caller gets a 400 error reply carrying ``reason``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadError(FnhostError):
    """A payload could not be decoded into the handler's parameter type."""


class ServiceError(FnhostError):
    """An error reply from a request/reply function (NATS services convention).

    ``code`` is the ``Nats-Service-Error-Code`` header: 400 bad input, 500
    handler failure, 503 draining or unavailable.
    """

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code} {description}")
        self.code = code
        self.description = description
