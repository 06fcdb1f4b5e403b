"""Harness speed-ups on a tiny random model: batches of similar prompt length give the same lines as batches in
dataset order, and a run prints one progress line per batch unless quiet."""

from __future__ import annotations

import pytest
import torch

from eval.methods import build_context
from eval.runner import batches, order_by_length, read_results, run_eval
from eval.twohop import generate_twohop
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ["vanilla", "patch", "verbalize", "control-zero", "hop1", "cot"]
VOLATILE = {"seconds", "sha256"}  # wall time, and the seal over it


@pytest.fixture(scope="module")
def ctx():
    return build_context(tiny_model_for_bytes("llama"), byte_tokenizer(), budget=3, cot_budget=4)


@pytest.fixture(scope="module")
def records():
    return generate_twohop("test")[:10]


def _lines(out) -> dict:
    return {(r["method"], r["id"]): {k: v for k, v in r.items() if k not in VOLATILE} for r in read_results(out)}


def test_length_order_is_longest_first_and_keeps_every_record(ctx, records):
    ordered = order_by_length(ctx, records)
    assert sorted(r.id for r in ordered) == sorted(r.id for r in records)
    lengths = [len(ctx.tok(ctx.fmt.render(r.question, ctx.tok)).input_ids) for r in ordered]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    ties = [r.id for r in ordered if len(ctx.tok(ctx.fmt.render(r.question, ctx.tok)).input_ids) == lengths[0]]
    assert ties == [r.id for r in records if r.id in ties]  # equal lengths keep dataset order


def test_length_ordered_batches_give_the_same_lines_as_dataset_order(ctx, records, tmp_path, capsys):
    ordered = order_by_length(ctx, records)
    # the comparison means something only if the two orders put questions in different batches
    assert [[r.id for r in b] for b in batches(ordered, 4)] != [[r.id for r in b] for b in batches(records, 4)]
    run_eval(ctx, records, METHODS, tmp_path / "sorted", batch_size=4, progress=False)
    run_eval(ctx, records, METHODS, tmp_path / "dataset", batch_size=4, progress=False, length_order=False)
    assert capsys.readouterr().err == ""  # quiet: no progress lines
    by_length, by_dataset = _lines(tmp_path / "sorted"), _lines(tmp_path / "dataset")
    assert len(by_length) == len(METHODS) * len(records)
    assert by_length == by_dataset  # continuations, answers, scores, reports, gold log-probabilities: all equal
    # the file itself follows the batches: longest prompts first
    first = read_results(tmp_path / "sorted")[0]
    assert first["method"] == METHODS[0] and first["id"] == ordered[0].id


def test_one_progress_line_per_batch_with_counts_and_time_left(ctx, records, tmp_path, capsys):
    run_eval(ctx, records, ["vanilla", "hop1"], tmp_path / "run", batch_size=4, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval[0]")]
    assert len(lines) == 2 * 3  # two methods, three batches of at most 4 of 10 questions
    assert lines[0].startswith("eval[0] vanilla: 4/20 lines, ") and "elapsed, ETA " in lines[0]
    assert lines[-1].startswith("eval[0] hop1: 20/20 lines, ") and lines[-1].endswith("ETA 0:00:00 left")
    run_eval(ctx, records, ["vanilla", "hop1"], tmp_path / "run", batch_size=4, progress=True)  # nothing left to do
    assert "eval[0]" not in capsys.readouterr().err


def test_patching_methods_reuse_vanilla_s_tokens_for_the_rows_they_leave_alone(records, tmp_path, monkeypatch):
    """Vanilla's generation is shared with every patching method of the run: the same lines as generating those
    rows again (a method run without vanilla first generates them itself)."""
    from autopatch.gating import GateDecision
    from autopatch.patcher import AutoPatcher

    class EveryOther:  # leaves every other located row alone
        feature_layers = ()

        def decide(self, inputs):
            return [GateDecision(i % 2 == 0, None, "test") for i in range(len(inputs))]

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    methods = ["vanilla", "autopatch", "decompose"]
    shared = build_context(model, tok, budget=3, gate=EveryOther())
    run_eval(shared, records, methods, tmp_path / "shared", batch_size=4, progress=False)
    assert len(shared.vanilla_tokens) == len(records)
    calls = []
    original = AutoPatcher.generate_with_reports

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("unpatched") is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoPatcher, "generate_with_reports", spy)
    alone = build_context(model, tok, budget=3, gate=EveryOther())
    for name in methods[1:]:  # no vanilla in this run: every row is generated
        run_eval(alone, records, [name], tmp_path / "alone", batch_size=4, progress=False)
    run_eval(alone, records, ["vanilla"], tmp_path / "alone", batch_size=4, progress=False)
    assert calls and not any(calls)
    left_alone = [r for r in read_results(tmp_path / "shared") if r["method"] == "autopatch" and not r["patched"]]
    assert left_alone  # the comparison covers rows answered from vanilla's tokens
    assert _lines(tmp_path / "shared") == _lines(tmp_path / "alone")
