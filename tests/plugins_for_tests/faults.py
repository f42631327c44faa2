"""Test-only fault points: the host process dies (``os._exit(137)``) inside an invocation.

Configured by environment so a chaos test can restart a host process with the
same manifest and a new seed:

``FNHOST_FAULT=<probability>[:<seed>]`` -- each invocation dies with this
probability (seeded; the seed is printed to stderr so a failure can be replayed);
``FNHOST_FAULT_AFTER=<n>`` -- never during the first ``n`` invocations of a process,
so every life of the host makes progress.

Where it dies is chosen by which module the manifest loads:
:mod:`.faults_inner` (closest to the handler: the effect and the ``output:``
publish are done, no idempotency record, no ack) or :mod:`.faults_outer`
(outermost: everything is done but the ack).
"""

from __future__ import annotations

import os
import random
import sys

from fnhost.types import CallNext, Invocation, Middleware, Outcome


def fault_middleware(point: str) -> Middleware | None:
    setting = os.environ.get("FNHOST_FAULT")
    if not setting:
        return None
    probability_text, _, seed_text = setting.partition(":")
    probability = float(probability_text)
    seed = int(seed_text) if seed_text else random.randrange(2**32)
    spared = int(os.environ.get("FNHOST_FAULT_AFTER", "0"))
    print(f"fault point {point}: probability {probability}, seed {seed}", file=sys.stderr)
    rng = random.Random(seed)
    handled = 0

    async def fault(call: Invocation, call_next: CallNext) -> Outcome:
        nonlocal handled
        outcome = await call_next(call)
        handled += 1
        if handled > spared and rng.random() < probability:
            print(f"fault point {point}: dying after {handled} invocations", file=sys.stderr)
            sys.stderr.flush()
            os._exit(137)
        return outcome

    return fault
