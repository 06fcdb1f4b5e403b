"""``bench/bench_server.py`` and ``bench/bench_http.py`` on a tiny random model: their mechanics (client processes,
the worker's batches, the table, the connection's TCP_NODELAY), not their speed."""

from __future__ import annotations

import pytest

from bench import bench_server


@pytest.mark.parametrize("clients", ["processes", "threads"])
def test_the_server_bench_runs_its_clients_and_reports_every_answer_identical(capsys, clients):
    assert bench_server.main(["--tiny", "--requests", "4", "--concurrency", "1,2", "--threads", "1",
                              "--clients", clients]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"| autopatch serve + openai client {clients}")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| 4/4 |") for row in rows)
    assert "Batches the server's worker ran (count×size): 1 client(s): 4×1; 2 client(s): " in out


def test_the_http_bench_times_both_kinds_and_sees_nagle_off(capsys):
    from bench import bench_http

    assert bench_http.main(["--requests", "2", "--max-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "plain: median " in out and "streamed: median " in out
    assert "server side TCP_NODELAY: True" in out
