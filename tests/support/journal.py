"""A journal file that handlers in host processes append to: one event per line.

Lines are short and written with ``O_APPEND`` in one ``write``, so lines from
several processes and threads never interleave. Handlers import nothing from
here (they run in the host process); they write ``EVENT ITEM ATTEMPT PID``
lines themselves, see ``JOURNAL_HELPER``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

JOURNAL_HELPER = """
import os


def note(path, *fields):
    line = (" ".join(str(field) for field in fields) + "\\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
"""
"""Source of a ``note(path, *fields)`` function for handler modules."""


@dataclass(frozen=True)
class Entry:
    event: str
    item: str
    attempt: int
    pid: int


class Journal:
    """Reads the journal a handler writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[Entry]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            event, item, attempt, pid = line.split()
            rows.append(Entry(event, item, int(attempt), int(pid)))
        return rows

    def items(self, event: str, pid: int | None = None) -> Counter[str]:
        """How often each item logged ``event`` (in process ``pid`` only, if given)."""
        return Counter(
            e.item for e in self.entries() if e.event == event and (pid is None or e.pid == pid)
        )

    def count(self, event: str) -> int:
        return sum(e.event == event for e in self.entries())
