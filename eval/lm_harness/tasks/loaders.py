"""Datasets and scoring of the ``autopatch_*`` lm-eval tasks: the bundled sets, read offline.

lm-eval imports this file by path (``!function loaders.twohop`` in a task's YAML). Each loader returns the set's
test split in :func:`eval.sweep.stratified_order`, so lm-eval's ``--limit N`` takes the N questions that
``autopatch eval --limit N`` takes. ``request`` is what the model is sent: the question, or a chat request as
JSON ``{"messages": [...]}`` (read back by :mod:`eval.lm_harness.model`). Scoring is ``autopatch eval``'s
(:func:`eval.metrics.score_continuation`: the answer line, SQuAD normalisation, the answer and its aliases).
"""

from __future__ import annotations

import json
import math
from typing import Any


def _test_split(name: str, hops: int | None):
    from datasets import Dataset, DatasetDict

    from eval.datasets import select_records
    from eval.sweep import stratified_order

    records, _ = select_records(name, split="test", hops=hops)
    rows = [{"id": r.id, "question": r.question, "answer": r.answer, "golds": list(r.golds),
             "answerable": r.answerable,
             "request": json.dumps({"messages": [dict(m) for m in r.messages]}) if r.messages else r.question}
            for r in stratified_order(records)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def twohop(**_: Any):
    return _test_split("twohop", 2)


def handwritten(**_: Any):
    return _test_split("handwritten", 2)


def musique(**_: Any):
    return _test_split("musique", 2)


def harm(**_: Any):
    return _test_split("harm", None)  # every hop count: the chat requests and the single-hop questions


def process_results(doc: dict, results: list[str]) -> dict[str, float | None]:
    """Exact match, F1 and contains of the generation; ``None`` for a request with no gold answer (an
    instruction of the do-no-harm set), which :func:`mean_of_scored` leaves out."""
    from eval.metrics import score_continuation

    if not doc["answerable"] or not doc["golds"]:
        return {"exact_match": None, "f1": None, "contains": None}
    scores = score_continuation(results[0], doc["golds"])
    return {"exact_match": float(scores["em"]), "f1": float(scores["f1"]), "contains": float(scores["contains"])}


def mean_of_scored(values: list[float | None]) -> float:
    """The mean over the requests that have a gold answer (NaN when none has)."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else math.nan
