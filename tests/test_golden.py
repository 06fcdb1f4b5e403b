"""The golden fixture: what ``AutoPatcher`` produces on a tiny model, pinned before the runtime is redesigned.

Every strategy and every control, under an always, a never and a choosing gate, with the ``grammar`` and
``both`` decomposers: the generated token ids and every report field, on a fixed batch of questions (two-hop
ones the locator reads, one it does not, one ordinary request). A behaviour-preserving change leaves
``tests/golden/autopatcher.json`` identical; a change that means to alter behaviour rewrites it on purpose:

    $ python -m tests.test_golden --write      # then say in the commit why the outputs moved

Float32 on one thread, so the ids are reproducible on any x86 machine with this torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURE = Path(__file__).with_name("golden") / "autopatcher.json"
QUESTIONS = [
    "What is the capital of the country where the Colosseum is located?",
    "Who founded the company that makes the iPhone?",
    "What is 2+2?",
    "Write a haiku about autumn.",
]
GATES = ("always", "never", "choosing")
DECOMPOSERS = ("grammar", "both")


def _cases() -> list[tuple[str, str | None]]:
    from autopatch.registry import CONTROLS, standalone_strategies

    return [(name, None) for name in standalone_strategies()] + [("reroute", name) for name in CONTROLS]


def _choosing_gate(model, fmt):
    """A two-member ChoiceGate with fixed linear members (as tests/test_choice.py builds them)."""
    from autopatch.profile import PatchProfile
    from classifiers.choice import ChoiceGate
    from classifiers.features import FeatureSpec
    from classifiers.gate import PatchGate, model_fingerprint

    spec = FeatureSpec(layers=(1,), positions=("span_end",), use_states=False, use_scalars=True)

    def member(strategy: str, weights: list[float], threshold: float) -> PatchGate:
        arrays = {"scaler_mean": np.zeros(3), "scaler_scale": np.ones(3), "pca_mean": np.zeros(3),
                  "pca_components": np.eye(3), "coef": np.asarray(weights, float), "intercept": np.zeros(1)}
        profile = PatchProfile(strategy=strategy, source_layer=2, target_layer=1, prompt_format=fmt)
        return PatchGate(arrays, threshold, spec, profile, model_fingerprint(model), {})

    return ChoiceGate({"reroute": member("reroute", [8.0, 0.0, 0.0], 0.5),
                       "decompose": member("decompose", [0.0, 1.0, 0.0], 0.5)})


def compute() -> dict:
    """The fixture's content, computed now."""
    from autopatch.gating import AlwaysPatch, NeverPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile
    from autopatch.prompts import PromptFormat
    from autopatch.registry import strategy as strategy_spec
    from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = tiny_model_for_bytes("llama", seed=3), byte_tokenizer()
        fmt = PromptFormat(demonstrations=())
        out: dict = {}
        for strategy, control in _cases():
            target = 1 if strategy_spec(strategy).target_before_source else 2
            profile = PatchProfile(strategy=strategy, source_layer=2, target_layer=target, prompt_format=fmt)
            for gate_name in GATES:
                gate = {"always": AlwaysPatch(), "never": NeverPatch()}.get(gate_name) or _choosing_gate(model, fmt)
                for decomposer in DECOMPOSERS:
                    patcher = AutoPatcher(model, tok, profile, gate=gate, control=control, decomposer=decomposer)
                    enc = tok([fmt.render(q) for q in QUESTIONS], return_tensors="pt", padding=True)
                    with torch.no_grad():
                        result = patcher.generate_with_reports(**enc, questions=QUESTIONS, max_new_tokens=6,
                                                               do_sample=False, pad_token_id=tok.pad_token_id)
                    key = f"{strategy}|{control or '-'}|{gate_name}|{decomposer}"
                    out[key] = {"ids": result.output.tolist(),
                                "reports": [json.loads(json.dumps(r.to_dict(), default=str)) for r in result.reports]}
        return out
    finally:
        torch.set_num_threads(before)


def _rounded(value):
    """Report floats (gate scores) to 6 digits: the fixture pins behaviour, not the last bit of a logistic."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def test_autopatcher_outputs_and_reports_equal_the_golden_fixture():
    if not FIXTURE.exists():
        pytest.fail(f"{FIXTURE} is missing: write it with `python -m tests.test_golden --write`")
    want = json.loads(FIXTURE.read_text())
    got = _rounded(compute())
    assert sorted(got) == sorted(want), "the cases changed: a strategy, control, gate or decomposer was added or removed"
    differ = [key for key in want if got[key] != want[key]]
    assert not differ, f"{len(differ)} of {len(want)} cases changed, first {differ[0]}: " \
                       f"{json.dumps(got[differ[0]])[:600]} vs {json.dumps(want[differ[0]])[:600]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_golden --write")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(_rounded(compute()), indent=0, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
