"""eval.choose_decomposer: the reader with the best calibration EM is shipped; ties go to the cheaper one; never a
test split."""

from __future__ import annotations

import json

import pytest

from eval.choose_decomposer import choose, main
from eval.integrity import seal


def _run(tmp_path, split: str, right: dict[str, int], n: int = 10):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"split": split}))
    rows = [seal({"method": method, "id": f"q{i}", "em": float(i < k)}) for method, k in right.items() for i in range(n)]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_best_reader_on_calib_is_chosen_and_written_into_the_profile(tmp_path):
    run = _run(tmp_path, "calib", {"decompose": 3, "decompose-both": 4, "decompose-model": 6})
    best, em, why = choose(run)
    assert (best, em) == ("model", {"grammar": 0.3, "both": 0.4, "model": 0.6})
    assert "model vs grammar 3 fixed / 0 broken" in why
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"strategy": "verbalize", "note": "swept", "version": 1}))
    assert main([str(run), "--profile", str(profile)]) == 0
    written = json.loads(profile.read_text())
    assert written["decomposer"] == "model" and written["note"].startswith("swept; decomposer model chosen on")


def test_a_tie_keeps_the_cheaper_reader_and_a_test_split_is_refused(tmp_path):
    assert choose(_run(tmp_path, "calib", {"decompose": 5, "decompose-both": 5, "decompose-model": 5}))[0] == "grammar"
    (tmp_path / "run" / "config.json").write_text(json.dumps({"split": "test"}))
    with pytest.raises(SystemExit, match="chosen on a calibration split, not on 'test'"):
        choose(tmp_path / "run")
