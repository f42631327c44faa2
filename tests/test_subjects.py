"""NATS subject wildcards: match, overlap, cover, validity, and the stream index."""

from __future__ import annotations

import pytest

from fnhost.subjects import (
    SubjectIndex,
    subject_covers,
    subject_matches,
    subject_problem,
    subjects_overlap,
)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.created.v1", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.created.v1", False),
        ("orders.*.v1", "orders.created.v1", True),
        ("orders.*.v1", "orders.created.v2", False),
        ("orders.>", "orders.created", True),
        ("orders.>", "orders.created.v1", True),
        ("orders.>", "orders", False),
        (">", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("*.*", "one", False),
        ("a.b", "a", False),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.deleted", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "*.created", True),
        ("orders.*", "orders.created.v1", False),
        ("orders.>", "orders.created.v1", True),
        ("orders.>", "orders", False),
        ("orders.>", "*.created", True),
        ("orders.>", "payments.>", False),
        ("*.*", "a.>", True),
        ("*", "a.>", False),
        (">", "a", True),
        ("a.*.c", "a.b.*", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_subjects_overlap_is_symmetric(a: str, b: str, expected: bool) -> None:
    assert subjects_overlap(a, b) is expected
    assert subjects_overlap(b, a) is expected


@pytest.mark.parametrize(
    ("pattern", "other", "expected"),
    [
        ("orders.>", "orders.created.v1", True),
        ("orders.>", "orders.*", True),
        ("orders.>", "orders.>", True),
        ("orders.>", "orders", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.>", False),
        ("orders.*.v1", "orders.*.v1", True),
        ("orders.created", "orders.*", False),
        ("orders.created.>", "orders.>", False),
        ("*.created", "orders.created", True),
        (">", "a.b.c", True),
    ],
)
def test_subject_covers(pattern: str, other: str, expected: bool) -> None:
    assert subject_covers(pattern, other) is expected


@pytest.mark.parametrize(
    ("subject", "wildcards", "fragment"),
    [
        ("orders.created", True, None),
        ("orders.*.v1", True, None),
        ("orders.>", True, None),
        ("", True, "empty"),
        ("orders..created", True, "empty token"),
        (".orders", True, "empty token"),
        ("orders.", True, "empty token"),
        ("orders created", True, "whitespace"),
        ("orders.>.v1", True, "last token"),
        ("orders.*created", True, "whole tokens"),
        ("dlq.*", False, "concrete"),
        ("dlq.payment", False, None),
    ],
)
def test_subject_problem(subject: str, wildcards: bool, fragment: str | None) -> None:
    problem = subject_problem(subject, wildcards=wildcards)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


def test_index_finds_the_stream_of_a_subject() -> None:
    index = SubjectIndex({"ORDERS": ["orders.created.>"], "DLQ": ["dlq.>"], "ONE": ["one"]})
    assert index.stream_for("orders.created.v1") == "ORDERS"
    assert index.stream_for("dlq.payment") == "DLQ"
    assert index.stream_for("one") == "ONE"
    assert index.stream_for("orders.created") is None
    assert index.stream_for("payments.completed") is None


def test_index_cache_answers_again_after_it_was_cleared() -> None:
    index = SubjectIndex({"S": ["s.*"]}, cache_size=2)
    answers = [index.stream_for(f"s.{i}") for i in range(5)] + [index.stream_for("t.0")]
    assert answers == ["S"] * 5 + [None]
    assert index.stream_for("s.0") == "S"
