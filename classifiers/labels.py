"""Gate labels from sweep results: does patching help this question?

Example:
    >>> from classifiers.labels import gate_labels
    >>> table = load_sweep(Path("runs/gate/labels_twohop_train.jsonl"))
    >>> labels = gate_labels(table, SweepConfig.of(profile))       # {id: Label}

Definition (per question and patch configuration, by exact match):

* **helps** (label 1): vanilla wrong, patched right;
* **hurts** (label 0): vanilla right, patched wrong;
* **neutral** (label 0): both right or both wrong.

Weights: helps and hurts weigh 1, neutral cases 0.5. Neutral questions carry
no accuracy consequence either way; at full weight the large both-wrong
majority would drown the rare helpful cases, and at zero weight the gate would
never learn that most questions need no patch. Unlocated questions are never
patched and get no label.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from autopatch.errors import ConfigError
from eval.sweep import RowKey, SweepTable, row_key_text

NEUTRAL_WEIGHT = 0.5


@dataclass(frozen=True)
class Label:
    """One question's outcome under vanilla and under the patch."""

    vanilla: float
    patched: float

    @property
    def helps(self) -> bool:
        return self.patched > self.vanilla

    @property
    def hurts(self) -> bool:
        return self.patched < self.vanilla

    @property
    def target(self) -> int:
        return int(self.helps)

    @property
    def weight(self) -> float:
        return 1.0 if self.helps or self.hurts else NEUTRAL_WEIGHT


def _score(row: object, metric: str, key: RowKey, question_id: str) -> float:
    value = row.get(metric) if isinstance(row, Mapping) else None
    if not isinstance(value, Real):
        raise ConfigError(f"The sweep row of question {question_id!r} under {row_key_text(key)!r} has no numeric {metric!r} "
                          f"(got {value!r}); label with a metric the sweep recorded, or re-run the sweep.")
    return float(value)


def gate_labels(table: SweepTable, key: RowKey, metric: str = "em") -> dict[str, Label]:
    """Labels for every question that has both a vanilla row and a row for ``key`` (a configuration, as a rule).

    Raises :class:`~autopatch.errors.ConfigError` when such a row lacks a numeric ``metric``.
    """
    vanilla, patched = table.get("vanilla", {}), table.get(key, {})
    return {i: Label(_score(vanilla[i], metric, "vanilla", i), _score(patched[i], metric, key, i))
            for i in vanilla if i in patched}


def seed_labels(label_file: Path, config_key: str, sweep_rows: Iterable[Mapping], *, alias: str | None = None) -> int:
    """Write the ``vanilla`` and ``config_key`` rows of a finished sweep into a gate's label file; returns how many.

    The gate's labelling sweep then skips those (question, configuration) pairs instead of generating them again.
    ``alias`` is the sweep's name for the same computation when it differs (the study's text-only ``decompose``
    reference row is the ``decompose`` strategy whatever its layers, since no state is patched). A label file that
    already exists is left as it is, so seeding never overrides what was computed for the gate itself.
    """
    if label_file.exists():
        return 0
    wanted = {"vanilla": "vanilla", alias or config_key: config_key}
    rows = [{**row, "config": wanted[row["config"]]} for row in sweep_rows if row.get("config") in wanted]
    label_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = label_file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(label_file)
    return len(rows)
