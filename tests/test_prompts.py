"""autopatch.prompts: the one BOS rule (PromptFormat.encode) on a chat tokenizer that adds BOS itself and whose
template writes one too, as Gemma's and Llama 3's do: every prompt autopatch tokenizes carries exactly one."""

from __future__ import annotations

import pytest
from tokenizers import processors

from autopatch.locate import SLOT
from autopatch.prompts import PromptFormat, render_chat, target_prompt
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

QUESTION = "What is the capital of the country where the Colosseum is located?"


def _bos_adding_chat_tokenizer():
    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert tok("x").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS...
    assert PromptFormat(kind="chat").render("x", tok).startswith("<s>")  # ...and so does the template
    return tok


def _bos_count(ids) -> int:
    return sum(int(i) == 1 for i in ids)


@pytest.mark.parametrize("kind", ["chat", "fewshot-qa"])
def test_every_prompt_autopatch_tokenizes_has_one_bos(kind):
    from autopatch.gating import AlwaysPatch
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import PatchProfile

    tok = _bos_adding_chat_tokenizer()
    fmt = PromptFormat(kind=kind)
    query = fmt.encode(tok, fmt.render(QUESTION, tok)).input_ids[0]
    assert int(query[0]) == 1 and _bos_count(query) == 1
    target = target_prompt(fmt, tok, f"What is the capital of {SLOT}?", placeholder="x")
    assert int(target.input_ids[0]) == 1 and _bos_count(target.input_ids) == 1
    prefix = fmt.fixed_prefix(tok)
    assert prefix[0] == 1 and _bos_count(prefix) == 1
    patcher = AutoPatcher(tiny_model_for_bytes("llama"), tok, PatchProfile(source_layer=1, target_layer=1,
                                                                          prompt_format=fmt), gate=AlwaysPatch())
    enc = patcher.encode([QUESTION])
    assert _bos_count(enc.input_ids[0]) == 1
    patcher.generate(**enc, max_new_tokens=2, do_sample=False, questions=[QUESTION])
    assert patcher.last_report[0].patched and _bos_count(patcher.last_targets[0].input_ids) == 1


def test_a_served_chat_request_has_one_bos():
    tok = _bos_adding_chat_tokenizer()
    prompt = render_chat([{"role": "user", "content": QUESTION}], tok, PromptFormat(kind="chat"))
    ids = tok(prompt.text, add_special_tokens=prompt.add_special_tokens).input_ids
    assert ids[0] == 1 and _bos_count(ids) == 1
