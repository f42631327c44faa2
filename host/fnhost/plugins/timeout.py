"""Built-in plugin: cancel a handler that runs past the function's ``timeout``.

The timed-out invocation fails with :class:`~fnhost.errors.HandlerTimeout`
and is treated like any other failure (error reply, nak with back-off, dead
letter on the last attempt); it is never acked, even when the handler catches
the cancellation and returns. A plain ``def`` handler's
thread cannot be interrupted: the invocation fails at the deadline and the
thread finishes in the background.

One sweeper task per function watches every running invocation's deadline,
instead of one ``asyncio.timeout`` per invocation: arming and cancelling a
loop timer costs about 4 µs per message (a timer-heap push, then a cancelled
handle the loop must skip), a dict entry a tenth of that. The price is
precision: a handler is cancelled within a twentieth of its timeout (at most
a second) after its deadline.
"""

from __future__ import annotations

import asyncio
import time

from fnhost.errors import HandlerTimeout
from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import CallNext, Invocation, Middleware, Outcome


def cancel_slack(seconds: float) -> float:
    """How long past a ``seconds`` timeout a handler may run before it is cancelled."""
    return min(max(seconds / 20, 0.005), 1.0)


class Deadlines:
    """The running invocations of one function and the monotonic time each must end by."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.resolution = cancel_slack(seconds)
        self.running: dict[asyncio.Task[object], float] = {}
        self.expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def enter(self, task: asyncio.Task[object]) -> None:
        self.running[task] = time.monotonic() + self.seconds
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="fnhost-timeout-sweeper")

    def leave(self, task: asyncio.Task[object]) -> bool:
        """Stop watching ``task``; whether the sweeper cancelled it for its deadline."""
        del self.running[task]
        if task in self.expired:
            self.expired.remove(task)
            return True
        return False

    async def _sweep(self) -> None:
        # Ends when nothing runs, so an idle or unloaded function holds no task.
        while self.running:
            await asyncio.sleep(self.resolution)
            now = time.monotonic()
            for task, deadline in self.running.items():
                if deadline <= now and task not in self.expired:
                    self.expired.add(task)
                    # The task is suspended inside the handler (leave() runs with no
                    # await after it returns), so the cancellation lands there.
                    task.cancel()
        self._sweeper = None


@hookimpl
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    seconds = function.timeout
    deadlines = Deadlines(seconds)
    current_task = asyncio.current_task

    async def timeout(call: Invocation, call_next: CallNext) -> Outcome:
        task = current_task()
        assert task is not None
        deadlines.enter(task)
        try:
            outcome = await call_next(call)
        except BaseException as error:
            if deadlines.leave(task) and task.uncancel() == 0:
                # Cancelled for its deadline; or the handler caught that cancellation,
                # then failed otherwise (that error is the cause).
                cause = None if isinstance(error, asyncio.CancelledError) else error
                raise _timed_out(call) from cause
            raise
        if deadlines.leave(task):
            # The handler caught the cancellation and returned (or an
            # ``asyncio.wait_for`` swallowed it): it still ran past its deadline, and the
            # worker task's pending cancel count must go back to 0, or the next
            # timeout's cancellation would end the worker instead of the invocation.
            task.uncancel()
            raise _timed_out(call)
        return outcome

    def _timed_out(call: Invocation) -> HandlerTimeout:
        return HandlerTimeout(f"function {call.function!r} ran past its timeout of {seconds:g}s")

    return timeout
