"""Gate labels reused from a finished sweep (``train-gate --labels-from``): nothing is generated twice."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from classifiers.labels import seed_labels
from eval.sweep import SweepConfig, load_sweep, run_sweep
from eval.twohop import generate_twohop
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(ids, config, em):
    return [{"id": i, "config": config, "continuation": "x", "answer": "x", "em": em, "f1": em, "contains": em}
            for i in ids]


def test_seeding_copies_vanilla_and_the_candidate_renames_an_alias_and_never_overwrites(tmp_path):
    sweep = [*_rows(["a", "b"], "vanilla", 0.0), *_rows(["a", "b"], "decompose", 1.0),
             *_rows(["a"], "reroute|span_end|2|1|identity", 1.0)]
    key = "decompose|subject_end|2|2|span"
    label_file = tmp_path / "decompose" / "labels_twohop_train.jsonl"
    assert seed_labels(label_file, key, sweep, alias="decompose") == 4
    table = load_sweep(label_file)
    config = SweepConfig.from_key(key)
    assert set(table) == {"vanilla", config} and set(table[config]) == {"a", "b"}
    label_file.write_text("")
    assert seed_labels(label_file, key, sweep, alias="decompose") == 0
    assert label_file.read_text() == ""


def test_a_seeded_label_file_is_not_generated_again(tmp_path, monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    monkeypatch.setattr(PatchProfile, "default_for", classmethod(
        lambda cls, m: PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))))
    records = generate_twohop("train")[:3]
    config = SweepConfig("reroute", "span_end", 2, 1)
    ids = [r.id for r in records]
    label_file = tmp_path / "labels_twohop_train.jsonl"
    # the seeded rows carry values no real generation of this model could give, so a re-run would show
    seed_labels(label_file, config.key, [*_rows(ids, "vanilla", 0.25), *_rows(ids, config.key, 0.75)])
    before = label_file.read_text()
    run_sweep(model, tok, records, [config], label_file, batch_size=2, max_new_tokens=2)
    assert label_file.read_text() == before
    assert {row["em"] for row in map(json.loads, before.splitlines())} == {0.25, 0.75}


def test_a_candidate_that_never_helps_on_train_is_left_out_of_the_choice(tmp_path, monkeypatch):
    from classifiers.train import train_choice_gate
    from eval.datasets import load_dataset_by_name
    from eval.sweep import stratified_sample

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    base = PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))
    monkeypatch.setattr(PatchProfile, "default_for", classmethod(lambda cls, m: base))
    candidates = {"verbalize": replace(base, strategy="verbalize", bridge_prompt="span"),
                  "reroute": replace(base, strategy="reroute")}
    for split, limit in (("train", 8), ("dev", 6)):
        ids = [r.id for r in stratified_sample(load_dataset_by_name("twohop", split=split, hops=2), limit)]
        for name, profile in candidates.items():
            key = SweepConfig(profile.strategy, profile.source_position, profile.source_layer, profile.target_layer,
                              profile.bridge_prompt).key
            helps = [float(i % 2) for i in range(len(ids))] if name == "verbalize" else [0.0] * len(ids)
            rows = [*_rows(ids, "vanilla", 0.0)] + [{**r, "em": h} for r, h in zip(_rows(ids, key, 0.0), helps)]
            seed_labels(tmp_path / name / f"labels_twohop_{split}.jsonl", key, rows)
    choice = train_choice_gate(model, tok, candidates=candidates, train="twohop:train:8", dev="twohop:dev:6",
                               out=tmp_path, batch_size=4, max_new_tokens=2)
    assert list(choice.members) == ["verbalize"] and choice.meta["left_out"] == ["reroute"]
