"""Real-traffic sets: the bundled do-no-harm and hand-written two-hop sets load with their kinds and splits; chat
requests reach the model as a chat endpoint renders them; the report says, per kind, how many outputs stayed
exactly the model's own, and scores EM only where a gold exists."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from autopatch.gating import AlwaysPatch
from autopatch.prompts import PromptFormat, render_chat
from eval.datasets import DatasetError, QARecord, select_records
from eval.methods import build_context, record_prompt
from eval.report import summarise
from eval.runner import run_eval
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_do_no_harm_set_has_every_kind_of_request_split_without_leaks():
    calib, _ = select_records("harm", split="calib")
    test, selection = select_records("harm", split="test")
    assert selection.kept == len(test) and len(calib) + len(test) >= 500
    kinds = Counter(r.meta["kind"] for r in test)
    assert set(kinds) == {"instruction", "code", "chat", "multiturn", "arithmetic", "summary", "translation",
                          "relative", "single-hop"}
    assert not {r.id for r in calib} & {r.id for r in test}
    # a single-hop question takes its MuSiQue record's split, so it never shares a record with the other half
    musique_test = {r.id for r in select_records("musique", split="test", hops=2)[0]}
    assert all(r.meta["parent"] in musique_test for r in test if r.meta["kind"] == "single-hop")
    multiturn = [r for r in test if r.meta["kind"] == "multiturn"]
    assert all(r.messages and len(r.messages) >= 3 and r.messages[-1]["role"] == "user" for r in multiturn)
    assert all(r.messages is None and r.golds for r in test if r.meta["kind"] in ("relative", "single-hop"))
    assert all(r.golds for r in test if r.meta["kind"] == "arithmetic")
    assert select_records("harm", split="test", hops=1)[0] == [r for r in test if r.hops == 1]


def test_the_hand_written_set_is_two_hop_with_gold_bridges_in_forms_the_generator_lacks():
    records = select_records("handwritten", split=None)[0]
    assert len(records) >= 100 and all(r.hops == 2 and "#1" in r.question_decomposition[1].question for r in records)
    assert Counter(r.meta["kind"] for r in records).keys() == {"superlative", "possessive", "nested", "date", "number",
                                                               "other"}
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        select_records("handwritten", split="train")


def test_a_record_s_messages_are_checked_with_the_line_and_field_named(tmp_path):
    good = {"id": "x", "question": "Make it shorter", "answer": "", "answerable": False,
            "messages": [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "Roses"},
                         {"role": "user", "content": "Make it shorter"}]}
    rec = QARecord.from_dict(good)
    assert rec.hops == 0 and rec.messages[-1]["content"] == "Make it shorter"
    assert QARecord.from_dict(rec.to_dict()) == rec and QARecord.from_dict(rec.to_dict()).messages == rec.messages
    for bad, message in [({"messages": []}, "field 'messages' must be a non-empty list"),
                         ({"messages": [{"role": "bot", "content": "x"}]}, r"field 'messages'\[0\]: field 'role' is 'bot'"),
                         ({"messages": [{"role": "user", "content": 3}]}, r"field 'messages'\[0\]: field 'content' must"),
                         ({"messages": [{"role": "assistant", "content": "x"}]}, "field 'messages' must end with a 'user'")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({**good, **bad}) + "\n")
        with pytest.raises(DatasetError, match=f"bad.jsonl line 1: {message}"):
            select_records(str(path))


def test_chat_requests_are_rendered_as_the_server_renders_them_and_questions_in_the_run_format():
    tok = byte_tokenizer()
    ctx = build_context(tiny_model_for_bytes("llama"), tok, budget=2)
    request = [r for r in select_records("harm", split="test")[0] if r.meta["kind"] == "multiturn"][0]
    question = [r for r in select_records("harm", split="test")[0] if r.meta["kind"] == "relative"][0]
    assert record_prompt(ctx, request) == render_chat(request.messages, tok, ctx.fmt).text
    assert request.messages[0]["content"] in record_prompt(ctx, request)  # the earlier turns are kept
    assert record_prompt(ctx, question) == ctx.fmt.render(question.question, tok)


def test_the_report_gives_identical_shares_per_kind_and_em_only_where_a_gold_exists(tmp_path):
    records = select_records("harm", split="test")[0]
    picked = [next(r for r in records if r.meta["kind"] == k) for k in ("code", "summary", "relative", "single-hop")]
    ctx = build_context(tiny_model_for_bytes("llama"), byte_tokenizer(), budget=3, gold_scores=False,
                        gate=AlwaysPatch())
    run_eval(ctx, picked, ["vanilla", "autopatch", "decompose"], tmp_path, batch_size=4, progress=False)
    summary = summarise(tmp_path)
    assert set(summary["kinds"]) == {"code", "summary", "relative", "single-hop"}
    auto = summary["methods"]["autopatch"]
    assert auto["all"]["n"] == 4 and auto["all"]["n_gold"] == 2  # code and summary requests have no gold
    assert 0.0 <= auto["all"]["identical"] <= 1.0 and auto["kind:code"]["n"] == 1
    assert "identical" not in summary["methods"]["vanilla"]["all"]  # vanilla is the reference
    unpatched = [k for k in summary["kinds"] if summary["methods"]["autopatch"][f"kind:{k}"]["patched"] == 0]
    assert all(summary["methods"]["autopatch"][f"kind:{k}"]["identical"] == 1.0 for k in unpatched)
    assert PromptFormat().render("x")  # the run's format stays the few-shot one for a tokenizer without a template
