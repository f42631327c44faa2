"""``trigger: {request: x.y}``: request/reply over core NATS.

The return value is the reply. Errors are replies too, in the NATS services
convention (``Nats-Service-Error`` / ``Nats-Service-Error-Code``: 400 bad
input, 500 handler failure, 503 draining), so a caller never waits for a
timeout to learn that something failed.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from fnhost.invocation import error_reply
from fnhost.triggers.subject import CoreTrigger
from fnhost.types import Outcome, Reply
from fnhost_sdk import headers as h

log = logging.getLogger("fnhost.trigger")


class RequestTrigger(CoreTrigger):
    """``trigger: {request: x.y}``: the return value is the reply; errors are error replies."""

    async def act(self, msg: Msg, outcome: Outcome) -> None:
        if not msg.reply:
            return
        if not isinstance(outcome, Reply):
            # A middleware ended the chain without a reply (e.g. a duplicate): answer empty.
            outcome = Reply(b"")
        if outcome.error_code is not None and outcome.headers:
            # A handler failure is the function's problem (error); bad input is the
            # caller's, which the reply tells them, so the host only notes it (info).
            log.log(
                logging.ERROR if outcome.error_code >= 500 else logging.INFO,
                "function %s: error reply %d to a request on %s: %s",
                self.name,
                outcome.error_code,
                msg.subject,
                outcome.headers.get(h.SERVICE_ERROR),
            )
        await self.nc.publish(msg.reply, outcome.data, headers=outcome.headers)

    async def refuse(self, msg: Msg) -> None:
        if msg.reply:
            reply = error_reply(503, f"function {self.name!r} is draining; try again")
            await self.nc.publish(msg.reply, reply.data, headers=reply.headers)
