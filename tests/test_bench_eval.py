"""bench/bench_eval.py: each method's throughput and its cost relative to vanilla in the same run."""

from __future__ import annotations

from bench.bench_eval import throughput_markdown


def test_methods_are_ranked_by_cost_with_ratios_to_vanilla():
    summary = {"methods": {"vanilla": {"all": {"seconds_per_q": 0.5, "mean_tokens": 3.0}},
                           "decompose": {"all": {"seconds_per_q": 1.0, "mean_tokens": 5.0}},
                           "oracle-gate": {"all": {"seconds_per_q": None}}}}
    lines = throughput_markdown(summary).splitlines()
    assert lines[2] == "| vanilla | 0.500 | 2.00 | 1.00x | 3.0 |"
    assert lines[3] == "| decompose | 1.000 | 1.00 | 2.00x | 5.0 |" and len(lines) == 4
