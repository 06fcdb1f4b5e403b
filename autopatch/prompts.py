"""Prompts: the query format, chat requests, and the fresh second-hop target.

Example:
    >>> from autopatch.prompts import PromptFormat, target_prompt
    >>> fmt = PromptFormat()                                  # few-shot QA, for base models
    >>> fmt.render("What is the capital of the country where the Colosseum is located?")
    'Q: Which planet is known as the Red Planet?\\nA: Mars\\n\\n...Q: What is the capital of ...?\\nA:'
    >>> target = target_prompt(fmt, tok, "What is the capital of ___?", placeholder="x")
    >>> target.text, target.placeholder_index        # the slot holds "x"; its last token gets the patch

Base models get a few-shot QA template whose demonstrations are single-hop and
unrelated to the evaluation facts, so every method (vanilla, patched, controls)
sees the same answer-format cue. Chat models get their chat template. The same
format renders the query and the target prompt, so a patch lands in a familiar
context.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.errors import ProfileError
from autopatch.locate import SLOT
from autopatch.stopping import cut_at_stop
from autopatch.tokens import last_token_of_char_span, token_char_ends

FormatKind = Literal["fewshot-qa", "chat"]

QA_DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many days are there in a week?", "Seven"),
    ("What is the chemical symbol for gold?", "Au"),
)

# Chat models answer in sentences unless told not to ("The capital of Italy is Rome."), which EM cannot score.
CHAT_INSTRUCTION = "Answer with only the answer itself: a name, a number or a short phrase. Do not write a sentence."
FEWSHOT_STOP_STRINGS: tuple[str, ...] = ("\n\n", "\nQ:")


@dataclass(frozen=True)
class Rendering:
    """How one family of prompts (chain of thought, a decomposition request) renders in one format.

    ``demonstrations``: ``None`` keeps the format's own; ``instruction``: the chat system turn (``None``: the
    template's default); ``answer_prefix``: the text that opens the answer.
    """

    demonstrations: tuple[tuple[str, str], ...] | None = None
    instruction: str | None = CHAT_INSTRUCTION
    answer_prefix: str = ""


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt: ``fewshot-qa`` for base models, ``chat`` for chat models."""

    kind: FormatKind = "fewshot-qa"
    demonstrations: tuple[tuple[str, str], ...] = field(default=QA_DEMONSTRATIONS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "demonstrations": [list(d) for d in self.demonstrations]}

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        kind = data.get("kind", "fewshot-qa")
        if kind not in ("fewshot-qa", "chat"):
            raise ProfileError(f"Unknown prompt format kind {kind!r}; use 'fewshot-qa' or 'chat'.")
        demos = tuple(tuple(d) for d in data.get("demonstrations", QA_DEMONSTRATIONS))
        return cls(kind=kind, demonstrations=demos)

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        """``chat`` when the tokenizer has a chat template, else ``fewshot-qa``."""
        return cls(kind="chat") if getattr(tokenizer, "chat_template", None) else cls()

    def render(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None, *, answer_prefix: str = "",
               instruction: str | None = CHAT_INSTRUCTION) -> str:
        """The prompt for ``question``; ``answer_prefix`` starts the answer (e.g. a CoT trigger).

        ``instruction`` is the chat format's system turn (``None``: the template's own default).
        """
        if self.kind == "chat":
            if tokenizer is None:
                raise ProfileError("The chat prompt format needs the tokenizer to apply its chat template.")
            return chat_render(tokenizer, self.chat_messages(question, instruction)) + answer_prefix
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in self.demonstrations)
        return f"{shots}Q: {question}\nA:" + (f" {answer_prefix}" if answer_prefix else "")

    def render_as(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None, *, chat: Rendering,
                  base: Rendering | Callable[[str], str]) -> str:
        """``question`` in a prompt family that reads differently to chat and base models: this format's kind
        picks ``chat`` or ``base`` (a :class:`Rendering`, or a function of the question for a layout of its own).

        Example:
            >>> fmt.render_as(q, tok, chat=Rendering(demonstrations=(), instruction="Think step by step."),
            ...               base=Rendering(answer_prefix="Let's think step by step."))
        """
        chosen = chat if self.kind == "chat" else base
        if not isinstance(chosen, Rendering):
            return chosen(question)
        fmt = self if chosen.demonstrations is None else replace(self, demonstrations=chosen.demonstrations)
        return fmt.render(question, tokenizer, answer_prefix=chosen.answer_prefix, instruction=chosen.instruction)

    @property
    def add_special_tokens(self) -> bool:
        """The one BOS rule: a chat template writes its own BOS (when its model wants one), so text it rendered is
        tokenized without the tokenizer's special tokens; few-shot text gets them (BOS for a base model)."""
        return self.kind != "chat"

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str], **kwargs):
        """``texts`` this format rendered, tokenized by :attr:`add_special_tokens`' rule as one left-padded batch
        (``return_tensors="pt"`` and ``padding=True`` unless given)."""
        kwargs.setdefault("return_tensors", "pt")
        kwargs.setdefault("padding", True)
        batch = [texts] if isinstance(texts, str) else list(texts)
        return tokenizer(batch, add_special_tokens=self.add_special_tokens, **kwargs)

    def fixed_prefix(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The tokens every prompt of this format starts with (the demonstrations, a chat system turn), less the
        last (it can merge with a question's first word): what :func:`autopatch.prefix_cache.register_prefix`
        keeps computed once."""
        return self.fixed_start(tokenizer, lambda q: self.render(q, tokenizer))

    def fixed_start(self, tokenizer: PreTrainedTokenizerBase, render: Callable[[str], str]) -> list[int]:
        """The tokens every prompt ``render(question)`` writes in this format starts with, less the last: two
        questions rendered and tokenized by this format's rule, and their common start (:meth:`fixed_prefix` for
        the format's own prompts; :func:`autopatch.decomposer.decomposition_prefix` for the decomposition's)."""
        first, second = (self.encode(tokenizer, render(q)).input_ids[0].tolist() for q in ("Who wrote Hamlet?", "7 + 5 ="))
        shared = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
        return first[: max(0, shared - 1)]

    def chat_messages(self, question: str, instruction: str | None = CHAT_INSTRUCTION) -> list[dict[str, str]]:
        """The chat turns of ``question``: the short-answer instruction, the demonstrations as real turns, the question."""
        messages = [{"role": "system", "content": instruction}] if instruction else []
        for q, a in self.demonstrations:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return [*messages, {"role": "user", "content": question}]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Where an answer in this format ends: before the next few-shot turn (chat models end theirs with EOS).

        Pass them to ``generate(..., stop_strings=fmt.stop_strings, tokenizer=tok)`` so a base model does not
        go on to invent the next question.
        """
        return FEWSHOT_STOP_STRINGS if self.kind == "fewshot-qa" else ()

    def clean_answer(self, text: str) -> str:
        """The generated text up to this format's first stop string, stripped."""
        return cut_at_stop(text, self.stop_strings)[0].strip()

    def extract_question(self, prompt: str) -> str | None:
        """The question of a prompt this format rendered (the last ``Q:`` line), or ``None``."""
        if self.kind == "chat":
            return None  # the caller passes questions= for chat prompts
        marker = prompt.rfind("Q: ")
        if marker < 0:
            return None
        line = prompt[marker + 3 :].split("\n", 1)[0].strip()
        return line or None


def chat_render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """``messages`` through the chat template, ready for the assistant's reply.

    A template that refuses a system turn (some allow only user/assistant) gets the
    instruction at the start of the first user turn instead.
    """
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception:  # templates raise their own error types (jinja TemplateError, ValueError, ...)
        if not messages or messages[0]["role"] != "system":
            raise
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    if not rest:
        raise ProfileError("A chat prompt needs a user turn after the system turn.")
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return str(tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True))


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request rendered for a model: the text, how, and the question the locator reads (its last user turn)."""

    text: str
    question: str
    template: str  # "chat-template" or "fewshot-qa"
    add_special_tokens: bool  # False when the chat template already wrote BOS
    stop: tuple[str, ...] = ()  # where the template's answer ends (the next few-shot turn); EOS ends chat turns


def _turns(messages: Sequence[Mapping[str, str]]) -> tuple[list[str], list[tuple[str, str]], str]:
    """(system texts, earlier (question, answer) pairs, last user message)."""
    if not messages or messages[-1]["role"] != "user":
        raise ProfileError("The last message must have role 'user': it is the request answered.")
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for m in messages[:-1]:
        if m["role"] == "user":
            if pending is not None:
                pairs.append((pending, ""))
            pending = m["content"]
        elif m["role"] == "assistant":
            pairs.append((pending or "", m["content"]))
            pending = None
    if pending is not None:
        pairs.append((pending, ""))
    return system, pairs, messages[-1]["content"]


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase,
                fmt: PromptFormat) -> ChatPrompt:
    """A chat request (``{"role", "content"}`` turns ending with the user's) as the model sees it.

    ``render_chat([{"role": "user", "content": "What is 2+2?"}], tok, fmt).text``. The one rendering of chat
    requests: the server and the harness's chat-request datasets both call it.

    With a chat template, the turns go through it unchanged. A base model (no template) gets ``fmt``'s few-shot
    QA rendering of the last user message, so a single-turn chat gets exactly the prompt autopatch was calibrated
    on; system (and developer) messages, joined by blank lines, open the prompt, and earlier turns become extra
    Q/A pairs after the demonstrations (a user message with no reply gets an empty answer; an assistant message
    with no user message before it, an empty question). Raises :class:`ProfileError` for a conversation that
    does not end with a user turn, or one the template rejects.
    """
    system, pairs, last = _turns(messages)
    question = last.strip()
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise their own errors (e.g. "roles must alternate")
            raise ProfileError(f"The model's chat template rejected these messages: {err}") from err
        return ChatPrompt(str(text), question, "chat-template", add_special_tokens=PromptFormat(kind="chat").add_special_tokens)
    base = fmt if fmt.kind == "fewshot-qa" else PromptFormat()
    rendered = replace(base, demonstrations=(*base.demonstrations, *pairs)).render(question)
    preamble = "\n\n".join(s.strip() for s in system if s.strip())
    return ChatPrompt(f"{preamble}\n\n{rendered}" if preamble else rendered, question, "fewshot-qa",
                      add_special_tokens=base.add_special_tokens, stop=base.stop_strings)


_SENTINEL = "\u2063autopatch-question\u2063"
_MARKERS: dict[tuple[int, str], tuple[str, str] | None] = {}


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return [t for t in {*tokenizer.all_special_tokens, *added} if t]


def chat_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    """The text that opens and closes a user turn in the tokenizer's chat template.

    E.g. ``("<|im_start|>user\\n", "<|im_end|>")`` for Qwen2.5.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    key = (id(tokenizer), str(template))
    if key not in _MARKERS:
        _MARKERS[key] = _find_markers(tokenizer)
    return _MARKERS[key]


def _find_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str] | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # templates raise their own error types; no markers then, and questions= is needed
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    before, after = text.split(_SENTINEL, 1)
    specials = _special_strings(tokenizer)
    opens = [before.rfind(t) for t in specials if t in before]
    opener = before[max(opens):] if opens else before.rsplit("\n", 2)[-2 if before.endswith("\n") else -1] + (
        "\n" if before.endswith("\n") else "")
    closes = [(after.find(t), t) for t in specials if t in after]
    if closes:
        at, token = min(closes)
        closer = after[: at + len(token)]
    else:
        closer = after.strip().split("\n", 1)[0]
    return (opener, closer) if opener else None


def chat_question(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str | None:
    """The last user turn of a prompt rendered with ``tokenizer``'s chat template (special tokens kept), or ``None``."""
    markers = chat_markers(tokenizer)
    if markers is None:
        return None
    opener, closer = markers
    start = prompt.rfind(opener)
    if start < 0:
        return None
    start += len(opener)
    end = prompt.find(closer, start) if closer.strip() else -1
    question = prompt[start : end if end >= 0 else len(prompt)].strip()
    return question or None


@dataclass(frozen=True)
class TargetPrompt:
    """A rendered prompt, its token ids, and the token that receives the patch."""

    text: str
    input_ids: torch.Tensor  # (seq,)
    placeholder_index: int


def target_prompt(
    fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase, second_hop: str, *, placeholder: str
) -> TargetPrompt:
    """The fresh continuation: ``second_hop`` with ``placeholder`` in its slot, rendered in ``fmt``."""
    if SLOT not in second_hop:
        raise ProfileError(f"Second-hop template {second_hop!r} has no slot {SLOT!r}.")
    if not placeholder:
        raise ProfileError("The placeholder must be a non-empty string.")
    text = fmt.render(second_hop.replace(SLOT, placeholder), tokenizer)
    ids = fmt.encode(tokenizer, text).input_ids[0]
    decoded = cast(str, tokenizer.decode(ids, skip_special_tokens=True))
    rendered_question_at = decoded.rfind(second_hop.split(SLOT)[0].strip() or placeholder)
    start = decoded.find(placeholder, max(rendered_question_at, 0))
    ends = token_char_ends(tokenizer, ids)
    return TargetPrompt(text, ids, last_token_of_char_span(ends, start, start + len(placeholder)))
