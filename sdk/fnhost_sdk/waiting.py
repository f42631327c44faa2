"""Wait for a condition instead of sleeping: ``wait_for`` (async) and ``wait_for_sync``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["wait_for", "wait_for_sync"]

T = TypeVar("T")


def _describe(predicate: Callable[..., object]) -> str:
    name = getattr(predicate, "__qualname__", repr(predicate))
    return f"condition {name}"


def _timeout_error(
    predicate: Callable[..., object],
    timeout: float,
    message: str,
    last_value: object,
    last_error: BaseException | None,
) -> AssertionError:
    text = (
        f"{message or _describe(predicate)}: not true after {timeout:g}s (last value {last_value!r}"
    )
    text += f", last error {last_error!r})" if last_error is not None else ")"
    return AssertionError(text)


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...
@overload
async def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...
async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises ``AssertionError`` with ``message`` after ``timeout`` seconds. An
    exception from the predicate propagates unless its type is in ``ignore``
    (then it counts as "not yet" and is shown if time runs out). An async
    predicate still running at the deadline is cancelled.
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        scope: asyncio.Timeout | None = None
        try:
            result = predicate()
            if inspect.isawaitable(result):
                # At least one interval, so that a last try before the deadline can finish.
                async with asyncio.timeout(max(deadline - time.monotonic(), interval)) as scope:
                    result = await result
            if result:
                return result
            last_value = result
        except Exception as err:
            if scope is not None and scope.expired():
                raise _timeout_error(predicate, timeout, message, last_value, last_error) from None
            if not isinstance(err, ignore):
                raise
            last_error = err
        if time.monotonic() >= deadline:
            raise _timeout_error(
                predicate, timeout, message, last_value, last_error
            ) from last_error
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Blocking ``wait_for`` for plain functions (fixtures, threads, sync tests)."""
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                raise TypeError("wait_for_sync got an awaitable: use `await wait_for(...)`")
            if result:
                return result
            last_value = result
        except ignore as err:
            last_error = err
        if time.monotonic() >= deadline:
            raise _timeout_error(
                predicate, timeout, message, last_value, last_error
            ) from last_error
        time.sleep(interval)
