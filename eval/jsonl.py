"""Append-only JSONL files that survive being killed mid-write.

Example:
    >>> from eval.jsonl import iter_rows, repair_tail
    >>> repair_tail(path)                 # before appending: drop a line cut by a kill
    >>> done = {(r["method"], r["id"]) for r in iter_rows(path)}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_rows(path: Path) -> Iterator[dict]:
    """Every complete JSON line of ``path`` (none if it does not exist); a torn line is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def repair_tail(path: Path) -> None:
    """Drop a partial last line left by a kill mid-write, so appends start on a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
