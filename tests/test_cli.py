"""The command line: fast parsing without torch, threads, early refusals, and what the first unpack prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autopatch.cli import build_parser, main, physical_cores


def test_parsing_every_subcommand_never_imports_torch():
    code = ("import sys; from autopatch.cli import build_parser; p = build_parser(); "
            "[p.parse_args(a) for a in (['eval', '--out', 'x'], ['generate', 'q'], ['serve'], ['train-gate', '--out', 'x'])]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", [["eval", "--out", "x"], ["generate", "q"], ["serve"], ["demo"],
                                     ["train-gate", "--out", "x"]])
def test_every_subcommand_takes_threads_defaulting_to_physical_cores(command):
    assert build_parser().parse_args(command).threads == physical_cores()
    assert build_parser().parse_args([*command, "--threads", "1"]).threads == 1


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 16)" in capsys.readouterr().out


def test_train_gate_on_a_test_split_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import autopatch.loading

    monkeypatch.setattr(autopatch.loading, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert main(["train-gate", "--train", "twohop:test", "--out", str(tmp_path)]) == 2
    assert "never trains or tunes on a test split" in capsys.readouterr().err
    assert main(["train-gate", "--train", "twohop:train:0", "--out", str(tmp_path)]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_first_unpack_prints_a_line_per_step(capsys):
    from autopatch.loading import _Steps

    step = _Steps("unpack", 2)
    step("assembled")
    step("done")
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[0] for line in err] == ["autopatch: unpack [1/2", "autopatch: unpack [2/2"]
