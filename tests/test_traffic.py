"""The per-model table of the three kinds of questions reads committed summaries and nothing else."""

from __future__ import annotations

import json

from eval.traffic import traffic_markdown


def _run(path, methods):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"methods": methods}))
    return str(path)


def test_the_table_cites_the_summaries(tmp_path):
    harm = _run(tmp_path / "harm", {
        "vanilla": {"all": {"n": 10}, "kind:single-hop": {"em": 0.5, "n_gold": 4}, "kind:relative": {"em": 1.0, "n_gold": 1}},
        "autopatch": {"all": {"n": 10, "identical": 0.99}, "located": {"n": 3, "identical": 0.967},
                      "kind:single-hop": {"em": 0.25, "n_gold": 4}, "kind:relative": {"em": 1.0, "n_gold": 1}}})
    two = _run(tmp_path / "two", {"vanilla": {"all": {"em": 0.5}}, "decompose": {"all": {"em": 0.7}},
                                  "autopatch": {"all": {"em": 0.6, "vs_vanilla": {"fixed": 5, "broken": 1, "p_value": 0.2}}}})
    table = traffic_markdown([("m", [harm, "", two])])
    row = table.splitlines()[2]
    assert "0.990 / 0.967 (n=10/3)" in row and "0.600 → 0.400" in row
    assert "| – |" in row and "0.500 / 0.700 / 0.600 (5/1, p=0.2)" in row
