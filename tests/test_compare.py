"""``python -m eval.compare``: committed runs side by side, straight from their summaries."""

from __future__ import annotations

import json

import pytest

from eval.compare import compare_markdown


def _run(path, model, methods):
    path.mkdir()
    stats = {m: {"kind": k, "all": {"n": 10, "em": em, "em_ci": [em - 0.1, em + 0.1], "mean_tokens": 3.0,
                                    **({"vs_vanilla": {"fixed": 2, "broken": 1, "p_value": 0.5}} if m != "vanilla" else {})}}
             for m, (k, em) in methods.items()}
    (path / "summary.json").write_text(json.dumps({"n_questions": 10, "methods": stats}))
    (path / "config.json").write_text(json.dumps({"model": model}))
    return path


def test_runs_side_by_side_with_gaps_marked_and_oracles_last(tmp_path):
    a = _run(tmp_path / "a", None, {"vanilla": ("baseline", 0.3), "oracle-gate": ("oracle", 0.5),
                                    "patch": ("patch", 0.4)})
    b = _run(tmp_path / "b", "qwen2.5-coder-0.5b-instruct", {"vanilla": ("baseline", 0.5), "decompose": ("baseline", 0.6)})
    table = compare_markdown([a, b]).splitlines()
    assert table[0] == "| method | kind | gemma-3-270m (n=10) | qwen2.5-coder-0.5b-instruct (n=10) |"
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:] if line.startswith("|")}
    assert list(rows)[0] == "vanilla" and list(rows)[-1] == "*oracle-gate* (oracle)"
    assert "0.400 [0.30, 0.50], 2/1, 3.0 tok | – |" in rows["patch"]
    assert rows["decompose"].endswith("| – | 0.600 [0.50, 0.70], 2/1, 3.0 tok |")


def test_a_directory_that_is_not_a_run_is_refused_naming_it(tmp_path):
    with pytest.raises(SystemExit, match="not a finished"):
        compare_markdown([tmp_path])
