"""The named datasets of ``autopatch eval --dataset NAME``: one registry, each dataset registered by its own module.

Example:
    >>> from eval.dataset_registry import DatasetSpec, datasets, register_dataset
    >>> sorted(datasets())
    ['handwritten', 'harm', 'musique', 'twohop']
    >>> register_dataset(DatasetSpec("mine", "my questions", lambda split, hops: ...))   # a plug-in

:func:`datasets` imports the modules that register the bundled ones (:data:`PLUGIN_MODULES`) the first time it
is asked, so :mod:`eval.datasets` never imports a dataset module and no module imports it back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopatch.registry import Registry

if TYPE_CHECKING:
    from eval.datasets import Selection
    from eval.records import QARecord

__all__ = ["DATASETS", "PLUGIN_MODULES", "DatasetSpec", "datasets", "register_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: ``select(split, hops)`` returns its records and a :class:`~eval.datasets.Selection`."""

    name: str
    description: str  # a few words for the unknown-dataset error's list
    select: Callable[[str | None, int | None], tuple[list[QARecord], Selection]]
    default_split: str | None = "test"  # what ``autopatch eval`` evaluates when --split is not given
    default_hops: int = 2  # likewise for --hops (0: every record)


DATASETS: Registry[DatasetSpec] = Registry("Dataset")
register_dataset = DATASETS.add
PLUGIN_MODULES = ("eval.twohop", "eval.datasets", "eval.realtraffic")  # the modules that register the bundled ones


def datasets() -> Registry[DatasetSpec]:
    """Every registered dataset, the bundled ones included."""
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    return DATASETS
