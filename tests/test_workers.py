"""``fnhost run --workers N``: a supervisor, N host processes, one HTTP face.

Real processes against a real nats-server: the work is shared through the
durable consumer and the queue group, the supervisor's ``/metrics`` and
``/functions`` add the workers up, a worker killed or hung is replaced with
its counts kept, and SIGTERM (or the supervisor's own death) drains them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fnhost.workers import merge_functions, merge_metrics
from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for, wait_for_sync
from support.supervised import Supervised, alive, kill

MANIFEST = """\
version: 1
http: {port: 0}
streams:
  JOBS: {subjects: ["jobs.>"]}
  DONE: {subjects: ["done.>"]}
functions:
  work:
    module: work.py
    trigger: {stream: JOBS, durable: work}
    concurrency: 4
    output: done.work
  whoami:
    module: work.py
    handler: whoami
    trigger: {request: who}
"""

WORK = """\
import asyncio
import os


async def handle(event: dict) -> dict:
    await asyncio.sleep(event.get("sleep", 0.005))
    return {"n": event["n"], "pid": os.getpid()}


async def whoami(payload: dict) -> dict:
    return {"pid": os.getpid()}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "fn.yaml").write_text(MANIFEST)
    (tmp_path / "work.py").write_text(WORK)
    return tmp_path


@pytest.fixture
def started(project: Path, nats_server: NatsServer) -> Any:
    """Start a supervisor with the given extra arguments; everything is stopped at the end."""
    made: list[tuple[Supervised, list[int]]] = []

    def start(*extra: str) -> Supervised:
        supervised = Supervised(project, "--nats", nats_server.url, *extra)
        made.append((supervised, []))
        wait_for_sync(supervised.ready, timeout=30, message="every worker ready")
        made[-1][1].extend(w["pid"] for w in supervised.workers())
        return supervised

    yield start
    for supervised, pids in made:
        supervised.close(pids)


async def publish_jobs(url: str, numbers: range, **extra: Any) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for n in numbers:
            await js.publish(f"jobs.{n}", json.dumps({"n": n, **extra}).encode())
    finally:
        await nc.close()


async def outputs(url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        count = (await js.stream_info("DONE")).state.messages
        found = []
        for seq in range(1, count + 1):
            found.append(json.loads((await js.get_msg("DONE", seq)).data or b"{}"))
        return found
    finally:
        await nc.close()


pytestmark = [pytest.mark.nats, pytest.mark.slow]


async def test_two_workers_share_the_consumer_and_one_http_face(
    started: Any, nats_server: NatsServer
) -> None:
    supervised = started("--workers", "2")
    worker_pids = {w["pid"] for w in supervised.workers()}
    assert len(worker_pids) == 2 and supervised.proc.pid not in worker_pids

    await publish_jobs(nats_server.url, range(300))
    done = await wait_for(
        lambda: _all_done(nats_server.url, 300), timeout=60, message="300 outputs"
    )
    assert sorted(out["n"] for out in done) == list(range(300))  # each job once
    assert {out["pid"] for out in done} == worker_pids  # both workers took jobs

    nc = await nats.connect(nats_server.url)
    try:
        replies = [json.loads((await nc.request("who", b"{}", timeout=5)).data) for _ in range(20)]
    finally:
        await nc.close()
    assert {reply["pid"] for reply in replies} <= worker_pids

    # The supervisor's /metrics and /functions are the sum over both workers.
    assert supervised.metric("fnhost_messages_total", function="work", outcome="ack") == 300
    assert supervised.metric("fnhost_messages_total", function="whoami", outcome="reply") == 20
    assert supervised.metric("fnhost_workers") == 2
    assert supervised.metric("fnhost_workers_ready") == 2
    assert supervised.metric("fnhost_worker_restarts_total") == 0
    status, functions = supervised.get("/functions")
    work = next(f for f in functions if f["name"] == "work")
    assert status == 200 and work["counts"]["ack"] == 300 and work["workers"] == 2
    assert work["status"] == "running"
    assert supervised.get("/readyz") == (200, {"status": "ready"})

    assert supervised.stop() == 0
    for pid in worker_pids:
        assert not alive(pid)


async def _all_done(url: str, count: int) -> list[dict[str, Any]] | None:
    found = await outputs(url)
    return found if len(found) >= count else None


async def test_a_killed_worker_is_replaced_and_its_counts_are_kept(
    started: Any, nats_server: NatsServer
) -> None:
    supervised = started("--workers", "2")
    await publish_jobs(nats_server.url, range(100))
    await wait_for(lambda: _all_done(nats_server.url, 100), timeout=60, message="100 outputs")
    wait_for_sync(
        lambda: supervised.metric("fnhost_messages_total", function="work", outcome="ack") == 100,
        timeout=10,
        message="100 acks in the supervisor's metrics",
    )
    first = supervised.pid_of(1)
    os.kill(first, signal.SIGKILL)

    wait_for_sync(
        lambda: supervised.pid_of(1) != first and supervised.ready(),
        timeout=30,
        message="worker 1 replaced and ready",
    )
    assert supervised.metric("fnhost_worker_restarts_total") == 1
    assert f"worker 1 (pid {first}) exited with code -9" in supervised.log()
    # The dead worker's acks stay in the total: it never goes down.
    assert supervised.metric("fnhost_messages_total", function="work", outcome="ack") >= 100

    await publish_jobs(nats_server.url, range(100, 200))
    done = await wait_for(lambda: _all_done(nats_server.url, 200), timeout=60, message="200")
    assert sorted(out["n"] for out in done) == list(range(200))
    wait_for_sync(
        lambda: supervised.metric("fnhost_messages_total", function="work", outcome="ack") == 200,
        timeout=10,
        message="200 acks: the dead worker's 'work' acks plus the living ones'",
    )
    assert supervised.stop() == 0


async def test_a_hung_worker_is_killed_and_replaced(started: Any) -> None:
    supervised = started("--workers", "2", "--worker-timeout", "3")
    hung = supervised.pid_of(2)
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for_sync(
            lambda: supervised.pid_of(2) != hung and supervised.ready(),
            timeout=40,
            message="the stopped worker replaced",
        )
    finally:
        kill(hung)
    assert not alive(hung)
    assert f"worker 2 (pid {hung}) has not answered" in supervised.log()
    assert supervised.stop() == 0


async def test_sigterm_drains_every_worker_and_loses_nothing(
    started: Any, nats_server: NatsServer, project: Path
) -> None:
    supervised = started("--workers", "2")
    worker_pids = [w["pid"] for w in supervised.workers()]
    await publish_jobs(nats_server.url, range(60), sleep=0.2)
    await wait_for(lambda: _some_done(nats_server.url), timeout=30, message="a first output")

    assert supervised.stop() == 0
    for pid in worker_pids:
        assert not alive(pid)
    log = supervised.log()
    assert log.count("draining 2 functions") == 2 and "workers stopped" in log

    # What was not finished was not acked: a new run takes it all.
    again = started("--workers", "2")
    done = await wait_for(lambda: _all_done(nats_server.url, 60), timeout=60, message="60")
    assert set(range(60)) == {out["n"] for out in done}
    assert again.stop() == 0


async def _some_done(url: str) -> bool:
    return bool(await outputs(url))


async def test_workers_drain_when_their_supervisor_is_killed(started: Any) -> None:
    supervised = started("--workers", "2")
    worker_pids = [w["pid"] for w in supervised.workers()]
    os.killpg(supervised.proc.pid, signal.SIGKILL)
    supervised.proc.wait()
    wait_for_sync(
        lambda: not any(alive(pid) for pid in worker_pids),
        timeout=30,
        message="the orphaned workers drained and exited",
    )


async def test_embedded_nats_is_started_once_for_all_workers(project: Path) -> None:
    manifest = (project / "fn.yaml").read_text()
    embedded = manifest.replace("version: 1\n", "version: 1\nnats: {url: embedded}\n")
    (project / "fn.yaml").write_text(embedded)
    supervised = Supervised(project, "--workers", "2")
    worker_pids: list[int] = []
    try:
        wait_for_sync(supervised.ready, timeout=60, message="every worker ready")
        worker_pids = [w["pid"] for w in supervised.workers()]
        url = (project / ".fnhost" / "nats.url").read_text().strip()
        log = supervised.log()
        assert log.count(f"connected to NATS at {url.removeprefix('nats://')}") == 2
        await publish_jobs(url, range(10))
        done = await wait_for(lambda: _all_done(url, 10), timeout=30, message="10 outputs")
        assert sorted(out["n"] for out in done) == list(range(10))
        assert supervised.stop() == 0
        assert not (project / ".fnhost" / "nats.url").exists()  # the server stopped with it
    finally:
        supervised.close(worker_pids)


async def test_sighup_restarts_the_workers_one_at_a_time_with_the_new_code(
    started: Any, nats_server: NatsServer, project: Path
) -> None:
    supervised = started("--workers", "2")
    old = {w["worker"]: w["pid"] for w in supervised.workers()}
    version_2 = WORK.replace('"pid": os.getpid()}', '"pid": os.getpid(), "v": 2}')
    (project / "work.py").write_text(version_2)

    publishing = asyncio.ensure_future(_publish_slowly(nats_server.url, range(300)))
    os.kill(supervised.proc.pid, signal.SIGHUP)
    await wait_for(
        lambda: "rolling restart done: 2 workers" in supervised.log(),
        timeout=90,
        message="the rolling restart finished",
    )
    await publishing
    new = {w["worker"]: w["pid"] for w in supervised.workers()}
    assert set(new.values()).isdisjoint(old.values())
    assert supervised.ready()
    assert supervised.metric("fnhost_worker_restarts_total") == 0  # a roll is no crash

    # Worker 2 was stopped only once the new worker 1 was ready: never no worker at all.
    log = supervised.log()
    new_worker_1 = log.index(f"worker 1 started (pid {new[1]})")
    ready_line = 'host ready: 2 of 2 functions running", "worker": 1'
    worker_1_ready = log.index(ready_line, new_worker_1)
    worker_2_drains = log.index('"SIGTERM received: draining", "worker": 2')
    assert worker_1_ready < worker_2_drains

    done = await wait_for(lambda: _all_done(nats_server.url, 300), timeout=60, message="300")
    assert {out["n"] for out in done} == set(range(300))  # nothing lost during the roll
    await publish_jobs(nats_server.url, range(300, 310))
    done = await wait_for(lambda: _all_done(nats_server.url, 310), timeout=60, message="310")
    assert all(out.get("v") == 2 for out in done if out["n"] >= 300)  # the new code runs
    assert supervised.stop() == 0


async def _publish_slowly(url: str, numbers: range) -> None:
    for start in range(numbers.start, numbers.stop, 10):
        await publish_jobs(url, range(start, min(start + 10, numbers.stop)))
        await asyncio.sleep(0.02)


async def test_sighup_with_a_broken_manifest_keeps_every_worker(
    started: Any, project: Path
) -> None:
    supervised = started("--workers", "2")
    before = [w["pid"] for w in supervised.workers()]
    (project / "fn.yaml").write_text(MANIFEST.replace("concurrency: 4", "concurrency: many"))
    os.kill(supervised.proc.pid, signal.SIGHUP)
    wait_for_sync(
        lambda: "has errors; every worker keeps running as it is" in supervised.log(),
        timeout=30,
        message="the refused roll logged",
    )
    assert "concurrency" in supervised.log().split("has errors")[-1]
    assert [w["pid"] for w in supervised.workers()] == before
    assert supervised.ready()
    (project / "fn.yaml").write_text(MANIFEST)
    assert supervised.stop() == 0


def test_reload_is_refused_with_workers(project: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fnhost", "run", "fn.yaml", "--workers", "2", "--reload"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--reload swaps code inside one host process" in done.stderr


def test_zero_workers_is_a_usage_error(project: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fnhost", "run", "fn.yaml", "--workers", "0"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--workers" in done.stderr


# --- merging, without processes ---------------------------------------------------------

SCRAPE = """\
# HELP fnhost_messages_total Messages.
# TYPE fnhost_messages_total counter
fnhost_messages_total{{function="a",outcome="ack"}} {acks}
# HELP fnhost_invocation_duration_seconds Duration.
# TYPE fnhost_invocation_duration_seconds histogram
fnhost_invocation_duration_seconds_bucket{{function="a",le="0.5"}} {acks}
fnhost_invocation_duration_seconds_bucket{{function="a",le="+Inf"}} {acks}
fnhost_invocation_duration_seconds_count{{function="a"}} {acks}
fnhost_invocation_duration_seconds_sum{{function="a"}} 1.5
# HELP fnhost_inflight In flight.
# TYPE fnhost_inflight gauge
fnhost_inflight{{function="a"}} 2
# HELP fnhost_consumer_pending_messages Pending.
# TYPE fnhost_consumer_pending_messages gauge
fnhost_consumer_pending_messages{{stream="S",consumer="c"}} {pending}
"""


def _parse(text: str) -> list[Any]:
    return list(text_string_to_metric_families(text))


def _value(families: list[Any], name: str, **labels: str) -> float:
    for family in families:
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(name)


def test_metrics_add_up_except_the_consumer_gauges_which_take_the_largest() -> None:
    merged = merge_metrics(
        [_parse(SCRAPE.format(acks=5, pending=7)), _parse(SCRAPE.format(acks=3, pending=9))], {}
    )
    assert _value(merged, "fnhost_messages_total", function="a", outcome="ack") == 8
    assert _value(merged, "fnhost_invocation_duration_seconds_bucket", function="a", le="0.5") == 8
    assert _value(merged, "fnhost_invocation_duration_seconds_sum", function="a") == 3.0
    assert _value(merged, "fnhost_inflight", function="a") == 4
    assert _value(merged, "fnhost_consumer_pending_messages", stream="S", consumer="c") == 9


def test_a_dead_workers_counters_stay_in_the_sum() -> None:
    retired = {
        ("fnhost_messages", "counter", "Messages."): {
            ("fnhost_messages_total", (("function", "a"), ("outcome", "ack"))): 40.0
        }
    }
    merged = merge_metrics([_parse(SCRAPE.format(acks=2, pending=0))], retired)
    assert _value(merged, "fnhost_messages_total", function="a", outcome="ack") == 42
    alone = merge_metrics([], retired)  # every worker down: the total is still there
    assert _value(alone, "fnhost_messages_total", function="a", outcome="ack") == 40


def _function(status: str, acks: int, version: str | None, pending: int | None) -> dict[str, Any]:
    return {
        "name": "f",
        "trigger": {"kind": "stream"},
        "version": version,
        "status": status,
        "error": "boom" if status == "failed" else None,
        "inflight": 1,
        "counts": {"ack": acks},
        "pending": pending,
        "dead_letter": None,
        "dead_letter_depth": None,
    }


def test_functions_add_up_and_show_the_worst_status_and_every_version() -> None:
    [merged] = merge_functions(
        [
            [_function("running", 3, "v1", 5)],
            [_function("failed", 4, "v2", 7)],
            [_function("starting", 0, None, None)],
        ]
    )
    assert merged["counts"] == {"ack": 7} and merged["inflight"] == 3
    assert merged["status"] == "failed" and merged["error"] == "boom"
    assert merged["version"] == "v1, v2" and merged["pending"] == 7
    assert merged["workers"] == 3


def test_no_function_appears_twice() -> None:
    report = [_function("running", 1, "v1", None)]
    assert [f["name"] for f in merge_functions([report, report])] == ["f"]
