"""What the locator leaves alone even where it can parse a first hop: facts the model cannot know.

Example:
    >>> from autopatch.locate import locate
    >>> locate("What is the population of the city where my grandmother was born?")
    Traceback (most recent call last):
    UnlocatableQuestion: ... the first hop refers to the user or the conversation ('my') ...

Decomposing asks the model the first hop on its own and fills its answer into the second. That is only sound
where the first hop is a fact of the world. Three kinds of request are refused, whichever route located them
(the grammar or a decomposition, the model's own included):

* a first hop that refers to the user or the conversation (*my*, *we*, *you*): the model would make the fact up;
* a first hop that points at context the request does not contain (*this snippet*, *the poem below*);
* a request for a long-form answer about the bridge (*summarize*, *describe*, *tell me about*): the method is
  built and measured for short factual answers, and a model writing at length keeps its own reading of the
  phrase in view, where a short first-hop answer, right or wrong, would replace it;
* a phrase cut before the relative clause that describes it ("the name of [Sherlock Holmes's friend] who narrates
  most of the stories"): the bridge is the phrase with its clause, so the first hop as parsed is not it (and with
  the clause it is often all the question asks: one hop).
"""

from __future__ import annotations

import re

from autopatch.locate.location import SLOT, Location, UnlocatableQuestion

__all__ = ["check_reach"]

PERSONAL = ("me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves", "you", "your", "yours", "yourself")
# "this poem", "these files": content the request would have to include. A bare "this" is often the question's
# own anaphora ("an instance of this tournament which ..."), so only these nouns count.
CONTENT = ("code", "snippet", "function", "program", "script", "query", "error", "text", "passage", "document",
           "file", "files", "article", "poem", "story", "essay", "image", "picture", "photo", "table", "list", "page",
           "email", "message", "conversation", "chat", "sentence", "paragraph", "video", "link", "example", "data",
           "dataset", "chart", "graph", "report", "letter", "note", "notes", "recipe", "screenshot", "output", "log")
POINTERS = ("above", "below", "attached", "aforementioned")
_WORDS = re.compile(r"[^\W\d_]+")  # letters, accented ones included ("Iñárritu" is one word)
_CUT_BEFORE_CLAUSE = re.compile(re.escape(SLOT) + r"\s+(?:who|whom|whose|which|that)\b", re.IGNORECASE)
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|'[^']*'(?=\W|$)")
_LONG_FORM = re.compile(
    r"^\s*(?:(?:can|could|would|will)\s+you\s+|please\s+)?"
    r"(?:summari[sz]e|describe|explain|discuss|outline|elaborate|analy[sz]e|review|write|compare|"
    r"tell\s+me\s+(?:more\s+)?about|give\s+me\s+(?:an?\s+)?(?:overview|summary|description))\b",
    re.IGNORECASE)


def check_reach(location: Location) -> Location:
    """``location`` itself, or :class:`UnlocatableQuestion` saying why its first hop is not the model's to answer."""
    words = _WORDS.findall(_QUOTED.sub(" ", location.span))  # a quoted title is a name, whatever its words
    personal = [w for i, w in enumerate(words) if _is_pronoun(words, i)]
    if personal:
        raise UnlocatableQuestion(location.question, f"the first hop refers to the user or the conversation "
                                  f"({personal[0]!r}), which the model cannot know; left alone")
    lower = [w.lower() for w in words]
    pointer = [w for w in lower if w in POINTERS]
    pointer += [f"{w} {n}" for w, n in zip(lower, lower[1:]) if w in ("this", "these", "following") and n in CONTENT]
    if pointer:
        raise UnlocatableQuestion(location.question, f"the first hop points at context the request does not contain "
                                  f"({pointer[0]!r}); left alone")
    if _LONG_FORM.match(location.second_hop):
        raise UnlocatableQuestion(location.question, "the request asks for a long-form answer about the bridge, not a "
                                  "short fact; left alone")
    if _CUT_BEFORE_CLAUSE.search(location.second_hop):
        raise UnlocatableQuestion(location.question, f"the phrase {location.span!r} stops before the relative clause "
                                  "that describes it, so it is not the whole bridge; left alone")
    return location


def _is_pronoun(words: list[str], i: int) -> bool:
    """A personal pronoun in running text: lower case (a capitalised "You" mid-phrase is a title's, "Now You See
    Him"), or "I" before a lower-case word and not after a capitalised one ("Elizabeth I", "How I Met")."""
    word = words[i]
    if word == "I":
        after = words[i + 1] if i + 1 < len(words) else ""
        before = words[i - 1] if i > 0 else ""
        return after[:1].islower() and not before[:1].isupper()
    return word.islower() and word in PERSONAL
