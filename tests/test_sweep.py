"""The configuration sweep: grid, resumable runs, summaries, profiles; gate sources never include test."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autopatch.profile import PatchProfile
from autopatch.prompts import PromptFormat
from classifiers.train import parse_sources
from eval.sweep import SweepConfig, default_grid, load_sweep, run_sweep, summarize, write_profiles
from eval.twohop import generate_twohop
from tests.tiny_models import byte_tokenizer, tiny_model_for_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_grid_scales_with_depth_and_keys_round_trip():
    grid = default_grid(18)
    assert len(grid) == 38 and len(set(grid)) == 38
    assert {c.strategy for c in grid} == {"reroute", "backpatch", "verbalize"}
    for n in (4, 18, 32):
        for config in default_grid(n):
            assert 0 <= config.target_layer < n and 0 <= config.source_layer < n
            assert SweepConfig.from_key(config.key) == config
            if config.strategy == "backpatch":
                assert config.target_layer < config.source_layer


def test_sweep_resumes_and_summarises(tmp_path, monkeypatch):
    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    monkeypatch.setattr(PatchProfile, "default_for", classmethod(
        lambda cls, m: PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))))
    records = generate_twohop("train")[:5]
    configs = [SweepConfig("reroute", "span_end", 2, 1), SweepConfig("verbalize", "subject_end", 1, 1, "span")]
    out = tmp_path / "sweep.jsonl"
    run_sweep(model, tok, records, configs, out, batch_size=2, max_new_tokens=2)
    lines = out.read_text().splitlines()
    assert len(lines) == 5 * 3
    with out.open("a") as f:
        f.write('{"id": "torn')
    run_sweep(model, tok, records, configs, out, batch_size=2, max_new_tokens=2)
    assert out.read_text().splitlines() == lines  # nothing redone, the torn line dropped
    table = load_sweep(out)
    rows = summarize(table)
    assert {r["config"] for r in rows} == set(configs)
    assert all(r["n"] == 5 and 0 <= r["em"] <= 1 for r in rows)
    written = write_profiles(table, "llama", "abc", replace(PatchProfile(), prompt_format=PromptFormat()), "test",
                             directory=tmp_path / "profiles")
    assert {p.name for p in written} == {"profile.json", "reroute.json", "verbalize.json"}
    best = PatchProfile.load(tmp_path / "profiles" / "profile.json")
    assert best.model_fingerprint == "abc" and best.note.startswith("sweep")


def test_gate_sources_refuse_test_splits():
    assert parse_sources("twohop:train:10,musique:calib") == [("twohop", "train", 10), ("musique", "calib", None)]
    with pytest.raises(ValueError, match="test"):
        parse_sources("twohop:test")


def test_a_study_sweep_writes_controls_references_and_hops_and_the_study_reads_them(tmp_path, monkeypatch):
    from eval.study import choose_on_train, config_stats, gap_ids, study_markdown
    from eval.sweep import REFERENCE_KEYS, RandomControl, row_key_text, study_grid

    model, tok = tiny_model_for_bytes("llama"), byte_tokenizer()
    monkeypatch.setattr(PatchProfile, "default_for", classmethod(
        lambda cls, m: PatchProfile(source_layer=2, target_layer=1, prompt_format=PromptFormat(demonstrations=()))))
    configs = [SweepConfig("reroute", "span_end", 2, 1), SweepConfig("reroute", "subject_end", 2, 0, scale=2.0)]
    assert SweepConfig.from_key(configs[1].key) == configs[1] and configs[1].key.endswith("|2")
    out = tmp_path / "sweep.jsonl"
    run_sweep(model, tok, generate_twohop("train")[:4], configs, out, batch_size=2, max_new_tokens=2, controls=True)
    table = load_sweep(out)
    assert set(table) == {"vanilla", *REFERENCE_KEYS, *configs, *(RandomControl(c) for c in configs)}
    assert {row_key_text(k) for k in table} >= {"random:" + c.key for c in configs}  # the file's spelling
    assert all(len(rows) == 4 for rows in table.values())
    assert {r["config"] for r in summarize(table)} >= set(configs)
    chosen = choose_on_train(table)
    assert set(chosen) == {"reroute"} and chosen["reroute"] in configs
    stats = config_stats(table, configs[0])
    assert stats["gap_n"] == len(gap_ids(table)) and "gap_fixed_random" in stats and "p_vs_decompose" in stats
    assert "Chosen on train, scored on dev" in study_markdown(table, table, "cmd")
    assert len(study_grid(24)) == 35 and all(c.target_layer <= c.source_layer for c in study_grid(24))


def test_configs_option_refuses_a_bad_key_before_the_model_loads(capsys):
    from eval.sweep import main

    with pytest.raises(SystemExit):
        main(["--configs", "reroute|span_end|x|0|identity"])
    assert "--configs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--configs", "nosuch|span_end|1|0|identity"])


def test_a_sweep_row_whose_config_names_nothing_is_refused_with_its_line(tmp_path):
    from autopatch.errors import ConfigError

    path = tmp_path / "sweep.jsonl"
    path.write_text('{"id": "a", "config": "vanilla", "em": 1.0}\n{"id": "a", "config": "reroute|nowhere|3|1|identity"}\n')
    with pytest.raises(ConfigError, match=r"row 2, field 'config': 'reroute\|nowhere"):
        load_sweep(path)
