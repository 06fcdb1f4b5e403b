"""Deterministic two-hop questions composed from a bundled knowledge base of common facts.

Example:
    >>> from eval.twohop import generate_twohop, twohop_stats
    >>> recs = generate_twohop(split="test")
    >>> r = next(x for x in recs if x.meta["composition"] == "landmark_country_capital")
    >>> r.question                                                   # doctest: +SKIP
    'What is the capital of the country where the Colosseum is located?'
    >>> [s.question for s in r.question_decomposition]              # doctest: +SKIP
    ['In which country is the Colosseum located?', 'What is the capital of #1?']
    >>> r.meta["first_hop_span"], r.meta["subject_span"]            # doctest: +SKIP
    ('the country where the Colosseum is located', 'Colosseum')
    >>> twohop_stats()["total"] >= 2000
    True

The knowledge base (``eval/data/twohop_kb.json``) holds countries (capital,
currency, main language, continent; a field is left out where it is
ambiguous), landmarks, foods, people (modern birth country), works and their
creators (nationality), companies (founders, headquarters country) and
products/brands. Each *composition* chains two relations, e.g.
``landmark -> country -> capital``; each has 2-3 English templates and ONE is
picked per (subject, composition) by a sha256 hash, so there are no
paraphrase duplicates.

Splits train/dev/test (~60/20/20) are assigned by sha256 of the subject
entity, so a subject never appears in two splits. Questions whose text
already contains the answer or the bridge entity (e.g. "the Acropolis of
Athens" for a capital question) are left out.

Modules: :mod:`eval.twohop_kb` (loading the KB, gold answers, the subject
split), :mod:`eval.twohop_templates` (spans, frames, compositions) and this
one (subjects, records, statistics); the public names of all three are
importable from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.dataset_registry import DatasetSpec, register_dataset
from eval.datasets import Selection, check_split
from eval.metrics import contains
from eval.records import DatasetError, DecompStep, QARecord
from eval.twohop_kb import (
    KB_PATH,
    SPLITS,
    Answer,
    Entity,
    _country_answer,
    _country_bridge,
    _dedup,
    _index,
    _sha_int,
    load_kb,
    subject_split,
)
from eval.twohop_templates import (
    _COMPOSITIONS,
    _COUNTRY_KINDS,
    _COUNTRY_SPANS,
    _PRODUCT_SPANS,
    _WORK_ROLES,
    COMPOSITIONS,
    Composition,
    Frame,
    _possessive,
)

__all__ = [
    "SPLITS",
    "KB_PATH",
    "COMPOSITIONS",
    "load_kb",
    "generate_twohop",
    "twohop_stats",
    "subject_split",
]


@dataclass(frozen=True)
class Subject:
    """A subject entity seen through one composition: its text forms and its bridge entity."""

    key: str
    id: str
    name: str
    mention: str
    slots: Mapping[str, str]
    hop1_question: str
    hop1_relation: str
    bridge: Entity
    bridge_answer: Answer


# --------------------------------------------------------------------------- subjects


def _iter_country_subjects(kb: Mapping[str, Any], kind: str) -> Iterator[Subject]:
    countries = _index(kb["countries"])
    if kind == "capital":
        for c in kb["countries"]:
            if "capital" not in c:
                continue
            cap = c["capital"]
            yield Subject(
                key=f"capital:{c['id']}",
                id=c["id"],
                name=cap,
                mention=cap,
                slots={"s": cap},
                hop1_question=f"Which country has {cap} as its capital?",
                hop1_relation="capital_of",
                bridge=c,
                bridge_answer=_country_answer(c),
            )
        return
    if kind == "company":
        for co in kb["companies"]:
            if "mention" not in co or "headquarters" not in co:
                continue
            country = countries[co["headquarters"]]
            m = co["mention"]
            yield Subject(
                key=f"company:{co['id']}",
                id=co["id"],
                name=m[4:] if m.startswith("the ") else m,
                mention=m,
                slots={"s": m},
                hop1_question=f"In which country is {m} headquartered?",
                hop1_relation="headquarters_country",
                bridge=country,
                bridge_answer=_country_answer(country),
            )
        return
    table = {"landmark": "landmarks", "food": "foods", "person": "people"}[kind]
    for e in kb[table]:
        country = countries[e["country"]]
        plural = bool(e.get("plural"))
        m = e.get("mention", e["name"])
        slots = {
            "s": m,
            "be": "are" if plural else "is",
            "come": "come" if plural else "comes",
        }
        poss = _possessive(m, plural)
        if poss is not None:
            slots["s_poss"] = poss
        if kind == "landmark":
            hop1 = f"In which country {slots['be']} {m} located?"
        elif kind == "food":
            hop1 = f"Which country {'do' if plural else 'does'} {m} come from?"
        else:
            hop1 = f"In which country was {m} born?"
        yield Subject(
            key=f"{kind}:{e['id']}",
            id=e["id"],
            name=e["name"],
            mention=m,
            slots=slots,
            hop1_question=hop1,
            hop1_relation=_COUNTRY_KINDS[kind][1],
            bridge=country,
            bridge_answer=_country_bridge(country, e.get("region")),
        )


def _iter_products(kb: Mapping[str, Any]) -> Iterator[Subject]:
    companies = _index(kb["companies"])
    for p in kb["products"]:
        co = companies[p["company"]]
        m = p["mention"]
        yield Subject(
            key=f"product:{p['id']}",
            id=p["id"],
            name=p["name"],
            mention=m,
            slots={"s": m, "verb": p["verb"]},
            hop1_question=f"Which company {p['verb']} {m}?",
            hop1_relation="company",
            bridge=co,
            bridge_answer=Answer(co["name"], _dedup(co.get("aliases", []), co["name"])),
        )


def _iter_works(kb: Mapping[str, Any]) -> Iterator[Subject]:
    creators = _index(kb["creators"])
    for w in kb["works"]:
        cr = creators[w["creator"]]
        rel, verb, noun, role2, role3 = _WORK_ROLES[w["kind"]]
        m = w["mention"]
        slots = {
            "s": m,
            "R1": f"the {noun} of {m}",
            "R2": role2.format(s=m),
            "R3": role3.format(s=m),
        }
        poss = _possessive(m, plural=False)
        if poss is not None:
            slots["P"] = f"{poss} {noun}"
        yield Subject(
            key=f"work:{w['id']}",
            id=w["id"],
            name=w["name"],
            mention=m,
            slots=slots,
            hop1_question=f"Who {verb} {m}?",
            hop1_relation=rel,
            bridge=cr,
            bridge_answer=Answer(cr["name"], _dedup(cr.get("aliases", []), cr["name"])),
        )


# --------------------------------------------------------------------------- answers


def _hop2_answer(comp: Composition, subj: Subject, kb: Mapping[str, Any]) -> Answer | None:
    """The final answer, or None when the KB leaves that fact out for this bridge."""
    rel = comp.hop2_relation
    bridge = subj.bridge
    if rel in ("capital", "currency", "language"):
        if rel not in bridge:
            return None
        return Answer(bridge[rel], _dedup(bridge.get(f"{rel}_aliases", []), bridge[rel]))
    if rel == "continent":
        if "continent" not in bridge:
            return None
        cont = bridge["continent"]
        return Answer(cont, _dedup(kb["continents"].get(cont, []), cont))
    if rel == "founder":
        founders = bridge.get("founders", [])
        return Answer(founders[0], tuple(founders[1:])) if founders else None
    if rel == "headquarters_country":
        hq = bridge.get("headquarters")
        return _country_answer(_index(kb["countries"])[hq]) if hq else None
    if rel == "nationality":
        country = _index(kb["countries"])[bridge["country"]]
        demonym = bridge.get("demonym", country["demonym"])
        dem_aliases = bridge.get("demonym_aliases", country.get("demonym_aliases", []))
        aliases = [*dem_aliases, country["name"], *country.get("aliases", [])]
        return Answer(demonym, _dedup(aliases, demonym))
    raise DatasetError(f"twohop composition {comp.name!r}: relation {rel!r} has no answer rule; "
                       f"add one to _hop2_answer in eval/twohop.py")


# --------------------------------------------------------------------------- generation


def _span_slots(comp: Composition, subj: Subject) -> dict[str, str]:
    """Every span key this subject supports for this composition, fully formatted."""
    if comp.kind == "work":
        return {k: v for k, v in subj.slots.items() if k in ("R1", "R2", "R3", "P")}
    templates = _PRODUCT_SPANS if comp.kind == "product" else _COUNTRY_SPANS[comp.kind]
    out: dict[str, str] = {}
    for key, fmt in templates.items():
        if key == "M" and subj.slots.get("verb") != "makes":
            continue
        if "{s_poss}" in fmt and "s_poss" not in subj.slots:
            continue
        out[key] = fmt.format(**{"s_poss": "", **subj.slots})
    return out


def _choose_frame(comp: Composition, subj: Subject, spans: Mapping[str, str]) -> tuple[int, Frame, str]:
    idx = _sha_int(f"{comp.name}|{subj.key}") % len(comp.frames)
    frame = comp.frames[idx]
    for key in frame.span_keys:
        if key in spans:
            return idx, frame, spans[key]
    raise DatasetError(f"twohop composition {comp.name!r}, frame {idx}: subject {subj.key!r} has none of the "
                       f"spans {frame.span_keys} (it has {sorted(spans)}); "
                       f"fix the frame's span keys in eval/twohop_templates.py")


def _subjects_for(comp: Composition, kb: Mapping[str, Any]) -> Iterator[Subject]:
    if comp.kind == "product":
        return _iter_products(kb)
    if comp.kind == "work":
        return _iter_works(kb)
    return _iter_country_subjects(kb, comp.kind)


def _leaks(question: str, answer: Answer, bridge: Answer) -> bool:
    """True when the question text already names the answer or the bridge entity."""
    return contains(question, (answer.text, *answer.aliases)) or contains(question, (bridge.text, *bridge.aliases))


def _make_record(comp: Composition, subj: Subject, kb: Mapping[str, Any]) -> QARecord | None:
    answer = _hop2_answer(comp, subj, kb)
    if answer is None:
        return None
    idx, frame, span = _choose_frame(comp, subj, _span_slots(comp, subj))
    question = frame.question.format(span=span)
    if _leaks(question, answer, subj.bridge_answer):
        return None
    split = subject_split(subj.key)
    meta = {
        "source": "twohop",
        "composition": comp.name,
        "subject": subj.name,
        "subject_kind": comp.kind,
        "subject_key": subj.key,
        "bridge": subj.bridge_answer.text,
        "bridge_aliases": list(subj.bridge_answer.aliases),
        "split": split,
        "hop1_relation": subj.hop1_relation,
        "hop2_relation": comp.hop2_relation,
        "first_hop_span": span,
        "subject_span": subj.name,
        "template": idx,
        "paraphrase": False,
    }
    return QARecord(
        id=f"twohop_{comp.name}_{subj.id}",
        question=question,
        question_decomposition=(
            DecompStep(question=subj.hop1_question, answer=subj.bridge_answer.text),
            DecompStep(question=comp.hop2_question, answer=answer.text),
        ),
        answer=answer.text,
        answer_aliases=answer.aliases,
        answerable=True,
        meta=meta,
    )


def generate_twohop(split: str | None = None, *, kb_path: str | Path | None = None) -> list[QARecord]:
    """``generate_twohop("dev")``: all two-hop records of a split (None = all), in a fixed order.

    Deterministic: the same KB always yields the same records, ids, templates
    and splits.
    """
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown twohop split {split!r}; choose one of {', '.join(SPLITS)} (or None for all)")
    kb = load_kb(kb_path)
    out: list[QARecord] = []
    for comp in _COMPOSITIONS.values():
        for subj in _subjects_for(comp, kb):
            rec = _make_record(comp, subj, kb)
            if rec is not None and (split is None or rec.meta["split"] == split):
                out.append(rec)
    return out


def twohop_stats(records: list[QARecord] | None = None) -> dict[str, Any]:
    """``twohop_stats()["by_composition"]``: counts of questions and subjects per composition and split."""
    recs = generate_twohop() if records is None else records
    by_comp_split: dict[str, Counter[str]] = {}
    subjects: dict[str, set[str]] = {s: set() for s in SPLITS}
    for r in recs:
        by_comp_split.setdefault(r.meta["composition"], Counter())[r.meta["split"]] += 1
        subjects[r.meta["split"]].add(r.meta["subject_key"])
    return {
        "total": len(recs),
        "compositions": len(by_comp_split),
        "subjects": sum(len(v) for v in subjects.values()),
        "by_composition": {c: sum(v.values()) for c, v in by_comp_split.items()},
        "by_split": {s: sum(v[s] for v in by_comp_split.values()) for s in SPLITS},
        "subjects_by_split": {s: len(v) for s, v in subjects.items()},
        "by_composition_split": {c: {s: v[s] for s in SPLITS} for c, v in by_comp_split.items()},
    }


def _select(split: str | None, hops: int | None) -> tuple[list[QARecord], Selection]:
    check_split(split, SPLITS, "twohop")
    if hops not in (None, 2):
        raise DatasetError(f"twohop has only 2-hop questions; got hops={hops}")
    records = generate_twohop(split=split)
    return records, Selection("twohop", len(records), len(records), {}, "the bundled subject split" if split else None)


register_dataset(DatasetSpec("twohop", "bundled two-hop questions", _select))
