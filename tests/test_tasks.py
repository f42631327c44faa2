"""cancel_and_wait ends tasks whose first cancellation asyncio.wait_for swallowed."""

from __future__ import annotations

import asyncio
import sys

from fnhost.tasks import cancel_and_wait


def _polling_task() -> tuple[asyncio.Task[None], list[asyncio.Future[None]]]:
    """A task that waits for answer after answer through ``asyncio.wait_for``, as the
    host's background loops do through nats-py's requests and fetches."""
    loop = asyncio.get_running_loop()
    answers: list[asyncio.Future[None]] = []

    async def poll_forever() -> None:
        while True:
            answer: asyncio.Future[None] = loop.create_future()
            answers.append(answer)
            await asyncio.wait_for(answer, 10)

    return loop.create_task(poll_forever()), answers


async def test_a_task_whose_answer_and_cancellation_arrive_together_is_stopped() -> None:
    task, answers = _polling_task()
    await asyncio.sleep(0)
    answers[-1].set_result(None)  # the answer lands in the loop turn of the cancellation

    await asyncio.wait_for(cancel_and_wait([task]), 5)

    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert len(answers) == 2, "wait_for swallowed the first cancellation: polled again"


async def test_what_stopped_tasks_raised_is_collected_and_finished_tasks_are_left_alone() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    loop = asyncio.get_running_loop()
    failed, sleeping = loop.create_task(fails()), loop.create_task(sleeps())
    await asyncio.sleep(0)
    assert failed.done()

    await cancel_and_wait([failed, sleeping])

    assert isinstance(failed.exception(), RuntimeError)
    assert sleeping.cancelled()
