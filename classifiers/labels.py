"""Gate labels from sweep results: does patching help this question?

Example:
    >>> from classifiers.labels import gate_labels
    >>> table = load_sweep(Path("runs/gate/labels_twohop_train.jsonl"))
    >>> labels = gate_labels(table, profile_key)       # {id: Label}

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

from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

from autopatch.errors import ConfigError

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


def _score(row: object, metric: str, config_key: str, question_id: str) -> float:
    value = row.get(metric) if isinstance(row, Mapping) else None
    if not isinstance(value, Real):
        raise ConfigError(f"The sweep row of question {question_id!r} under {config_key!r} has no numeric {metric!r} "
                          f"(got {value!r}); label with a metric the sweep recorded, or re-run the sweep.")
    return float(value)


def gate_labels(table: dict[str, dict[str, dict]], config_key: str, metric: str = "em") -> dict[str, Label]:
    """Labels for every question that has both a vanilla row and a row for ``config_key``.

    Raises :class:`~autopatch.errors.ConfigError` when such a row lacks a numeric ``metric``.
    """
    vanilla, patched = table.get("vanilla", {}), table.get(config_key, {})
    return {i: Label(_score(vanilla[i], metric, "vanilla", i), _score(patched[i], metric, config_key, i))
            for i in vanilla if i in patched}
