"""The README's two fresh-machine commands stay true: CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    quick_start = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    venv = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    main_job, tests = commands
    # the main job installs the package alone (faster on a fresh machine); the tests need the test extras
    assert main_job.startswith(venv + "pip install -e . && autopatch ")
    assert tests.startswith(venv + 'pip install -e ".[test]" && ')


def test_ci_runs_the_readme_test_command():
    test_command = _readme_commands()[1].split(" && ")[-1]
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()]
    runs = [line for line in ci_lines if line == test_command or line.startswith(test_command + " 2>&1 | tee ")]
    assert len(runs) == 1


def test_readme_commands_never_write_tracked_files():
    text = ROOT.joinpath("README.md").read_text()
    commands = re.findall(r"`(autopatch [^`]+)`", text) + re.findall(r"^\$ (autopatch .+?)(?:\s+#.*)?$", text, re.M)
    assert commands
    for command in commands:
        out = re.search(r"--out (\S+)", command)
        assert not (out and out.group(1).startswith(("docs/", "autopatch/", "classifiers/", "eval/"))), command
        assert "--ship" not in command, command  # replaces tracked gate files: documented, never suggested as-is
