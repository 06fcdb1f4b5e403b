"""Results files that cannot be silently wrong: a checksum per line, a strict reader, a writer's lock.

Example:
    >>> from eval.integrity import seal, read_checked, writer_lock
    >>> line = json.dumps(seal(row))                      # the row plus "sha256" of its content
    >>> rows = read_checked(path)                        # ResultsFileError naming the line if one is wrong
    >>> with writer_lock(path):                          # a second writer of this file is refused at once
    ...     append(...)

What is refused, naming the file and the line: a line that is not JSON (except
a torn *last* line, which a kill mid-write leaves and the writer drops), a line
that is not an object or lacks ``method``/``id``, and a line whose content no
longer matches its ``sha256`` (an edited score). Lines written before checksums
existed (no ``sha256``) are read as they are. ``repair(path)`` keeps the valid
lines, moves the file aside as ``<name>.bak`` and rewrites it, so the missing
results are recomputed on resume (``autopatch eval --repair``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from autopatch.errors import AutopatchError

REQUIRED = ("method", "id")


class ResultsFileError(AutopatchError, ValueError):
    """A results line is damaged or edited; the message names the file, the line and the fix."""


class RunDirLocked(AutopatchError, RuntimeError):
    """Another process is writing this results file."""


class ResultsFileReplaced(AutopatchError, RuntimeError):
    """The results file was replaced while this run wrote to it (a git checkout or stash, a copy over it)."""


def check_same_file(sink: IO[str], path: Path) -> None:
    """Raise :class:`ResultsFileReplaced` when ``path`` is no longer the file ``sink`` writes: lines written from
    then on would go to a file nobody can read, so the run stops and the same command resumes it."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    mine = os.fstat(sink.fileno())
    if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
        raise ResultsFileReplaced(f"{path} was replaced or removed while this run wrote to it (a git checkout, stash "
                                  "or copy over a running run?); stopped so that no line is lost. Run the same command "
                                  "again: it resumes from the lines in the file now.")


def _digest(row: dict) -> str:
    body = {k: v for k, v in row.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def seal(row: dict) -> dict:
    """``row`` with ``sha256``: the first 16 hex digits of the SHA-256 of its other fields (sorted JSON)."""
    return {**row, "sha256": _digest(row)}


def _problems(path: Path) -> Iterator[tuple[int, str, dict | None]]:
    """``(line number, problem or "", row)`` for every non-blank line; a torn last line is not a problem."""
    lines = path.read_bytes().split(b"\n")
    torn_last = bool(lines) and lines[-1] != b""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            if torn_last and number == len(lines):
                continue  # cut by a kill mid-write; the writer drops it before appending
            yield number, "not valid JSON", None
            continue
        if not isinstance(row, dict) or any(k not in row for k in REQUIRED):
            yield number, f"not a result (an object with {' and '.join(REQUIRED)})", None
        elif "sha256" in row and row["sha256"] != _digest(row):
            yield number, "its content does not match its sha256 (edited or corrupted)", None
        else:
            yield number, "", row


def read_checked(path: Path) -> list[dict]:
    """Every result of ``path`` (none if it does not exist); a damaged line raises :class:`ResultsFileError`."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, problem, row in _problems(path):
        if problem:
            raise ResultsFileError(f"{path} line {number}: {problem}. Re-run with --repair to set the bad lines "
                                   f"aside (into {path.name}.bak) and recompute them, or restore the file.")
        if row is not None:
            rows.append(row)
    return rows


def repair(path: Path) -> list[int]:
    """Keep the valid lines of ``path`` (the original goes to ``<name>.bak``); return the dropped line numbers."""
    path = Path(path)
    if not path.exists():
        return []
    kept, dropped = [], []
    for number, problem, row in _problems(path):
        if problem:
            dropped.append(number)
        else:
            kept.append(json.dumps(row) + "\n")
    if dropped:
        backup = path.with_name(path.name + ".bak")
        os.replace(path, backup)
        path.write_text("".join(kept))
    return dropped


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``<path>.lock`` for as long as the block runs (POSIX ``flock``)."""
    import fcntl

    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(f"{path} is being written by another process (lock {lock_path}); wait for it to "
                               "finish, or use another --out directory.") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
