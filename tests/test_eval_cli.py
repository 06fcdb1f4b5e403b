"""The evaluation harness end to end on a tiny random model: results, resume, sharding, reports, errors."""

from __future__ import annotations

import json

import pytest

from autopatch.cli import main
from eval.datasets import DatasetError
from eval.runner import read_results
from eval.twohop import generate_twohop

METHODS = "vanilla,patch,verbalize,control-zero,control-nopatch,cot"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "six.jsonl"
    records = generate_twohop("test")[:6]
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


def _eval(tiny_dir, dataset, out, *extra):
    argv = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(out),
            "--methods", METHODS, "--batch-size", "4", "--budget", "3", "--cot-budget", "4", "--quiet", *extra]
    return main(argv)


def _lines(out):
    return {(r["method"], r["id"]): r for r in read_results(out)}


@pytest.fixture(scope="module")
def reference_run(tiny_dir, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert _eval(tiny_dir, dataset, out) == 0
    return out


def test_a_run_writes_auditable_lines_and_a_report(reference_run):
    lines = _lines(reference_run)
    methods = set(METHODS.split(",")) | {"hop1", "hop2"}
    assert {m for m, _ in lines} == methods
    assert len(lines) == len(methods) * 6
    for row in lines.values():
        assert {"prompt", "continuation", "answer", "golds", "em", "f1", "contains", "n_tokens", "report"} <= set(row)
        assert row["golds"]
    assert all(lines[("patch", i)]["report"]["patched"] for m, i in lines if m == "patch")
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["n_questions"] == 6
    assert summary["methods"]["oracle-gate"]["kind"] == "oracle"
    for name in ("vanilla", "patch"):
        stats = summary["methods"][name]["all"]
        assert 0.0 <= stats["em_ci"][0] <= stats["em"] <= stats["em_ci"][1] <= 1.0
    report = (reference_run / "report.md").read_text()
    assert "**oracle-gate** (oracle)" in report and "## Controls" in report
    assert (reference_run / "accuracy.png").stat().st_size > 0
    assert summary["methods"]["patch"]["all"]["gold_logprob"] is not None


def test_the_same_command_gives_the_same_numbers(tiny_dir, dataset, reference_run, tmp_path):
    assert _eval(tiny_dir, dataset, tmp_path / "again") == 0
    again, first = _lines(tmp_path / "again"), _lines(reference_run)
    assert {k: v["continuation"] for k, v in again.items()} == {k: v["continuation"] for k, v in first.items()}


def test_resume_after_a_kill_loses_and_duplicates_nothing(tiny_dir, dataset, reference_run, tmp_path, monkeypatch):
    import eval.methods as methods_module

    out = tmp_path / "killed"
    original = methods_module.METHODS["patch"]
    calls = {"n": 0}

    def dies_on_second_batch(ctx, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original.run(ctx, records)

    from dataclasses import replace

    monkeypatch.setitem(methods_module.METHODS, "patch", replace(original, run=dies_on_second_batch))
    with pytest.raises(KeyboardInterrupt):
        _eval(tiny_dir, dataset, out)
    partial = read_results(out)
    assert 0 < len(partial) < len(_lines(reference_run))
    with (out / "results.jsonl").open("a") as f:
        f.write('{"method": "patch", "id": "torn')  # a line cut mid-write by the kill
    monkeypatch.setitem(methods_module.METHODS, "patch", original)
    assert _eval(tiny_dir, dataset, out) == 0
    rows = read_results(out)
    keys = [(r["method"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing duplicated
    resumed = {(r["method"], r["id"]): r["continuation"] for r in rows}
    assert resumed == {k: v["continuation"] for k, v in _lines(reference_run).items()}  # nothing lost or changed


def test_two_process_sharded_run_equals_unsharded(tiny_dir, dataset, reference_run, tmp_path):
    out = tmp_path / "sharded"
    assert _eval(tiny_dir, dataset, out, "--num-processes", "2") == 0
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.rank0.jsonl", "results.rank1.jsonl"]
    sharded = _lines(out)
    assert {k: v["continuation"] for k, v in sharded.items()} == {k: v["continuation"] for k, v in _lines(reference_run).items()}
    a = json.loads((out / "summary.json").read_text())["methods"]
    b = json.loads((reference_run / "summary.json").read_text())["methods"]
    assert {m: a[m]["all"]["em"] for m in a} == {m: b[m]["all"]["em"] for m in b}


def test_a_different_command_on_the_same_directory_is_refused(tiny_dir, dataset, reference_run, capsys):
    assert _eval(tiny_dir, dataset, reference_run, "--budget", "5") == 2
    assert "different settings" in capsys.readouterr().err


def test_unknown_method_and_malformed_dataset_are_clear_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "Q?", "question_decomposition": [], "answer": 3}\n')
    assert _eval(tiny_dir, bad, tmp_path / "x") == 2
    assert "line 1" in capsys.readouterr().err
    with pytest.raises(DatasetError):
        from eval.datasets import load_records

        load_records(bad)
    assert main(["eval", "--dataset", "twohop", "--methods", "vanilla,telepathy", "--out", str(tmp_path / "y")]) == 2
    assert "telepathy" in capsys.readouterr().err


def _no_model_load(monkeypatch):
    import autopatch.loading

    def refuse(*a, **k):
        raise AssertionError("the model must not load for a refused command")

    monkeypatch.setattr(autopatch.loading, "load_model", refuse)


def test_a_changed_methods_list_is_refused_before_the_model_loads(tiny_dir, dataset, reference_run, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    argv = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(reference_run),
            "--methods", "vanilla,patch", "--batch-size", "4", "--budget", "3", "--cot-budget", "4", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "methods" in err and "--add-methods" in err


def test_add_methods_extends_a_run_and_the_report_names_every_command(tiny_dir, dataset, tmp_path):
    out = tmp_path / "grow"
    base = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(out),
            "--batch-size", "4", "--budget", "3", "--quiet", "--no-hops", "--no-gold-scores"]
    assert main([*base, "--methods", "vanilla"]) == 0
    assert "Not assessed" in (out / "report.md").read_text()  # no patch, no control: no claim about controls
    assert main([*base, "--methods", "control-zero", "--add-methods"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == ["vanilla", "control-zero"] and len(config["commands"]) == 2
    report = (out / "report.md").read_text()
    assert "Commands (each wrote part of this run" in report and "--add-methods" in report
    assert "Not assessed: this run has no `patch`" in report
    assert {r["method"] for r in read_results(out)} == {"vanilla", "control-zero"}


def test_a_file_without_splits_is_evaluated_whole(tiny_dir, tmp_path, capsys):
    path = tmp_path / "ninety.jsonl"
    records = generate_twohop("test")[:90]
    path.write_text("".join(json.dumps({k: v for k, v in r.to_dict().items() if k != "meta"}) + "\n" for r in records))
    out = tmp_path / "whole"
    argv = ["eval", "--dataset", str(path), "--model", str(tiny_dir), "--out", str(out), "--methods", "vanilla",
            "--batch-size", "32", "--budget", "1", "--quiet", "--no-hops", "--no-gold-scores"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_questions"] == 90
    config = json.loads((out / "config.json").read_text())
    assert config["selection"]["kept"] == 90 and config["split"] == "all"
    assert "90 records, kept 90" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_must_be_positive(limit, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "twohop", "--limit", limit, "--out", str(tmp_path / "z")])
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("damage,problem", [
    ("edit", "its content does not match its sha256"),
    ("empty-object", "not a result"),
    ("garbage", "not valid JSON"),
])
def test_a_damaged_results_line_stops_resume_and_repair_recomputes_it(tiny_dir, dataset, reference_run, tmp_path,
                                                                        capsys, damage, problem):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    if damage == "edit":
        row = json.loads(lines[3])
        row["em"] = 1.0 - row["em"]
        lines[3] = json.dumps(row)
    else:
        lines[3] = "{}" if damage == "empty-object" else "{not json"
    results.write_text("\n".join(lines) + "\n")
    assert _eval(tiny_dir, dataset, out) != 0
    err = capsys.readouterr().err
    assert f"results.jsonl line 4: {problem}" in err and "--repair" in err
    assert _eval(tiny_dir, dataset, out, "--repair") == 0
    assert (out / "results.jsonl.bak").exists()
    assert _lines(out) == _lines(reference_run) or {k: v["continuation"] for k, v in _lines(out).items()} == {
        k: v["continuation"] for k, v in _lines(reference_run).items()}


def test_a_second_writer_of_the_same_run_is_refused(tiny_dir, dataset, tmp_path, capsys):
    from eval.integrity import writer_lock

    out = tmp_path / "locked"
    with writer_lock(out / "results.jsonl"):
        assert _eval(tiny_dir, dataset, out) != 0
    assert "is being written by another process" in capsys.readouterr().err
    assert _eval(tiny_dir, dataset, out) == 0  # free again once the first writer is done


def test_rescore_applies_the_current_rule_and_reseals(tiny_dir, dataset, reference_run, tmp_path):
    import shutil

    from eval.rescore import main as rescore

    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    results = out / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    lines[0] = {k: v for k, v in lines[0].items() if k != "sha256"} | {"answer": "stale", "em": 0.5}
    results.write_text("".join(json.dumps(row) + "\n" for row in lines))
    assert rescore([str(out)]) == 0
    fresh = _lines(out)  # read_results checks every seal
    first = (lines[0]["method"], lines[0]["id"])
    assert fresh[first]["answer"] != "stale" and fresh[first]["em"] in (0.0, 1.0)
    assert (out / "results.jsonl.bak").exists() and "python -m eval.rescore" in (out / "report.md").read_text()


def test_accelerate_launch_with_two_processes_equals_one_process(tiny_dir, dataset, reference_run, tmp_path):
    """`accelerate launch -m autopatch eval` shards the run by the launcher's ranks (two CPU processes here): one
    run directory, no line twice, the single process's lines."""
    import subprocess
    import sys

    out = tmp_path / "launched"
    argv = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(out),
            "--methods", METHODS, "--batch-size", "4", "--budget", "3", "--cot-budget", "4", "--quiet", "--threads", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "autopatch", *argv]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.rank0.jsonl", "results.rank1.jsonl"]
    rows = read_results(out)
    keys = [(r["method"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {k: r["continuation"] for k, r in _lines(out).items()} == \
        {k: r["continuation"] for k, r in _lines(reference_run).items()}
    assert json.loads((out / "summary.json").read_text())["n_questions"] == 6  # rank 0 merged and reported


@pytest.mark.parametrize("method", ["autopatch", "autopatch-model"])
def test_a_method_that_runs_the_gate_is_refused_without_one_never_run_ungated(tiny_dir, dataset, tmp_path, capsys,
                                                                               method):
    from eval.methods import METHODS as REGISTERED

    assert REGISTERED[method].needs_gate
    argv = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(tmp_path / "g"),
            "--methods", f"vanilla,{method}", "--batch-size", "4", "--budget", "3", "--quiet"]
    assert main(argv) == 2  # the tiny model has no gate of its own
    assert f"`{method}` runs it" in capsys.readouterr().err


def test_a_strategy_registered_after_import_is_an_eval_method(tiny_dir, dataset, tmp_path):
    from autopatch.registry import STRATEGIES, StrategySpec, register_strategy
    from eval.methods import METHODS as REGISTERED
    from eval.methods import default_methods

    name = "decompose-again"
    register_strategy(StrategySpec(name, "decompose under another name: a plug-in added at run time",
                                   "autopatch.strategies:build_decompose", uses_state=False))
    try:
        assert REGISTERED[name].kind == "baseline" and name in default_methods()
        out = tmp_path / "plugin"
        argv = ["eval", "--dataset", str(dataset), "--split", "all", "--model", str(tiny_dir), "--out", str(out),
                "--methods", f"vanilla,decompose,{name}", "--batch-size", "4", "--budget", "3", "--quiet"]
        assert main(argv) == 0
        lines = _lines(out)
        ours = {i: r["continuation"] for (m, i), r in lines.items() if m == name}
        assert len(ours) == 6 and ours == {i: r["continuation"] for (m, i), r in lines.items() if m == "decompose"}
    finally:
        del STRATEGIES[name]
    assert name not in REGISTERED
