"""Explicit resolution (where the profile and gate came from), answer(), chat-template prompts, thread safety."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

import pytest
import torch

from autopatch import resolve as resolve_module
from autopatch.errors import GateFileError, ProfileError
from autopatch.gating import AlwaysPatch, GateDecision
from autopatch.patcher import AutoPatcher
from autopatch.profile import PatchProfile, shipped_profile_dir
from autopatch.prompts import PromptFormat, chat_question
from autopatch.resolve import resolve
from tests.tiny_models import CHAT_TEMPLATE, byte_tokenizer, tiny_model_for_bytes

torch.set_grad_enabled(False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTION = "What is the capital of the country where the Colosseum is located?"


@pytest.fixture(scope="module")
def tiny_chat():
    """A tiny Qwen2 whose tokenizer has a Qwen-style chat template."""
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tiny_model_for_bytes("qwen2"), tok


def _profile(fmt: PromptFormat | None = None) -> PatchProfile:
    return PatchProfile(source_layer=2, target_layer=1, prompt_format=fmt or PromptFormat(demonstrations=()))


class _Provider:
    def __init__(self, shipped=None, error=None):
        self.shipped, self.error = shipped, error

    def shipped_gate(self, model):
        if self.error:
            raise self.error
        return self.shipped

    def load_gate(self, path, model):
        return self.shipped


@pytest.fixture
def providers(monkeypatch):
    """Replace the installed gate providers by the ones a test sets."""
    chosen: list = []
    monkeypatch.setattr(resolve_module, "gate_providers", lambda: list(chosen))
    return chosen


def test_sources_are_typed_and_fallbacks_warn_once(tiny, providers, caplog):
    model, tok = tiny
    with caplog.at_level(logging.WARNING, logger="autopatch"):
        r = resolve(model, tok)
    assert (r.profile_source, r.gate_source) == ("default", "default") and isinstance(r.gate, AlwaysPatch)
    assert len([rec for rec in caplog.records if "unswept default" in rec.getMessage()]) == 1
    assert len([rec for rec in caplog.records if "no gate is shipped" in rec.getMessage()]) == 1
    given = resolve(model, tok, profile=_profile(), gate=AlwaysPatch())
    assert (given.profile_source, given.gate_source, given.notes) == ("argument", "argument", ())


def test_profile_file_is_a_file_source(tiny, providers, tmp_path):
    model, tok = tiny
    _profile().save(tmp_path / "p.json")
    assert resolve(model, tok, profile=tmp_path / "p.json", gate=AlwaysPatch()).profile_source == "file"


def test_a_refused_shipped_gate_falls_back_cleanly(tiny, providers, caplog):
    model, tok = tiny
    providers.append(_Provider(error=GateFileError("checksum mismatch")))
    with caplog.at_level(logging.WARNING, logger="autopatch"):
        patcher = AutoPatcher(model, tok, _profile())
    assert isinstance(patcher.gate, AlwaysPatch) and patcher.resolution.gate_source == "default"
    assert "refused (checksum mismatch)" in patcher.resolution.notes[0]
    assert any("refused" in rec.getMessage() for rec in caplog.records)


def test_the_server_starts_when_the_shipped_gate_is_refused(tiny, providers):
    from server.app import create_app

    model, tok = tiny
    providers.append(_Provider(error=GateFileError("another model")))
    app = create_app(model, tok, model_name="tiny", profile=_profile())
    assert isinstance(app.state.served.base.gate, AlwaysPatch)


def test_a_shipped_gate_brings_its_profile(tiny, providers):
    model, tok = tiny

    class Learned:
        feature_layers = (1,)
        profile = replace(_profile(), source_layer=3)

        def decide(self, inputs):
            return [GateDecision(True, 1.0, "yes") for _ in inputs]

    providers.append(_Provider(shipped=Learned()))
    r = resolve(model, tok)
    assert (r.gate_source, r.profile_source, r.profile.source_layer) == ("shipped", "shipped", 3)


def test_profiles_of_one_model_type_ship_side_by_side(tmp_path):
    for name, fingerprint in (("small", "aaaa"), ("large", "bbbb")):
        (tmp_path / name).mkdir()
        replace(_profile(), model_type="qwen2", model_fingerprint=fingerprint).save(tmp_path / name / "profile.json")
    assert shipped_profile_dir("aaaa", tmp_path) == tmp_path / "small"
    assert shipped_profile_dir("bbbb", tmp_path) == tmp_path / "large"
    assert shipped_profile_dir("cccc", tmp_path) is None


def test_answer_renders_generates_and_decodes(tiny):
    model, tok = tiny
    patcher = AutoPatcher(model, tok, _profile(), AlwaysPatch())
    (answer,) = patcher.answer(QUESTION, max_new_tokens=4)
    enc = tok([patcher.profile.prompt_format.render(QUESTION)], return_tensors="pt")
    out = patcher.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0, questions=[QUESTION])
    expected = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert answer.text == PromptFormat(demonstrations=()).clean_answer(expected)
    assert answer.report.patched and answer.report.question == QUESTION
    assert [a.question for a in patcher.answer([QUESTION, "What is 2+2?"], max_new_tokens=2)] == [QUESTION, "What is 2+2?"]


def test_clean_answer_cuts_at_the_next_turn():
    assert PromptFormat().clean_answer(" Italy\n\nQ: What is the capital of France?") == "Italy"
    assert PromptFormat(kind="chat").clean_answer(" Rome. \n") == "Rome."


def test_chat_question_is_the_last_user_turn(tiny_chat):
    _, tok = tiny_chat
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    assert chat_question(tok, prompt) == QUESTION


def test_a_chat_model_patches_through_generate_and_answer_without_questions(tiny_chat):
    model, tok = tiny_chat
    patcher = AutoPatcher(model, tok, _profile(PromptFormat(kind="chat")), AlwaysPatch())
    prompt = PromptFormat(kind="chat").render(QUESTION, tok)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    result = patcher.generate_with_reports(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    report = result.reports[0]
    assert report.question == QUESTION and report.located and report.patched, report.reason
    assert "<|im_start|>user" in result.targets[0].prompt_text  # the target prompt is rendered in the chat format
    (answer,) = patcher.answer(QUESTION, max_new_tokens=3)
    assert answer.report.patched


def test_one_patcher_is_safe_to_share_between_threads(tiny):
    model, tok = tiny
    patcher = AutoPatcher(model, tok, _profile(), AlwaysPatch())
    questions = [QUESTION, "Who founded the company that makes the iPhone?", "What is 2+2?",
                 "Who is the spouse of the Green performer?"]
    sequential = {q: (a.text, a.report.patched) for q in questions for a in patcher.answer(q, max_new_tokens=3)}
    results: dict[str, tuple[str, bool, str | None]] = {}

    def work(q):
        (a,) = patcher.answer(q, max_new_tokens=3)
        enc = tok([patcher.profile.prompt_format.render(q)], return_tensors="pt")
        patcher.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0, questions=[q])
        results[q] = (a.text, a.report.patched, patcher.last_report[0].question)  # this thread's own report

    threads = [threading.Thread(target=work, args=(q,)) for q in questions for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {q: r[:2] for q, r in results.items()} == sequential
    assert all(r[2] == q for q, r in results.items())


def test_resolution_serialises(tiny, providers):
    model, tok = tiny
    data = resolve(model, tok, profile=_profile()).to_dict()
    assert json.loads(json.dumps(data))["gate_source"] == "default"


def test_chat_format_uses_real_demonstration_turns_and_asks_for_a_short_answer(tiny_chat):
    from autopatch.prompts import CHAT_INSTRUCTION
    from eval.cot import cot_fewshot_prompt

    _, tok = tiny_chat
    fmt = PromptFormat(kind="chat")
    text = fmt.render(QUESTION, tok)
    assert text.startswith(f"<|im_start|>system\n{CHAT_INSTRUCTION}<|im_end|>")
    for q, a in fmt.demonstrations:
        assert f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" in text
    assert chat_question(tok, text) == QUESTION  # the last user turn, not a demonstration
    assert cot_fewshot_prompt(fmt, QUESTION, tok) != text  # few-shot CoT renders its own demonstrations


def test_a_template_without_system_turns_gets_the_instruction_in_the_first_user_turn():
    from autopatch.prompts import CHAT_INSTRUCTION

    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
    text = PromptFormat(kind="chat").render(QUESTION, tok)
    assert text.startswith(f"[user] {CHAT_INSTRUCTION}\n\nWhich planet")
    assert text.rstrip().endswith(f"[user] {QUESTION}\n[assistant]")


def test_a_fallback_is_logged_once_however_many_patchers_are_built(providers, caplog):
    model, tok = tiny_model_for_bytes("llama", seed=3), byte_tokenizer()
    with caplog.at_level(logging.WARNING, logger="autopatch"):
        for _ in range(3):
            AutoPatcher(model, tok)
    assert len([r for r in caplog.records if "no gate is shipped" in r.getMessage()]) == 1


def test_the_decomposer_is_the_argument_else_the_profile_s_else_the_one_shipped_for_the_model(monkeypatch):
    from autopatch.gating import AlwaysPatch

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    plain = PatchProfile(source_layer=1, target_layer=1, prompt_format=PromptFormat(demonstrations=()))
    assert (resolve(model, tok, profile=plain, gate=AlwaysPatch()).decomposer,
            resolve(model, tok, profile=plain, gate=AlwaysPatch()).decomposer_source) == ("grammar", "default")
    reads = replace(plain, decomposer="both")
    r = resolve(model, tok, profile=reads, gate=AlwaysPatch())
    assert (r.decomposer, r.decomposer_source) == ("both", "argument")
    r = resolve(model, tok, profile=reads, gate=AlwaysPatch(), decomposer="grammar")
    assert (r.decomposer, r.decomposer_source) == ("grammar", "argument")
    monkeypatch.setattr(PatchProfile, "shipped_for", classmethod(lambda cls, m, variant=None: replace(plain, decomposer="model")))
    patcher = AutoPatcher(model, tok, plain, gate=AlwaysPatch())
    assert (patcher.decomposer, patcher.planner.decomposer, patcher.resolution.decomposer_source) == ("model", "model", "shipped")
    assert patcher.resolution.to_dict()["decomposer"] == "model"
    with pytest.raises(ProfileError, match="Unknown decomposer 'oracle'"):
        replace(plain, decomposer="oracle")
