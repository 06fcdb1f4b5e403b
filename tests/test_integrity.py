"""eval.integrity: a run stops when its results file is replaced under it, instead of writing lines nobody reads."""

from __future__ import annotations

import os

import pytest

from eval.integrity import ResultsFileReplaced, check_same_file


def test_a_results_file_replaced_or_removed_under_the_writer_stops_the_run(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "vanilla", "id": "a"}\n')
    with path.open("a") as sink:
        check_same_file(sink, path)  # the same file: nothing to say
        sink.write('{"method": "vanilla", "id": "b"}\n')
        replacement = tmp_path / "checked-out.jsonl"
        replacement.write_text('{"method": "vanilla", "id": "a"}\n')
        os.replace(replacement, path)  # what a git checkout or stash does to a tracked file
        with pytest.raises(ResultsFileReplaced, match="replaced or removed while this run wrote to it.*resumes"):
            check_same_file(sink, path)
        path.unlink()
        with pytest.raises(ResultsFileReplaced):
            check_same_file(sink, path)
