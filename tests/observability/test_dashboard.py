"""manifests/grafana/fnhost-dashboard.json is built only on metrics fnhost exports.

Every PromQL expression of the dashboard (panels and template variables) is
parsed down to its identifiers; each one must be a PromQL function, keyword
or label, or a series the host's ``/metrics`` serves after traffic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from fnhost_sdk.testing import wait_for

from ._support import HostFactory, http

DASHBOARD = Path(__file__).resolve().parents[2] / "manifests" / "grafana" / "fnhost-dashboard.json"

PROMQL_WORDS = frozenset(
    {
        # aggregations and functions the dashboard may use
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "clamp_min",
        "label_values",
        # modifiers
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
    }
)

MANIFEST = """\
version: 1
http: {port: 0}
streams:
  IN: {subjects: ["in.>"]}
  DLQ: {subjects: ["dlq.>"]}
functions:
  answer:
    module: fn.py
    handler: answer
    trigger: {request: answer}
  consume:
    module: fn.py
    handler: consume
    trigger: {stream: IN, subjects: ["in.>"], durable: consume}
    dead_letter: dlq.consume
"""

FUNCTIONS = {
    "fn.py": """\
        from fnhost_sdk import Context, Reject


        async def answer(data: dict, ctx: Context) -> dict:
            await ctx.publish("answered", data)
            return data


        async def consume(data: dict) -> None:
            if data.get("reject"):
                raise Reject("no")
        """
}


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            # "query" is also the datasource type ("prometheus"): only PromQL has parentheses.
            if isinstance(value, str) and (
                key in ("expr", "definition") or (key == "query" and "(" in value)
            ):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (everything else is PromQL or a label)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", text)  # label_values(metric, label)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {word for word in words if word not in PROMQL_WORDS}


def exported(metrics_text: str) -> set[str]:
    names = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in ("rate", "p50", "p99", "error", "pending", "dead-lettered"):
        assert wanted in titles, wanted


def test_metric_names_are_parsed_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (function, le) (rate(fnhost_invocation_duration_seconds"
        '_bucket{function=~"$function"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"fnhost_invocation_duration_seconds_bucket"}
    assert metric_names("label_values(fnhost_messages_total, function)") == {
        "fnhost_messages_total"
    }


@pytest.mark.nats
async def test_every_dashboard_metric_is_exported(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, FUNCTIONS)
    js = nc.jetstream()
    await nc.request("answer", b"{}", timeout=5)
    await js.publish("in.ok", b"{}")
    await js.publish("in.no", b'{"reject": true}')
    await wait_for(lambda: host.metrics.counts("consume")["dead_letter"] == 1)
    await host.metrics.refresh_pending(host)
    assert host.http_url is not None
    served = exported((await http(host.http_url + "/metrics")).text)

    expressions = list(_expressions(json.loads(DASHBOARD.read_text())))
    assert len(expressions) >= 10
    used: set[str] = set()
    for expr in expressions:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= served, f"{expr!r} uses {sorted(names - served)}, not in /metrics"
        used |= names
    assert {
        "fnhost_messages_total",
        "fnhost_invocation_duration_seconds_bucket",
        "fnhost_consumer_pending_messages",
        "fnhost_dead_lettered_total",
    } <= used
