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


def test_the_ceiling_packs_the_batched_runs_own_decode_rows_into_full_steps():
    one = [(1, 30, 1.0), *[(1, 1, 0.1)] * 6]  # a lone run: one 30-token prefill, 6 decode steps
    batched = [(2, 10, 1.5), (2, 1, 0.15), (1, 1, 0.1), (1, 1, 0.1)]  # its batch: 20 prompt tokens, 4 row-steps
    lines = bench_server.ceiling(one, batched, 2)
    assert "| batches of 2 | 1 | 20 | 1.50 | 3 | 4 | 0.35 |" in lines
    assert lines[-1].endswith("its 4 decode row-steps in full steps of 2: 1.80 s of forward passes against 1.60 s "
                              "one at a time, at most 0.89x.")
