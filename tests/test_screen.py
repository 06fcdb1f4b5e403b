"""The two-hop screen: rows it does not pass are left exactly as the model answers them; it is saved without pickle
beside a gate, loaded with it, and refused when tampered with; its threshold bounds the negatives let through."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autopatch.errors import GateFileError
from autopatch.gating import AlwaysPatch, NeverPatch
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from classifiers import load_gate_dir
from classifiers.features import FeatureSpec, extract_prompt_features
from classifiers.gate import PatchGate, model_fingerprint
from classifiers.screen import ScreenedGate, cv_scores, load_screen, pick_threshold, save_screen
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = PromptFormat(demonstrations=())
SPEC = FeatureSpec(layers=(1,), positions=("span_end",), use_states=False, use_scalars=True)  # 3 scalar features
QUESTIONS = ["What is the capital of the country where the Colosseum is located?",
             "Who founded the company that makes the iPhone?"]


@pytest.fixture(scope="module")
def model():
    return tiny_model_for_bytes("llama", seed=3)


def _screen(model, weights, threshold: float) -> PatchGate:
    """A screen whose logit is ``weights . scalars`` (scaling and PCA are the identity)."""
    arrays = {"scaler_mean": np.zeros(3), "scaler_scale": np.ones(3), "pca_mean": np.zeros(3),
              "pca_components": np.eye(3), "coef": np.asarray(weights, float), "intercept": np.zeros(1)}
    return PatchGate(arrays, threshold, SPEC, PatchProfile(source_layer=1, target_layer=1, prompt_format=FMT),
                     model_fingerprint(model), {"kind": "screen"})


def _generate(model, gate):
    tok = byte_tokenizer()
    patcher = AutoPatcher(model, tok, PatchProfile(source_layer=1, target_layer=1, prompt_format=FMT), gate=gate)
    enc = patcher.encode(QUESTIONS)
    return patcher.generate_with_reports(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0, questions=QUESTIONS)


def test_rows_the_screen_rejects_are_answered_exactly_as_the_model_answers_them(model):
    plain = _generate(model, NeverPatch())
    rejected = _generate(model, ScreenedGate(_screen(model, [0.0, 0.0, 0.0], 0.9), AlwaysPatch()))  # score 0.5 < 0.9
    assert torch.equal(rejected.output, plain.output)
    assert all(not r.patched and r.reason.startswith("screen: P(two-hop question)=0.500 < 0.900") for r in rejected.reports)
    # the verdict is typed: the screen's score is its own field, never taken for the (unconsulted) gate's
    assert all((r.screen_passed, r.screen_score, r.gate_score) == (False, 0.5, None) for r in rejected.reports)
    passed = _generate(model, ScreenedGate(_screen(model, [0.0, 0.0, 0.0], 0.4), AlwaysPatch()))
    assert all(r.patched and "always patch" in r.reason and ">= 0.400" in r.reason for r in passed.reports)
    assert all((r.screen_passed, r.screen_score) == (True, 0.5) for r in passed.reports)
    assert all(r.screen_passed is None for r in _generate(model, AlwaysPatch()).reports)  # no screen ran


def test_the_screen_splits_a_batch_row_by_row(model):
    tok = byte_tokenizer()
    probe = AutoPatcher(model, tok, PatchProfile(source_layer=1, target_layer=1, prompt_format=FMT))
    enc = probe.encode(QUESTIONS)
    probs = torch.softmax(model(**enc).logits[:, -1].float(), -1).max(-1).values
    hi = int(probs.argmax())
    threshold = 1 / (1 + np.exp(-8 * float(probs.mean())))  # between the two rows' scores
    result = _generate(model, ScreenedGate(_screen(model, [8.0, 0.0, 0.0], threshold), AlwaysPatch()))
    assert [r.patched for r in result.reports] == [i == hi for i in range(2)]


def test_saved_beside_a_gate_loaded_with_it_and_refused_when_tampered(model, tmp_path):
    inner = _screen(model, [1.0, 0.0, 0.0], 0.5)  # any PatchGate serves as the inner gate
    ScreenedGate(_screen(model, [0.0, 2.0, 0.0], 0.3), inner).save(tmp_path / "g")
    loaded = load_gate_dir(tmp_path / "g", model=model)
    assert isinstance(loaded, ScreenedGate) and loaded.screen.threshold == 0.3 and loaded.inner.threshold == 0.5
    assert loaded.profile == inner.profile and loaded.feature_layers == (1,)
    path = tmp_path / "g" / "screen" / "gate.json"
    header = json.loads(path.read_text())
    header["threshold"] = 0.0  # a screen that lets everything through
    path.write_text(json.dumps(header))
    with pytest.raises(GateFileError, match="does not match the checksum in screen.json"):
        load_gate_dir(tmp_path / "g", model=model)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "screen.json").write_text(json.dumps({"format": "autopatch-screen", "version": 99}))
    with pytest.raises(GateFileError, match="version 99"):
        load_screen(tmp_path / "h")
    assert load_screen(tmp_path / "nothing-here") is None


def test_save_screen_writes_a_checked_screen_into_an_existing_gate_directory(model, tmp_path):
    inner = _screen(model, [1.0, 0.0, 0.0], 0.5)
    inner.save(tmp_path / "g")
    assert not isinstance(load_gate_dir(tmp_path / "g", model=model), ScreenedGate)
    save_screen(_screen(model, [0.0, 0.0, 1.0], 0.7), tmp_path / "g")
    assert isinstance(load_gate_dir(tmp_path / "g", model=model), ScreenedGate)


def test_pick_threshold_lets_at_most_the_allowed_share_of_negatives_through():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0.5, 1, 100)])
    y = np.array([0] * 200 + [1] * 100)
    for fpr in (0.0, 0.05, 0.2):
        t = pick_threshold(scores, y, fpr)
        assert (scores[y == 0] >= t).mean() <= fpr
        # the lowest such threshold: one step lower lets one more negative through
        below = np.sort(scores[y == 0])[::-1][int(np.floor(fpr * 200))]
        assert (scores[y == 0] >= below).mean() > fpr


def test_cross_validated_scores_keep_a_question_s_renderings_in_one_fold():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    X[1::2] = X[0::2]  # two renderings per question: a fold that split them would score a row it was fitted on
    y = (X[:, 0] > 0).astype(int)
    groups = [f"q{i // 2}" for i in range(40)]
    scores = cv_scores(X, y, groups, folds=4, n_components=3)
    assert scores.shape == (40,) and np.allclose(scores[0::2], scores[1::2])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, scores) > 0.8  # held-out scores still rank by the signal


def test_prompt_features_match_the_gate_inputs_of_a_real_call(model):
    tok = byte_tokenizer()
    patcher = AutoPatcher(model, tok, PatchProfile(source_layer=1, target_layer=1, prompt_format=FMT))
    prompts = [FMT.render(q) for q in QUESTIONS]
    X, located = extract_prompt_features(model, tok, prompts, QUESTIONS, SPEC, profile=patcher.profile)
    seen = []

    class Spy:
        feature_layers = (1,)

        def decide(self, inputs):
            seen.extend(SPEC.vector(i) for i in inputs)
            return NeverPatch().decide(inputs)

    enc = patcher.encode(QUESTIONS)
    AutoPatcher(model, tok, patcher.profile, gate=Spy()).generate(**enc, max_new_tokens=1, do_sample=False,
                                                                  pad_token_id=0, questions=QUESTIONS)
    assert located.all() and np.allclose(X, np.stack(seen), atol=1e-5)


def test_a_per_request_threshold_moves_the_inner_gate_and_never_the_screen(model):
    from server.errors import ApiError
    from server.planning import gate_with_threshold

    screen = _screen(model, [0.0, 0.0, 0.0], 0.4)
    screened = ScreenedGate(screen, _screen(model, [1.0, 0.0, 0.0], 0.5))
    moved = gate_with_threshold(screened, 0.9)
    assert isinstance(moved, ScreenedGate) and moved.inner.threshold == 0.9 and moved.screen is screen
    assert screened.inner.threshold == 0.5  # the served gate itself is untouched
    assert not hasattr(screened, "members")  # no attribute is answered by the inner gate in the screen's name
    with pytest.raises(ApiError, match="screened AlwaysPatch has no single threshold"):
        gate_with_threshold(ScreenedGate(screen, AlwaysPatch()), 0.9)


def test_platt_scaling_turns_overconfident_held_out_scores_into_calibrated_ones():
    from classifiers.screen import _calibrate, platt

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 4000)
    true_p = np.where(y == 1, 0.7, 0.3)  # a score that ranks well but claims far more than it knows
    claimed = np.where(rng.uniform(size=4000) < true_p, 0.99, 0.01)
    a, b = platt(claimed, y)
    calibrated = _calibrate(claimed, (a, b))
    assert 0 < a < 1  # shrunk towards 0.5
    assert abs(calibrated[claimed > 0.5].mean() - y[claimed > 0.5].mean()) < 0.02
    assert np.mean((calibrated - y) ** 2) < np.mean((claimed - y) ** 2)
    assert platt(claimed, np.ones(4000, int)) == (1.0, 0.0)  # one class: nothing to calibrate against


def test_train_screen_saves_calibrated_scores_and_reports_every_source_held_out(model, tmp_path):
    from classifiers.gate import make_pipeline
    from classifiers.screen import Example, _calibrate, screen_features, train_screen
    from eval.twohop import generate_twohop

    tok = byte_tokenizer()
    fmt = PromptFormat(demonstrations=())
    twohop = [r.question for r in generate_twohop(split="train")[:60]]
    ordinary = [f"What is the {w} of the {v} that {u}?" for w in ("color", "size", "age") for v in ("car", "house")
                for u in ("I bought", "we saw", "you liked", "she painted", "he sold")]
    examples = ([Example(f"p{i}", fmt.render(q), q, 1, "twohop-a" if i % 2 else "twohop-b") for i, q in enumerate(twohop)]
                + [Example(f"n{i}", fmt.render(q), q, 0, "ordinary") for i, q in enumerate(ordinary)])
    screen = train_screen(model, tok, out=tmp_path / "s", layers=(1,), n_components=4, examples=examples)
    summary = screen.meta["summary"]
    assert set(summary["per_source"]) == {"twohop-a", "twohop-b", "ordinary"}
    # positives held out by source are still judged by a screen fitted on the other positive source; the only
    # negative source cannot be held out (no negatives would remain to fit on)
    assert "passed_source_held_out" in summary["per_source"]["twohop-a"]
    assert "passed_source_held_out" not in summary["per_source"]["ordinary"]
    assert "Platt scaling" in (tmp_path / "s" / "screen.md").read_text()
    # the saved head scores exactly the calibrated probability of the fitted pipeline
    X, _ = screen_features(model, tok, examples, screen.spec)
    y = np.array([e.label for e in examples])
    pipe = make_pipeline("logreg", 4).fit(X, y)
    loaded = load_screen(tmp_path / "s", model=model)
    assert np.allclose(loaded.scores(X), _calibrate(pipe.predict_proba(X)[:, 1], tuple(summary["platt"])), atol=1e-6)
    assert loaded.threshold == screen.threshold
