"""The screen's pass counts come from a run's own report reasons."""

from __future__ import annotations

import json

from eval.integrity import seal
from eval.screen_pass import screen_counts


def test_counts_located_passed_and_patched_rows(tmp_path):
    reasons = ["screen: P(two-hop question)=0.9 >= 0.5; choice gate: decompose",
               "screen: P(two-hop question)=0.1 < 0.5: left alone",
               "screen: P(two-hop question)=0.7 >= 0.5; choice gate: no candidate clears its threshold"]
    rows = [{"method": "autopatch", "id": str(i), "patched": i == 0, "report": {"located": True, "reason": r}}
            for i, r in enumerate(reasons)]
    rows.append({"method": "autopatch", "id": "x", "patched": False, "report": {"located": False, "reason": "unlocatable"}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(seal(r)) + "\n" for r in rows))
    assert screen_counts(tmp_path) == {"rows": 4, "located": 3, "passed": 2, "patched": 1}
