"""eval.datasets (schema, loaders, MuSiQue split) and eval.twohop (bundled two-hop generator)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import eval.datasets as ds
from eval.datasets import (
    DatasetError,
    DecompStep,
    QARecord,
    load_dataset_by_name,
    load_hf_musique,
    load_json,
    load_jsonl,
    load_musique,
    load_records,
    musique_split,
)
from eval.metrics import contains
from eval.twohop import COMPOSITIONS, SPLITS, generate_twohop, subject_split, twohop_stats

MUSIQUE = ds.bundled_musique_path()  # shipped as package data: no test skips for want of it


def _good(**over: object) -> dict:
    rec = {
        "id": "2hop__1_2",
        "question": "Who is the spouse of the Green performer?",
        "question_decomposition": [
            {"id": 1, "question": "Green >> performer", "answer": "Steve Hillage", "paragraph_support_idx": 10},
            {"id": 2, "question": "#1 >> spouse", "answer": "Miquette Giraudy", "paragraph_support_idx": 5},
        ],
        "answer": "Miquette Giraudy",
        "answer_aliases": ["M. Giraudy", "Miquette Giraudy"],
        "answerable": True,
    }
    rec.update(over)
    return rec


def _write_jsonl(path: Path, objs: list) -> Path:
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- schema


def test_record_round_trip_and_properties() -> None:
    rec = QARecord.from_dict(_good(meta={"split": "calib"}))
    assert rec.hops == 2
    assert rec.golds == ("Miquette Giraudy", "M. Giraudy")
    assert rec.question_decomposition[0] == DecompStep("Green >> performer", "Steve Hillage", 1, 10)
    assert QARecord.from_dict(rec.to_dict()) == rec
    assert json.loads(json.dumps(rec.to_dict())) == rec.to_dict()
    assert "meta" not in QARecord.from_dict(_good()).to_dict()
    hash(rec)  # frozen records stay hashable despite the meta dict


def test_optional_fields_default() -> None:
    obj = _good()
    del obj["answer_aliases"], obj["answerable"]
    rec = QARecord.from_dict(obj)
    assert rec.answer_aliases == () and rec.answerable is True and rec.meta == {}
    step = DecompStep.from_dict({"question": "Who?", "answer": "X"})
    assert step.id is None and step.paragraph_support_idx is None


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"answer": 3}, "'answer' must be a string, got int"),
        ({"question": ""}, "'question' must be a non-empty string"),
        ({"question": None}, "'question' must be a string, got null"),
        ({"id": 17}, "'id' must be a string, got int"),
        ({"question_decomposition": "x >> y"}, "'question_decomposition' must be a list, got str"),
        ({"question_decomposition": []}, "'question_decomposition' must be a non-empty list"),
        ({"question_decomposition": [{"question": "a >> b", "answer": "x"}, {"question": "#1 >> c"}]},
         "'question_decomposition'[1]: missing required field 'answer'"),
        ({"question_decomposition": [{"question": "a >> b", "answer": 5}]},
         "'question_decomposition'[0]: field 'answer' must be a string, got int"),
        ({"question_decomposition": ["a >> b"]}, "'question_decomposition'[0]: must be an object, got str"),
        ({"question_decomposition": [{"question": "q", "answer": "a", "paragraph_support_idx": "3"}]},
         "'paragraph_support_idx' must be an int or null, got str"),
        ({"answer_aliases": "x"}, "'answer_aliases' must be a list of strings, got str"),
        ({"answer_aliases": ["x", 2]}, "'answer_aliases'[1] must be a string, got int"),
        ({"answerable": "yes"}, "'answerable' must be a boolean, got str"),
        ({"answer": ""}, "'answer' must be non-empty"),
        ({"meta": []}, "'meta' must be an object, got list"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path: Path, bad: dict, field: str) -> None:
    path = _write_jsonl(tmp_path / "musique.jsonl", [_good(id="a"), "", _good(**{"id": "b", **bad})])
    with pytest.raises(DatasetError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert msg.startswith("musique.jsonl line 3: "), msg  # 1-based, blank lines count
    assert field in msg


def test_missing_field_and_invalid_json(tmp_path: Path) -> None:
    obj = _good()
    del obj["answer"]
    with pytest.raises(DatasetError, match=r"^m\.jsonl line 1: missing required field 'answer'$"):
        load_jsonl(_write_jsonl(tmp_path / "m.jsonl", [obj]))
    with pytest.raises(DatasetError, match=r"^m\.jsonl line 2: invalid JSON"):
        load_jsonl(_write_jsonl(tmp_path / "m.jsonl", [_good(), '{"id": "x",']))
    with pytest.raises(DatasetError, match=r"line 1: a record must be a JSON object, got list"):
        load_jsonl(_write_jsonl(tmp_path / "m.jsonl", ["[1, 2]"]))
    with pytest.raises(DatasetError, match=r"line 2: field 'id' duplicates id"):
        load_jsonl(_write_jsonl(tmp_path / "m.jsonl", [_good(), _good()]))


def test_load_json_list_and_data_dict(tmp_path: Path) -> None:
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps([_good(id="x"), _good(id="y")]), encoding="utf-8")
    as_dict = tmp_path / "b.json"
    as_dict.write_text(json.dumps({"version": 1, "data": [_good(id="x")]}), encoding="utf-8")
    assert [r.id for r in load_json(as_list)] == ["x", "y"]
    assert [r.id for r in load_records(as_dict)] == ["x"]

    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"data": [_good(id="x"), _good(id="y", answer=None)]}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"^c\.json data\[1\]: field 'answer' must be a string, got null$"):
        load_json(bad)
    bad.write_text(json.dumps({"rows": []}), encoding="utf-8")
    with pytest.raises(DatasetError, match="top level must be a list"):
        load_json(bad)


def test_load_records_dispatch(tmp_path: Path) -> None:
    jsonl_named_json = _write_jsonl(tmp_path / "lines.json", [_good(id="x"), _good(id="y")])
    assert len(load_records(jsonl_named_json)) == 2
    assert len(load_records(_write_jsonl(tmp_path / "r.ndjson", [_good()]))) == 1
    other = tmp_path / "r.csv"
    other.write_text("id,question\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_records(other)
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- MuSiQue


def test_musique_split_rule() -> None:
    for rid in ("2hop__460946_294723", "3hop1__1_2_3", "x"):
        parity = int(hashlib.sha256(rid.encode()).hexdigest(), 16) % 2
        assert musique_split(rid) == ("calib" if parity == 0 else "test")


def test_musique_real_file_splits_and_hops() -> None:
    everything = load_musique(MUSIQUE)
    assert len(everything) == 2417
    calib = load_musique(MUSIQUE, split="calib")
    test = load_musique(MUSIQUE, split="test")
    calib_ids, test_ids = {r.id for r in calib}, {r.id for r in test}
    assert not calib_ids & test_ids
    assert calib_ids | test_ids == {r.id for r in everything}
    assert all(r.meta["split"] == "calib" for r in calib)

    assert Counter(r.hops for r in everything) == {2: 1252, 3: 760, 4: 405}
    two = load_musique(MUSIQUE, hops=2)
    assert len(two) == 1252 and all(r.id.startswith("2hop") for r in two)
    assert len(load_musique(MUSIQUE, split="test", hops=2)) + len(load_musique(MUSIQUE, split="calib", hops=2)) == 1252
    first = everything[0]
    assert first.id == "2hop__460946_294723" and first.answer == "Miquette Giraudy"
    assert QARecord.from_dict(first.to_dict()) == first


def test_load_musique_bad_split() -> None:
    with pytest.raises(DatasetError, match="unknown split 'train'"):
        load_musique("unused.jsonl", split="train")


def test_default_path_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_jsonl(tmp_path / ds.MUSIQUE_FILENAME, [_good(id="2hop__a"), _good(id="3hop1__b")])
    monkeypatch.setenv(ds.MUSIQUE_ENV, str(tmp_path))
    assert ds.default_musique_path() == tmp_path / ds.MUSIQUE_FILENAME
    assert [r.id for r in load_musique()] == ["2hop__a", "3hop1__b"]
    monkeypatch.setenv(ds.MUSIQUE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="--dataset PATH"):
        load_musique()


def test_default_path_is_the_bundled_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ds.MUSIQUE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # found wherever the clone or the install lives
    assert ds.default_musique_path() == MUSIQUE and MUSIQUE.name.endswith(".jsonl.gz")
    assert len(load_musique()) == 2417


def test_bundled_copy_matches_the_shared_file() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique" / ds.MUSIQUE_FILENAME
    if not shared.is_file():  # a clone that is not beside the workspace's shared/ folder
        shared = MUSIQUE
    assert [r.to_dict() for r in load_records(shared)] == [r.to_dict() for r in load_records(MUSIQUE)]


def test_missing_bundled_file_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ds.MUSIQUE_ENV, raising=False)
    monkeypatch.setattr(ds, "bundled_musique_path", lambda: tmp_path / "gone.jsonl.gz")
    with pytest.raises(DatasetError, match=r"missing .*reinstall.*--dataset PATH"):
        ds.default_musique_path()


def test_load_hf_musique_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(name: str, split: str) -> None:
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DatasetError, match=r"could not load 'some/musique'.*offline.*--dataset PATH"):
        load_hf_musique("some/musique", "validation")


def test_load_hf_musique_columnar_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    row = _good()
    steps = row["question_decomposition"]
    row["question_decomposition"] = {k: [s[k] for s in steps] for k in steps[0]}  # HF Sequence layout
    row["paragraphs"] = [{"title": "ignored"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, split: [row]))
    (rec,) = load_hf_musique("some/musique", "validation")
    assert rec.hops == 2 and rec.question_decomposition[1].answer == "Miquette Giraudy"
    assert rec.meta["split"] == musique_split(rec.id)


# --------------------------------------------------------------------------- dispatch


def test_load_dataset_by_name(tmp_path: Path) -> None:
    dev = load_dataset_by_name("twohop", split="dev")
    assert dev and all(r.meta["split"] == "dev" for r in dev)
    path = _write_jsonl(tmp_path / "x.jsonl", [_good(id="2hop__a"), _good(id="4hop1__b", meta={"split": "test"})])
    assert len(load_dataset_by_name(str(path))) == 2
    assert [r.id for r in load_dataset_by_name(path, split="test")] == ["4hop1__b"]
    assert load_dataset_by_name(path, hops=3) == []
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*'musique'.*'twohop'.*'harm'.*'handwritten'.*path"):
        load_dataset_by_name("nope")
    with pytest.raises(DatasetError, match="unknown split 'calib' for twohop"):
        load_dataset_by_name("twohop", split="calib")
    with pytest.raises(DatasetError, match="only 2-hop"):
        load_dataset_by_name("twohop", hops=3)


def test_load_dataset_by_name_musique_file_split(monkeypatch: pytest.MonkeyPatch) -> None:
    by_name = load_dataset_by_name("musique", split="calib", hops=2)
    by_path = load_dataset_by_name(str(MUSIQUE), split="calib", hops=2)
    assert [r.id for r in by_name] == [r.id for r in by_path]
    assert len(by_name) == len(load_musique(MUSIQUE, split="calib", hops=2))


# --------------------------------------------------------------------------- twohop


@pytest.fixture(scope="module")
def twohop() -> list[QARecord]:
    return generate_twohop()


def test_twohop_volume_and_compositions(twohop: list[QARecord]) -> None:
    assert len(twohop) >= 2000
    comps = Counter(r.meta["composition"] for r in twohop)
    assert len(comps) >= 8
    assert set(comps) <= set(COMPOSITIONS)
    assert all(n >= 30 for n in comps.values()), comps
    assert len({r.meta["subject_key"] for r in twohop}) >= 350
    stats = twohop_stats(twohop)
    assert stats["total"] == len(twohop) and sum(stats["by_split"].values()) == len(twohop)


def test_twohop_subject_disjoint_splits(twohop: list[QARecord]) -> None:
    split_of: dict[str, str] = {}
    for r in twohop:
        key = r.meta["subject_key"]
        assert split_of.setdefault(key, r.meta["split"]) == r.meta["split"], key
        assert r.meta["split"] == subject_split(key)
    shares = Counter(r.meta["split"] for r in twohop)
    assert set(shares) == set(SPLITS)
    assert 0.5 < shares["train"] / len(twohop) < 0.7
    assert 0.1 < shares["dev"] / len(twohop) < 0.3 and 0.1 < shares["test"] / len(twohop) < 0.3
    assert {r.id for r in generate_twohop("test")} == {r.id for r in twohop if r.meta["split"] == "test"}


def test_twohop_spans_are_substrings(twohop: list[QARecord]) -> None:
    for r in twohop:
        span, subj = r.meta["first_hop_span"], r.meta["subject_span"]
        assert span in r.question, r.id
        assert subj and subj in span, r.id
        assert r.question.replace(span, "#1") != r.question


def test_twohop_record_shape(twohop: list[QARecord]) -> None:
    for r in twohop:
        assert r.id.startswith(f"twohop_{r.meta['composition']}_")
        assert r.answer and r.answerable and r.hops == 2
        step1, step2 = r.question_decomposition
        assert step1.answer == r.meta["bridge"] and step2.answer == r.answer
        assert "#1" in step2.question and "#1" not in step1.question
        assert r.question.endswith("?") and step1.question.endswith("?")
        assert not contains(r.question, r.golds), r.id  # the question never gives the answer away
        assert QARecord.from_dict(r.to_dict()) == r


def test_twohop_unique_and_deterministic(twohop: list[QARecord]) -> None:
    assert len({r.id for r in twohop}) == len(twohop)
    assert len({r.question for r in twohop}) == len(twohop)
    again = generate_twohop()
    assert [r.to_dict() for r in again] == [r.to_dict() for r in twohop]


def test_twohop_known_questions(twohop: list[QARecord]) -> None:
    by_id = {r.id: r for r in twohop}
    colosseum = by_id["twohop_landmark_country_capital_colosseum"]
    assert colosseum.answer == "Rome" and colosseum.meta["bridge"] == "Italy"
    assert colosseum.question_decomposition[0].question == "In which country is the Colosseum located?"
    hamlet = by_id["twohop_work_creator_nationality_hamlet"]
    assert hamlet.answer == "English" and "British" in hamlet.answer_aliases
    iphone = by_id["twohop_product_company_founder_iphone"]
    assert iphone.answer == "Steve Jobs" and "Steve Wozniak" in iphone.answer_aliases


def test_twohop_bad_split() -> None:
    with pytest.raises(DatasetError, match="unknown twohop split"):
        generate_twohop("calib")


def test_a_file_without_splits_is_kept_whole_and_filtering_is_explained(tmp_path: Path) -> None:
    objs = [_good(id=f"2hop__{i}") for i in range(90)] + [
        _good(id="3hop1__x", question_decomposition=[*_good()["question_decomposition"], {"question": "#2 >> born", "answer": "Y"}])]
    path = _write_jsonl(tmp_path / "mine.jsonl", objs)
    records, selection = ds.select_records(path, split=None, hops=2)
    assert len(records) == 90 and selection.loaded == 91 and selection.dropped == {"not 2 hops": 1}
    assert "kept 90" in selection.describe() and "not 2 hops" in selection.describe()
    test_half, selection = ds.select_records(path, split="test", hops=2)
    assert 0 < len(test_half) < 90 and selection.dropped["split is not test"] == 90 - len(test_half)
    assert "id-hash rule" in selection.describe()


def test_musique_selection_counts_every_record() -> None:
    records, selection = ds.select_records("musique", split="test", hops=2)
    assert selection.loaded == 2417 and selection.kept == len(records)
    assert sum(selection.dropped.values()) + selection.kept == selection.loaded


def test_hub_copy_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, split: calls.append(name) or [_good()]))
    load_dataset_by_name("musique", split="test")
    assert calls == []
    assert len(load_dataset_by_name("hf:some/musique")) == 1 and calls == ["some/musique"]


def test_gzipped_jsonl_loads(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(_good()) + "\n")
    assert [r.id for r in load_records(path)] == ["2hop__1_2"]


@pytest.mark.parametrize("name,content,match", [
    ("deep.jsonl", b"\n" + b"[" * 100_000 + b"\n", r"deep.jsonl line 2: JSON nested too deeply"),
    ("latin1.jsonl", b'{"id": "a", "question": "Caf\xe9?"}\n', r"latin1.jsonl line 1: not UTF-8 text"),
    ("deep.json", b"[" * 100_000, r"deep.json: JSON nested too deeply"),
    ("latin1.json", b'[{"question": "Caf\xe9?"}]', r"latin1.json: not UTF-8 text"),
    ("broken.jsonl.gz", b"\x1f\x8b\x08\x00 not really gzip", r"broken.jsonl.gz line 1: cannot be read"),
], ids=["deep-line", "latin1-line", "deep-file", "latin1-file", "broken-gzip"])
def test_undecodable_files_are_dataset_errors_naming_file_and_line(tmp_path: Path, name, content, match) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        load_records(path)


def test_a_musique_step_becomes_a_question_in_one_place():
    from eval.records import DecompStep

    relation = DecompStep("Green >> performer", "Steve Hillage")
    assert relation.is_relation and relation.as_question() == "What is the performer of Green?"
    second = DecompStep("Who is the spouse of #1?", "Miquette Giraudy")
    assert not second.is_relation and second.as_question() == second.question
    assert second.filled("Steve Hillage").question == "Who is the spouse of Steve Hillage?"
    assert DecompStep("#1 >> spouse", "x").filled("Steve Hillage").is_relation
