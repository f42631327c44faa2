"""NATS subject wildcards: matching, overlap and coverage, and a subject -> stream index.

Subjects are dot-separated tokens. In a pattern ``*`` matches exactly one token
and ``>`` (last token only) matches one or more trailing tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "SubjectIndex",
    "subject_covers",
    "subject_matches",
    "subject_problem",
    "subjects_overlap",
]


def subject_problem(subject: str, *, wildcards: bool = True) -> str | None:
    """Say what is wrong with ``subject`` as NATS would see it, or return None if it is valid.

    With ``wildcards=False`` the subject must be concrete (something to publish to).
    """
    if not subject:
        return "a subject cannot be empty"
    if any(char.isspace() for char in subject):
        return f"subject {subject!r} contains whitespace"
    tokens = subject.split(".")
    if "" in tokens:
        return f"subject {subject!r} has an empty token (a leading, trailing or double '.')"
    for position, token in enumerate(tokens):
        is_wildcard = token in ("*", ">")
        if is_wildcard and not wildcards:
            return f"subject {subject!r} must be concrete: wildcards cannot be published to"
        if not is_wildcard and ("*" in token or ">" in token):
            return f"subject {subject!r}: '*' and '>' must be whole tokens, as in 'a.*.c'"
        if token == ">" and position != len(tokens) - 1:
            return f"subject {subject!r}: '>' is only allowed as the last token"
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """True if the concrete ``subject`` matches ``pattern``."""
    return _matches(pattern.split("."), subject.split("."))


def subjects_overlap(a: str, b: str) -> bool:
    """True if some concrete subject would match both patterns ``a`` and ``b``."""
    tokens_a, tokens_b = a.split("."), b.split(".")
    for token_a, token_b in zip(tokens_a, tokens_b, strict=False):
        if token_a == ">" or token_b == ">":
            return True
        if token_a != token_b and "*" not in (token_a, token_b):
            return False
    return len(tokens_a) == len(tokens_b)


def subject_covers(pattern: str, other: str) -> bool:
    """True if every subject that matches ``other`` also matches ``pattern``."""
    outer, inner = pattern.split("."), other.split(".")
    for position, token in enumerate(outer):
        if position >= len(inner):
            return False
        if token == ">":
            return True
        if inner[position] == ">" or (token != "*" and token != inner[position]):
            return False
    return len(outer) == len(inner)


def _matches(pattern: list[str], subject: list[str]) -> bool:
    for position, token in enumerate(pattern):
        if token == ">":
            return len(subject) > position
        if position >= len(subject) or (token != "*" and token != subject[position]):
            return False
    return len(pattern) == len(subject)


class SubjectIndex:
    """Answers "which stream stores this subject?" for the streams of a manifest.

    ``stream_for`` is on the per-publish path, so answers are cached. The cache is
    cleared when it reaches ``cache_size`` entries, because published subjects
    often carry ids and their number is unbounded.
    """

    def __init__(self, streams: Mapping[str, Iterable[str]], *, cache_size: int = 4096) -> None:
        self._literal: dict[str, str] = {}
        self._wildcard: list[tuple[list[str], str]] = []
        for stream, patterns in streams.items():
            for pattern in patterns:
                tokens = pattern.split(".")
                if "*" in tokens or ">" in tokens:
                    self._wildcard.append((tokens, stream))
                else:
                    self._literal.setdefault(pattern, stream)
        self._cache: dict[str, str | None] = {}
        self._cache_size = cache_size

    def stream_for(self, subject: str) -> str | None:
        """The stream whose subjects capture the concrete ``subject``, or None."""
        try:
            return self._cache[subject]
        except KeyError:
            pass
        stream = self._literal.get(subject)
        if stream is None:
            tokens = subject.split(".")
            stream = next(
                (name for pattern, name in self._wildcard if _matches(pattern, tokens)), None
            )
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[subject] = stream
        return stream
