"""Gate labels reused from a finished sweep (``train-gate --labels-from``): nothing is generated twice."""

from __future__ import annotations

import json

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
    assert set(table) == {"vanilla", key} and set(table[key]) == {"a", "b"}
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
