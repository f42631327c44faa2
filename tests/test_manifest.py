"""fn.yaml: durations and sizes, interpolation, defaults, every validation trap, and the
one-line-per-problem error format. No NATS needed."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fnhost.durations import format_duration, parse_duration, parse_size
from fnhost.errors import ManifestError
from fnhost.manifest import FunctionSpec, Manifest, RetryPolicy, load_manifest, parse_manifest

REPO = Path(__file__).resolve().parent.parent

STREAMS = """\
version: 1
streams:
  ORDERS: {subjects: ["orders.>"]}
  DLQ: {subjects: ["dlq.>"]}
"""


def parse(text: str, environ: dict[str, str] | None = None, root: Path | None = None) -> Manifest:
    return parse_manifest(textwrap.dedent(text), environ=environ or {}, root=root)


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    """Every issue of an invalid manifest, as the user reads it."""
    with pytest.raises(ManifestError) as info:
        parse(text, environ)
    lines = [str(issue) for issue in info.value.issues]
    assert str(info.value) == "\n".join(lines)
    return lines


def one_problem(text: str, environ: dict[str, str] | None = None) -> str:
    found = problems(text, environ)
    assert len(found) == 1, found
    return found[0]


# --- durations and sizes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1m30s", 90.0),
        ("1h30m15s", 5415.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        ("30", 30.0),
        ("0", 0.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["banana", "5 s", "5sec", "-1s", "", "1m-30s", -1, True, None])
def test_parse_duration_rejects_with_the_value_and_the_forms(value: object) -> None:
    with pytest.raises(ValueError, match="250ms") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("8MiB", 8 * 1024**2),
        ("8MB", 8_000_000),
        ("1KiB", 1024),
        ("1KB", 1000),
        ("1GiB", 1024**3),
        ("2GB", 2 * 1000**3),
        ("512B", 512),
        ("512", 512),
        ("1.5KiB", 1536),
        ("8 mib", 8 * 1024**2),
        (100, 100),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["8XB", "-1", "0.5B", "MiB", True, -5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"), [(90, "1m30s"), (0.25, "250ms"), (120, "2m"), (86400, "1d"), (5, "5s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_durations_and_sizes_in_a_manifest() -> None:
    manifest = parse(
        """\
        version: 1
        streams:
          S: {subjects: [s.>], max_age: 7d, duplicate_window: 1m30s, max_bytes: 1GiB}
        registry: {max_artifact_size: 16MiB}
        functions:
          f: {module: f.py, trigger: {subject: s.x}, timeout: 250ms, retry: {backoff: [1s, 2m]}}
        """
    )
    stream = manifest.streams["S"]
    assert (stream.max_age, stream.duplicate_window, stream.max_bytes) == (604800, 90, 1024**3)
    assert manifest.registry.max_artifact_size == 16 * 1024**2
    assert manifest.functions["f"].timeout == 0.25
    assert manifest.functions["f"].retry.backoff == [1.0, 120.0]


# --- interpolation ----------------------------------------------------------------

NATS_URL = """\
version: 1
nats:
  url: ${NATS_URL:-embedded}
"""


def test_interpolation_takes_the_variable_when_set() -> None:
    manifest = parse(NATS_URL, {"NATS_URL": "nats://a:4222, nats://b:4222"})
    assert manifest.nats.urls == ["nats://a:4222", "nats://b:4222"]
    assert not manifest.nats.is_embedded


def test_interpolation_default_when_unset_or_empty() -> None:
    assert parse(NATS_URL).nats.is_embedded
    assert parse(NATS_URL, {"NATS_URL": ""}).nats.is_embedded


def test_interpolation_unset_without_default_names_key_and_line() -> None:
    text = "version: 1\nnats:\n  url: ${NATS_URL}\n"
    assert one_problem(text) == (
        "fn.yaml:3:nats.url: environment variable NATS_URL is not set"
        " (or write ${NATS_URL:-default})"
    )


def test_interpolation_escape_and_several_references() -> None:
    manifest = parse(
        """\
        version: 1
        functions:
          f:
            module: f.py
            trigger: {subject: "${PREFIX}.in"}
            config:
              literal: $${HOME}
              both: "${A:-a}-${B:-b}"
              dollars: cost $5
        """,
        {"PREFIX": "orders", "B": "x"},
    )
    spec = manifest.functions["f"]
    assert spec.trigger.subject == "orders.in"
    assert spec.config == {"literal": "${HOME}", "both": "a-x", "dollars": "cost $5"}


def test_interpolated_plain_scalars_read_as_yaml_quoted_ones_stay_text() -> None:
    manifest = parse(
        """\
        version: 1
        http:
          port: ${PORT:-9000}
        functions:
          f:
            module: f.py
            trigger: {subject: x}
            config:
              rate: "${RATE:-0.5}"
              flag: ${FLAG:-true}
        """
    )
    assert manifest.http is not None and manifest.http.port == 9000
    assert manifest.functions["f"].config == {"rate": "0.5", "flag": True}
    assert parse("version: 1\nhttp: ${HTTP:-false}\n").http is None


def test_malformed_references() -> None:
    assert "is neither ${NAME}" in one_problem("version: 1\nnats:\n  url: ${1BAD}\n")
    assert "unclosed '${'" in one_problem("version: 1\nnats:\n  url: ${OPEN\n")


def test_interpolation_inside_flow_mapping_hints_quoting() -> None:
    found = one_problem("version: 1\nnats: {url: ${NATS_URL:-embedded}}\n")
    assert found.startswith("fn.yaml:2: invalid YAML:")
    assert "quote a value that uses ${VAR}" in found


def test_load_manifest_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fn.yaml").write_text(NATS_URL)
    monkeypatch.setenv("NATS_URL", "nats://env:4222")
    manifest = load_manifest(tmp_path / "fn.yaml")
    assert manifest.nats.url == "nats://env:4222"
    assert manifest.path == (tmp_path / "fn.yaml").resolve()
    assert manifest.root == tmp_path.resolve()
    assert load_manifest(tmp_path / "fn.yaml", environ={}).nats.is_embedded


def test_load_manifest_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "nope.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read the manifest")


# --- defaults -----------------------------------------------------------------------

DEFAULTS = """\
version: 1
streams:
  S: {subjects: [s.>]}
defaults:
  retry: {max_deliver: 3, backoff: [1s, 2s]}
  timeout: 10s
  concurrency: 8
  config: {region: eu, db: {host: h, port: 1}}
functions:
  a:
    module: a.py
    trigger: {stream: S}
    retry: {backoff: [5s]}
    config: {db: {port: 2}}
  b:
    module: b.py
    trigger: {subject: b}
    timeout: 1s
    idempotency: null
"""


def test_defaults_are_deep_merged_function_wins() -> None:
    manifest = parse(DEFAULTS)
    a, b = manifest.functions["a"], manifest.functions["b"]
    assert a.retry == RetryPolicy(max_deliver=3, backoff=[5.0])
    assert a.config == {"region": "eu", "db": {"host": "h", "port": 2}}
    assert (a.timeout, a.concurrency) == (10.0, 8)
    assert (b.timeout, b.concurrency, b.idempotency) == (1.0, 8, None)
    assert b.retry.backoff == [1.0, 2.0]
    assert "defaults" not in Manifest.model_fields


def test_merged_keys_answer_with_their_line_in_defaults() -> None:
    manifest = parse(DEFAULTS)
    assert manifest.line_of("functions.a.timeout") == 6
    assert manifest.line_of("functions.a.retry.max_deliver") == 5
    assert manifest.line_of("functions.a.retry.backoff") == 13
    assert manifest.line_of("functions.b.module") == 16
    assert manifest.line_of("functions.b.handler") == 15  # absent: the function's line


def test_error_in_defaults_is_reported_once_at_its_line() -> None:
    text = DEFAULTS.replace("timeout: 10s", "timeout: soon").replace("concurrency", "concurency")
    assert problems(text) == [
        "fn.yaml:6:defaults.timeout: invalid duration 'soon'; use a number and a unit"
        " (ms, s, m, h, d), like '250ms', '30s', '1m30s' or '7d'",
        "fn.yaml:7:defaults.concurency: unknown key 'concurency'; did you mean 'concurrency'?"
        " (expected one of: retry, timeout, concurrency, ack, progress_pings, idempotency,"
        " dead_letter, output, config, version)",
    ]


def test_defaults_are_checked_without_functions_and_cannot_hold_a_trigger() -> None:
    text = "version: 1\ndefaults:\n  concurrency: 0\n  trigger: {subject: x}\n"
    assert problems(text) == [
        "fn.yaml:3:defaults.concurrency: must be at least 1, got 0",
        "fn.yaml:4:defaults.trigger: 'trigger' has no default: set it on each function",
    ]


def test_cross_field_error_with_a_merged_value_stays_on_the_function() -> None:
    text = DEFAULTS.replace("max_deliver: 3, backoff: [1s, 2s]", "max_deliver: 1, backoff: []")
    text = text.replace("retry: {backoff: [5s]}", "retry: {backoff: [5s, 6s]}")
    assert problems(text) == [
        "fn.yaml:13:functions.a.retry.backoff: 2 steps but max_deliver is 1:"
        " at most one step per delivery"
    ]


# --- the traps ---------------------------------------------------------------------


def test_request_subject_captured_by_a_stream_is_an_error() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {request: orders.create}}\n"
    assert one_problem(text) == (
        "fn.yaml:6:functions.f.trigger.request: stream ORDERS captures 'orders.>':"
        " JetStream would answer requests with a PubAck, not this function's reply"
    )


def test_request_wildcard_overlapping_a_stream_is_an_error() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {request: '*.create'}}\n"
    assert "stream ORDERS captures 'orders.>'" in one_problem(text)


def test_subject_trigger_on_a_stream_subject_is_fine() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {subject: orders.created}}\n"
    assert parse(text).functions["f"].trigger.kind == "subject"


def test_two_functions_on_one_durable() -> None:
    text = STREAMS + textwrap.dedent(
        """\
        functions:
          a: {module: a.py, trigger: {stream: ORDERS, durable: shared}}
          b: {module: b.py, trigger: {stream: ORDERS, durable: shared}}
          c: {module: c.py, trigger: {stream: ORDERS}}
          d: {module: d.py, trigger: {stream: DLQ, durable: shared}}
        """
    )
    assert one_problem(text) == (
        "fn.yaml:7:functions.b.trigger.durable: durable 'shared' on stream ORDERS is function"
        " 'a''s too: the two would split its messages"
    )


def test_default_durables_are_the_function_names() -> None:
    text = STREAMS + "functions:\n  a: {module: a.py, trigger: {stream: ORDERS}}\n"
    trigger = parse(text + "  b: {module: b.py, trigger: {stream: ORDERS}}\n").functions
    assert [spec.trigger.durable_name for spec in trigger.values()] == ["a", "b"]


def test_undeclared_stream_suggests_the_close_one() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {stream: ORDER}}\n"
    assert one_problem(text) == (
        "fn.yaml:6:functions.f.trigger.stream: stream 'ORDER' is not declared under streams:;"
        " did you mean 'ORDERS'?"
    )


def test_filter_subject_outside_the_stream() -> None:
    text = STREAMS + textwrap.dedent(
        """\
        functions:
          f:
            module: f.py
            trigger:
              stream: ORDERS
              subjects: [orders.created.v1, order.created.v1, orders.*.v2]
        """
    )
    assert one_problem(text) == (
        "fn.yaml:10:functions.f.trigger.subjects.1: 'order.created.v1' is outside stream"
        " ORDERS's subjects ['orders.>']: it would never match"
    )


def test_dead_letter_must_be_captured_by_a_stream() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {stream: ORDERS}, dead_letter: "
    assert parse(text + "dlq.f}\n").functions["f"].dead_letter == "dlq.f"
    assert one_problem(text + "dead.f}\n") == (
        "fn.yaml:6:functions.f.dead_letter: no declared stream captures 'dead.f':"
        " a dead letter must persist (add a stream, e.g. DLQ: {subjects: [dlq.>]})"
    )
    assert "must be concrete" in one_problem(text + "'dlq.*'}\n")


def test_dead_letter_into_the_consumed_subjects_would_loop() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {stream: ORDERS}, "
    assert "dead letters would loop" in one_problem(text + "dead_letter: orders.dead}\n")
    filtered = "functions:\n  f: {module: f.py, trigger: {stream: ORDERS, subjects: [orders.x]}, "
    assert parse(STREAMS + filtered + "dead_letter: orders.dead}\n")


def test_output_subject_may_be_anywhere() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, trigger: {subject: x}, output: "
    assert parse(text + "not.a.stream}\n").functions["f"].output == "not.a.stream"
    assert parse(text + "orders.done}\n").functions["f"].output == "orders.done"


def test_timeout_at_or_above_ack_wait_needs_progress_pings() -> None:
    text = STREAMS + textwrap.dedent(
        """\
        functions:
          f:
            module: f.py
            trigger: {stream: ORDERS, ack_wait: 30s}
            timeout: 30s
        """
    )
    assert parse(text).functions["f"].progress_pings
    assert one_problem(text + "    progress_pings: false\n") == (
        "fn.yaml:9:functions.f.timeout: 30s is not below ack_wait 30s and progress_pings is off:"
        " the server would redeliver the message while the handler still runs"
    )


def test_max_ack_pending_below_concurrency() -> None:
    text = STREAMS + "functions:\n  f: {module: f.py, concurrency: 8, trigger: "
    assert one_problem(text + "{stream: ORDERS, max_ack_pending: 4}}\n") == (
        "fn.yaml:6:functions.f.trigger.max_ack_pending: 4 is below concurrency 8:"
        " workers would sit idle"
    )
    spec = parse(text + "{stream: ORDERS}}\n").functions["f"]
    assert spec.trigger.effective_max_ack_pending(spec.concurrency) == 16
    assert spec.trigger.effective_batch(spec.concurrency) == 8
    assert spec.trigger.effective_batch(1000) == 256


def test_streams_with_overlapping_subjects() -> None:
    text = STREAMS + "  MORE: {subjects: [payments.>, orders.created]}\n"
    assert one_problem(text) == (
        "fn.yaml:5:streams.MORE.subjects.1: overlaps 'orders.>' of stream ORDERS:"
        " JetStream refuses two streams that could store the same subject"
    )
    assert "overlaps 'a.>'" in one_problem("version: 1\nstreams:\n  S: {subjects: [a.>, a.b]}\n")
    assert "every subject" in one_problem("version: 1\nstreams:\n  S: {subjects: ['>']}\n")


def test_registry_needs_trusted_keys_and_public_ones() -> None:
    assert one_problem("version: 1\nregistry: {enabled: true}\n") == (
        "fn.yaml:2:registry.trusted_keys: an enabled registry needs trusted_keys (fnhost keygen)"
    )
    public = "U" + "A" * 55
    seed = "SU" + "A" * 56
    text = (
        f"version: 1\nregistry:\n  enabled: true\n  trusted_keys:\n    - {public}\n    - {seed}\n"
    )
    assert one_problem(text) == (
        "fn.yaml:6:registry.trusted_keys.1: this is a secret seed: list its public key"
    )
    registry = parse(text.replace(f"    - {seed}\n", "")).registry
    assert registry.enabled and registry.trusted_keys == [public]
    assert registry.max_artifact_size == 8 * 1024**2


def test_idempotency_store_and_url() -> None:
    text = "version: 1\nfunctions:\n  f:\n    module: f.py\n    trigger: {subject: x}\n"
    assert one_problem(text + "    idempotency: {store: redis}\n") == (
        "fn.yaml:6:functions.f.idempotency.url: store redis needs a url (its DSN)"
    )
    assert "only for redis and postgres" in one_problem(
        text + "    idempotency: {store: kv, url: 'redis://x'}\n"
    )
    assert "invalid key 'header:'" in one_problem(text + "    idempotency: {key: 'header:'}\n")
    for key in ("auto", "header:Nats-Msg-Id", "myapp.keys:order_key"):
        spec = parse(text + f"    idempotency: {{store: postgres, url: 'pg://x', key: '{key}'}}\n")
        assert spec.functions["f"].idempotency is not None
    idempotency = parse(text + "    idempotency: {}\n").functions["f"].idempotency
    assert idempotency is not None
    assert (idempotency.store, idempotency.ttl, idempotency.bucket) == (
        "kv",
        86400.0,
        "fnhost_idempotency",
    )


def test_short_duplicate_window_is_a_warning_not_an_error() -> None:
    manifest = parse(
        """\
        version: 1
        streams:
          IN: {subjects: [in.>]}
          OUT: {subjects: [out.>], duplicate_window: 5m}
        functions:
          f:
            module: f.py
            trigger: {stream: IN}
            output: out.done
        """
    )
    assert [str(w) for w in manifest.warnings] == [
        "fn.yaml:3:streams.IN.duplicate_window: 2m is shorter than the redelivery horizon of"
        " function 'f' (3m6s, backoff + timeout): a publish repeated by a late retry would not"
        " be de-duplicated"
    ]


def test_the_redelivery_horizon_and_delays() -> None:
    retry = RetryPolicy()
    assert (retry.max_deliver, retry.backoff) == (5, [1.0, 5.0, 30.0, 120.0])
    assert [retry.delay_for(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 5, 30, 120, 120, 120]
    assert retry.horizon(timeout=30) == 186.0
    assert RetryPolicy(max_deliver=4, backoff=[2]).horizon(timeout=1) == 7.0
    assert RetryPolicy(max_deliver=1, backoff=[]).delay_for(1) == 0.0


# --- triggers -----------------------------------------------------------------------

FUNCTION = "version: 1\nfunctions:\n  f:\n    module: f.py\n    trigger: "


def test_trigger_needs_exactly_one_kind() -> None:
    assert one_problem(FUNCTION + "{queue: q}\n") == (
        "fn.yaml:5:functions.f.trigger: needs exactly one of 'request', 'subject' or 'stream',"
        " got none"
    )
    assert one_problem(FUNCTION + "{request: a, stream: S}\n") == (
        "fn.yaml:5:functions.f.trigger: needs exactly one of 'request', 'subject' or 'stream',"
        " got 'request' and 'stream'"
    )


def test_queue_absent_null_and_set() -> None:
    absent = parse(FUNCTION + "{subject: x}\n").functions["f"].trigger
    broadcast = parse(FUNCTION + "{subject: x, queue: null}\n").functions["f"].trigger
    named = parse(FUNCTION + "{request: x, queue: workers}\n").functions["f"].trigger
    assert (absent.queue_group, broadcast.queue_group, named.queue_group) == ("f", None, "workers")
    assert (absent.kind, named.kind) == ("subject", "request")
    assert absent.durable_name is None


def test_keys_of_another_trigger_kind_are_errors() -> None:
    assert one_problem(FUNCTION + "{request: x, durable: d}\n") == (
        "fn.yaml:5:functions.f.trigger.durable: 'durable' is for stream triggers,"
        " not a request trigger"
    )
    text = "version: 1\nstreams:\n  S: {subjects: [s.>]}\n" + FUNCTION.removeprefix("version: 1\n")
    assert one_problem(text + "{stream: S, queue: q}\n") == (
        "fn.yaml:7:functions.f.trigger.queue: 'queue' is for request/subject triggers,"
        " not a stream trigger"
    )


def test_deliver_start_options() -> None:
    text = "version: 1\nstreams:\n  S: {subjects: [s.>]}\n" + FUNCTION.removeprefix("version: 1\n")
    assert one_problem(text + "{stream: S, deliver: by_start_sequence}\n") == (
        "fn.yaml:7:functions.f.trigger.deliver: deliver: by_start_sequence needs 'start_sequence'"
    )
    assert one_problem(text + "{stream: S, start_sequence: 5}\n") == (
        "fn.yaml:7:functions.f.trigger.start_sequence: 'start_sequence' only applies with"
        " deliver: by_start_sequence"
    )
    spec = parse(text + "{stream: S, deliver: by_start_time, start_time: 2024-05-01 12:00:00}\n")
    assert spec.functions["f"].trigger.start_time == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_a_trigger_outside_a_function_has_no_default_names() -> None:
    spec = FunctionSpec.model_validate(
        {"name": "f", "module": "pkg.mod", "trigger": {"subject": "x"}}
    )
    assert spec.trigger.queue_group == "f"
    assert spec.module_path is None
    with pytest.raises(RuntimeError, match="not part of a FunctionSpec"):
        _ = type(spec.trigger)(subject="x").queue_group


# --- functions and connection ---------------------------------------------------------


def test_module_path_or_dotted_name(tmp_path: Path) -> None:
    text = FUNCTION.replace("f.py", "functions/payment.py") + "{subject: x}\n"
    manifest = parse(
        text + "  g: {module: functions.audit, trigger: {subject: y}}\n", root=tmp_path
    )
    assert manifest.functions["f"].module == "functions/payment.py"
    assert manifest.functions["f"].module_path == tmp_path / "functions/payment.py"
    assert manifest.functions["g"].module_path is None
    assert manifest.functions["f"].handler == "handle"


def test_nats_credentials_paths_resolve_against_the_root(tmp_path: Path) -> None:
    text = "version: 1\nnats:\n  url: tls://a:4222\n  creds: keys/app.creds\n"
    manifest = parse(text + "  tls: {ca: /etc/ca.pem}\n", root=tmp_path)
    assert manifest.nats.creds == str(tmp_path / "keys/app.creds")
    assert manifest.nats.tls is not None and manifest.nats.tls.ca == "/etc/ca.pem"


def test_nats_settings_that_cannot_work() -> None:
    assert one_problem("version: 1\nnats: {url: 'localhost:4222'}\n") == (
        "fn.yaml:2:nats.url: 'localhost:4222' is not 'embedded' or a URL like nats://host:4222"
    )
    assert one_problem("version: 1\nnats: {user: me}\n") == (
        "fn.yaml:2:nats.password: 'user' and 'password' go together"
    )


def test_http_false_turns_it_off_and_port_zero_is_allowed() -> None:
    assert parse("version: 1\nhttp: false\n").http is None
    http = parse("version: 1\nhttp: {port: 0}\n").http
    assert http is not None and (http.host, http.port) == ("127.0.0.1", 0)
    assert parse("version: 1\n").http is not None


def test_empty_sections_are_empty() -> None:
    manifest = parse("version: 1\nstreams:\nfunctions:\nplugins:\n")
    assert (manifest.streams, manifest.functions, manifest.plugins) == ({}, {}, [])


# --- the error format ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            FUNCTION + "{subject: x}\n    concurency: 4\n",
            "fn.yaml:6:functions.f.concurency: unknown key 'concurency'; did you mean"
            " 'concurrency'? (expected one of: module, handler, trigger, retry, timeout,"
            " concurrency, ack, progress_pings, idempotency, dead_letter, output, config, version)",
        ),
        (
            FUNCTION + "{requets: x}\n",
            "fn.yaml:5:functions.f.trigger.requets: unknown key 'requets'; did you mean"
            " 'request'? (expected one of: request, subject, stream, queue, subjects, durable,"
            " ack_wait, max_ack_pending, deliver, start_sequence, start_time, batch)",
        ),
        (
            "version: 1\nfunction:\n  f: {}\n",
            "fn.yaml:2:function: unknown key 'function'; did you mean 'functions'? (expected one"
            " of: version, nats, http, logging, tracing, streams, kv, object_stores, plugins,"
            " registry, functions)",
        ),
        (
            "version: 1\nfunctions:\n  f:\n    trigger: {subject: x}\n",
            "fn.yaml:3:functions.f.module: required key is missing",
        ),
        (
            FUNCTION.replace("f.py", "functions/order") + "{subject: x}\n",
            "fn.yaml:4:functions.f.module: 'functions/order' is neither a path ending in .py"
            " nor a dotted module name",
        ),
        (
            FUNCTION + "{subject: x}\n    timeout: 30 seconds\n",
            "fn.yaml:6:functions.f.timeout: invalid duration '30 seconds'; use a number and a"
            " unit (ms, s, m, h, d), like '250ms', '30s', '1m30s' or '7d'",
        ),
        (
            "version: 1\nstreams:\n  S: {subjects: [s], storage: disk}\n",
            "fn.yaml:3:streams.S.storage: must be 'file' or 'memory', got 'disk'",
        ),
        (
            "version: 1\nstreams:\n  S: {subjects: orders.>}\n",
            "fn.yaml:3:streams.S.subjects: expected a list, got 'orders.>'",
        ),
        (
            "version: 1\nfunctions:\n  payment: functions/payment.py\n",
            "fn.yaml:3:functions.payment: expected a mapping, got 'functions/payment.py'",
        ),
        (
            "version: 1\nstreams:\n  orders.v1: {subjects: [o]}\n",
            "fn.yaml:3:streams.orders.v1: stream name 'orders.v1' may only use letters, digits,"
            " '-' and '_'",
        ),
        (
            FUNCTION + "{subject: x}\n    concurrency: lots\n",
            "fn.yaml:6:functions.f.concurrency: expected a whole number, got 'lots'",
        ),
        (
            "version: 1\nhttp:\n  port: 80\n  port: 81\n",
            "fn.yaml:4:http.port: duplicate key (first at line 3)",
        ),
        ("version: 2\n", "fn.yaml:1:version: unsupported version 2: this fnhost reads version 1"),
        (
            "nats: {}\n",
            "fn.yaml:1:version: required key is missing: begin with 'version: 1'",
        ),
        (
            "version: 1\nlogging: {level: verbose}\n",
            "fn.yaml:2:logging.level: must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL',"
            " got 'VERBOSE'",
        ),
        (
            "version: 1\nfunctions:\n  f:\n\tmodule: f.py\n",
            "fn.yaml:4: invalid YAML: found character '\\t' that cannot start any token, while"
            " scanning for the next token (indent with spaces, not tabs)",
        ),
        (
            "version: 1\nstreams:\n  S: {subjects: [s]\n",
            "fn.yaml:4: invalid YAML: expected ',' or '}', but got '<stream end>', while parsing"
            " a flow mapping",
        ),
        ("", "fn.yaml: expected a mapping that starts with 'version: 1', got an empty file"),
    ],
)
def test_each_newcomer_mistake_is_one_clear_line(text: str, expected: str) -> None:
    assert one_problem(text) == expected


def test_all_problems_are_reported_at_once_in_file_order() -> None:
    found = problems(
        """\
        version: 1
        http: {port: -1}
        streams:
          S: {subjects: [s.>], replicas: 9}
        functions:
          a: {module: a.py, trigger: {stream: T}}
          b: {module: b.py, trigger: {subject: x}, ack: maybe}
        """
    )
    assert [issue.split(": ")[0] for issue in found] == [
        "fn.yaml:2:http.port",
        "fn.yaml:4:streams.S.replicas",
        "fn.yaml:6:functions.a.trigger.stream",
        "fn.yaml:7:functions.b.ack",
    ]
    assert all(re.fullmatch(r"fn\.yaml:\d+:[\w.-]+: \S.*", issue) for issue in found)


def test_yaml_anchors_and_merge_keys() -> None:
    manifest = parse(
        """\
        version: 1
        functions:
          a: &base {module: a.py, trigger: {subject: a}, timeout: 5s}
          b:
            <<: *base
            trigger: {subject: b}
        """
    )
    assert manifest.functions["b"].timeout == 5.0
    assert manifest.functions["b"].trigger.subject == "b"


# --- whole manifests -------------------------------------------------------------------

DESIGN_EXAMPLE = """\
version: 1
nats:
  url: ${NATS_URL:-embedded}
http: {host: 127.0.0.1, port: 8080}
streams:
  ORDERS: {subjects: ["orders.created.>"], storage: file, replicas: 1, max_age: 7d, duplicate_window: 2m}
  PAYMENTS: {subjects: ["payments.>"]}
  DLQ:    {subjects: ["dlq.>"]}
kv: {}
object_stores: {}
plugins: []
defaults:
  retry: {max_deliver: 5, backoff: [1s, 5s, 10s]}
  timeout: 30s
  concurrency: 16
functions:
  create-order:
    module: functions/order.py
    handler: create_order
    trigger: {request: orders.create}
  payment:
    module: functions/payment.py
    trigger: {stream: ORDERS, subjects: [orders.created.v1], durable: payment}
    idempotency: {store: kv, ttl: 24h}
    dead_letter: dlq.payment
    output: payments.completed.v1
    config: {gateway: simulated}
  notify:
    module: functions/notify.py
    trigger: {subject: "payments.completed.v1", queue: null}
"""  # noqa: E501 - the line is DESIGN.md's


def test_the_design_example_parses(tmp_path: Path) -> None:
    manifest = parse(DESIGN_EXAMPLE, root=tmp_path)
    assert manifest.warnings == []
    assert list(manifest.functions) == ["create-order", "payment", "notify"]
    order, payment, notify = manifest.functions.values()
    assert (order.trigger.kind, order.trigger.queue_group, order.handler) == (
        "request",
        "create-order",
        "create_order",
    )
    assert (payment.trigger.durable_name, payment.concurrency, payment.retry.backoff) == (
        "payment",
        16,
        [1.0, 5.0, 10.0],
    )
    assert payment.idempotency is not None and payment.idempotency.ttl == 86400
    assert notify.trigger.queue_group is None
    assert manifest.stream_for_subject("orders.created.v1") == "ORDERS"
    assert manifest.stream_for_subject("payments.completed.v1") == "PAYMENTS"
    assert manifest.stream_for_subject("orders.create") is None
    assert manifest.subject_index.stream_for("dlq.payment") == "DLQ"
    assert manifest.line_of("functions.payment.dead_letter") == 25
    assert manifest.line_of("functions.payment.timeout") == 14
    assert manifest.path == tmp_path / "fn.yaml"
    assert manifest.nats.is_embedded and manifest.http is not None


def test_the_repository_manifest_loads() -> None:
    manifest = load_manifest(REPO / "fn.yaml", environ={})
    assert manifest.functions


def test_settings_that_mean_nothing_for_the_trigger_kind_are_errors() -> None:
    text = """\
version: 1
streams:
  DLQ: {subjects: ["dlq.>"]}
functions:
  rpc:
    module: f.py
    trigger: {request: a.b}
    idempotency: {store: memory}
  fanout:
    module: f.py
    trigger: {subject: c.d}
    dead_letter: dlq.fanout
"""
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text)
    messages = [str(issue) for issue in caught.value.issues]
    assert len(messages) == 2
    assert messages[0].startswith("fn.yaml:8:functions.rpc.idempotency: is for stream and subject")
    assert messages[1].startswith("fn.yaml:12:functions.fanout.dead_letter: only stream triggers")
