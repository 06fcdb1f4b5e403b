"""The checked JSON header of a file autopatch writes beside its arrays: gates, screens, choice gates, state maps.

Example:
    >>> header = read_header(folder / "map.json", fmt="autopatch-state-map", versions=(1,), what="state map",
    ...                      redo="fit it again with `python -m eval.fit_state_map`", error=ConfigError)
    >>> header["arrays_sha256"]

One reading for every such file: a plain file (a symbolic link is refused), a JSON object, of the expected
``format``, in a version this autopatch reads. Each refusal is ``error`` naming the file and saying what to do;
the caller checks its own fields and checksums after.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = ["read_header"]


def read_header(path: Path, *, fmt: str, versions: Collection[int], what: str, redo: str,
                error: type[Exception]) -> dict[str, Any]:
    """The header at ``path`` (see the module docstring); ``what`` names the kind of file ("gate"), ``redo`` says
    how to make a new one ("retrain it with `autopatch train-gate`")."""
    if path.is_symlink():
        raise error(f"{path} is a symbolic link; {what}s are read from plain files only.")
    try:
        header = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
        raise error(f"Cannot read the {what} in {path.parent}: {err}. Expected {path.name} as written by autopatch; "
                    f"{redo}.") from err
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise error(f"{path} is not an autopatch {what} file.")
    version = header.get("version")
    if isinstance(version, bool) or version not in versions:
        readable = ", ".join(str(v) for v in sorted(versions))
        raise error(f"{what.capitalize()} format version {version} is not supported (this autopatch reads version "
                    f"{readable}); {redo}.")
    return header
