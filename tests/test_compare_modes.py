"""``python -m eval.compare_modes``: two runs of the same questions, paired (what a quantization mode costs)."""

from __future__ import annotations

import json

import pytest

from eval.compare_modes import compare, markdown
from eval.integrity import seal


def _run(path, answers: dict[str, list[tuple[str, bool]]], **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"dataset": "twohop", "split": "test", "model": "m",
                                                  "methods": list(answers), **config}))
    with (path / "results.jsonl").open("w") as sink:
        for method, rows in answers.items():
            for i, (answer, em) in enumerate(rows):
                sink.write(json.dumps(seal({"method": method, "id": f"q{i}", "question": f"question {i}",
                                            "answer": answer, "em": em, "seconds": 1.0 if "a" in path.name else 0.25})) + "\n")
    return path


def test_pairs_questions_counts_gains_and_losses_and_identical_answers(tmp_path):
    a = _run(tmp_path / "a", {"vanilla": [("Rome", True), ("Paris", True), ("x", False), ("Bern", True)]})
    b = _run(tmp_path / "b", {"vanilla": [("Rome", True), ("Lyon", False), ("Oslo", True), ("Bern", True)]},
             quantize="int8")  # the weights may differ; nothing else
    (row,) = compare(a, b)
    assert (row["n"], row["em_a"], row["em_b"], row["gained"], row["lost"]) == (4, 0.75, 0.75, 1, 1)
    assert row["identical"] == 0.5 and row["p"] == 1.0 and row["s_a"] / row["s_b"] == 4.0
    assert "| vanilla | 4 | 0.750 | 0.750 | +0.0 | 1 / 1 (p=1) | 50.0% | 1.00 | 0.25 | 4.00x |" in markdown([row], "a", "b")


def test_runs_of_different_evaluations_are_refused_naming_the_setting(tmp_path):
    a = _run(tmp_path / "a", {"vanilla": [("Rome", True)]})
    b = _run(tmp_path / "b", {"vanilla": [("Rome", True)]}, budget=32)
    with pytest.raises(SystemExit, match="budget: None vs 32"):
        compare(a, b)
