"""The two-hop question templates: span phrases, question frames and the compositions they form.

Example:
    >>> from eval.twohop_templates import COMPOSITIONS
    >>> "landmark_country_capital" in COMPOSITIONS
    True

Each composition chains two relations; each has 2-3 frames, and ONE is picked
per (subject, composition) by :mod:`eval.twohop`. Part of :mod:`eval.twohop`
(which re-exports :data:`COMPOSITIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Frame", "Composition", "COMPOSITIONS"]


@dataclass(frozen=True)
class Frame:
    """One question template: ``question`` contains ``{span}``; ``span_keys`` are tried in order."""

    question: str
    span_keys: tuple[str, ...]


@dataclass(frozen=True)
class Composition:
    """Two chained relations, e.g. landmark -(country)-> country -(capital)-> city."""

    name: str
    kind: str
    hop1_relation: str
    hop2_relation: str
    hop2_question: str
    frames: tuple[Frame, ...]


# --------------------------------------------------------------------------- text helpers


def _possessive(mention: str, plural: bool) -> str | None:
    """``"the Colosseum" -> "the Colosseum's"``; None where a possessive reads badly."""
    if plural or any(sep in mention for sep in (" of ", " in ", ",", ":")) or mention.endswith(("s", ".")):
        return None
    return f"{mention}'s"


# --------------------------------------------------------------------------- compositions

# Span templates (the phrase that denotes the bridge), by subject kind. "P" spans are possessive.
_COUNTRY_SPANS: dict[str, dict[str, str]] = {
    "landmark": {
        "A": "the country where {s} {be} located",
        "B": "the country in which {s} {be} situated",
        "C": "the country that is home to {s}",
        "P": "{s_poss} country",
    },
    "food": {
        "A": "the country where {s} {come} from",
        "B": "the country of origin of {s}",
        "C": "the country that {s} originally {come} from",
        "P": "{s_poss} country of origin",
    },
    "person": {
        "A": "the country where {s} was born",
        "B": "the country {s} was born in",
        "C": "the birth country of {s}",
        "P": "{s_poss} country of birth",
    },
    "capital": {
        "A": "the country whose capital is {s}",
        "B": "the country whose capital city is {s}",
        "C": "the country with {s} as its capital",
    },
    "company": {
        "A": "the country where {s} is headquartered",
        "B": "the country in which {s} has its headquarters",
        "C": "the home country of {s}",
    },
}

_COUNTRY_FACT_FRAMES: dict[str, tuple[Frame, ...]] = {
    "capital": (
        Frame("What is the capital of {span}?", ("A",)),
        Frame("What is the capital city of {span}?", ("B",)),
        Frame("What is the capital of {span}?", ("P", "C")),
    ),
    "currency": (
        Frame("What currency is used in {span}?", ("A",)),
        Frame("What is the currency of {span}?", ("C",)),
        Frame("Which currency does {span} use?", ("P", "B")),
    ),
    "language": (
        Frame("What language is mainly spoken in {span}?", ("A",)),
        Frame("What is the main language of {span}?", ("C",)),
        Frame("Which language do most people speak in {span}?", ("P", "B")),
    ),
    "continent": (
        Frame("On which continent is {span}?", ("A",)),
        Frame("On what continent is {span}?", ("C",)),
        Frame("On which continent does {span} lie?", ("P", "B")),
    ),
}

_HOP2_COUNTRY_QUESTIONS = {
    "capital": "What is the capital of #1?",
    "currency": "What currency is used in #1?",
    "language": "What language is mainly spoken in #1?",
    "continent": "On which continent is #1 located?",
}

_COUNTRY_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # kind: (composition infix, hop-1 relation, facts)
    "landmark": ("country", "located_in_country", ("capital", "currency", "language", "continent")),
    "food": ("country", "country_of_origin", ("capital", "currency", "language", "continent")),
    "person": ("birthcountry", "country_of_birth", ("capital", "currency", "language", "continent")),
    "capital": ("country", "capital_of", ("currency", "language", "continent")),
    "company": ("hqcountry", "headquarters_country", ("capital", "currency", "continent")),
}

_PRODUCT_SPANS = {
    "A": "the company that {verb} {s}",
    "B": "the company behind {s}",
    "M": "the maker of {s}",
}
_PRODUCT_FRAMES = {
    "founder": (
        Frame("Who founded {span}?", ("A",)),
        Frame("Who is the founder of {span}?", ("B",)),
        Frame("Who founded {span}?", ("M", "B")),
    ),
    "headquarters_country": (
        Frame("In which country is {span} headquartered?", ("A",)),
        Frame("In which country does {span} have its headquarters?", ("B",)),
        Frame("In which country is {span} based?", ("M", "A")),
    ),
}

_WORK_ROLES: dict[str, tuple[str, str, str, str, str]] = {
    # kind: (hop-1 relation, hop-1 verb, role noun, role span 2, role span 3)
    "book": ("author", "wrote", "author", "the writer of {s}", "the person who wrote {s}"),
    "play": ("author", "wrote", "author", "the playwright who wrote {s}", "the writer of {s}"),
    "poem": ("author", "wrote", "author", "the poet who wrote {s}", "the writer of {s}"),
    "painting": ("painter", "painted", "painter", "the artist who painted {s}", "the person who painted {s}"),
    "artwork": ("creator", "created", "creator", "the artist who made {s}", "the artist behind {s}"),
    "sculpture": ("sculptor", "sculpted", "sculptor", "the artist who sculpted {s}", "the creator of {s}"),
    "music": ("composer", "composed", "composer", "the composer who wrote {s}", "the person who composed {s}"),
    "film": ("director", "directed", "director", "the filmmaker who directed {s}", "the person who directed {s}"),
}
_WORK_FRAMES = (
    Frame("What is the nationality of {span}?", ("R1",)),
    Frame("What nationality is {span}?", ("R2",)),
    Frame("What is the nationality of {span}?", ("P", "R3")),
)


def _build_compositions() -> dict[str, Composition]:
    comps: dict[str, Composition] = {}
    for kind, (infix, rel1, facts) in _COUNTRY_KINDS.items():
        for fact in facts:
            name = f"{kind}_{infix}_{fact}"
            comps[name] = Composition(
                name, kind, rel1, fact, _HOP2_COUNTRY_QUESTIONS[fact], _COUNTRY_FACT_FRAMES[fact]
            )
    comps["product_company_founder"] = Composition(
        "product_company_founder", "product", "company", "founder", "Who founded #1?", _PRODUCT_FRAMES["founder"]
    )
    comps["product_company_hqcountry"] = Composition(
        "product_company_hqcountry",
        "product",
        "company",
        "headquarters_country",
        "In which country is #1 headquartered?",
        _PRODUCT_FRAMES["headquarters_country"],
    )
    comps["work_creator_nationality"] = Composition(
        "work_creator_nationality", "work", "creator", "nationality", "What is the nationality of #1?", _WORK_FRAMES
    )
    return comps


_COMPOSITIONS = _build_compositions()
COMPOSITIONS: tuple[str, ...] = tuple(_COMPOSITIONS)
