"""Run methods over a dataset into an append-only JSONL that resumes after interruption.

Example:
    >>> from eval.runner import run_eval
    >>> run_eval(ctx, records, ["vanilla", "patch"], out_dir=Path("runs/demo"), batch_size=16)

One line per (method, question) in ``results.jsonl`` (``results.rank{r}.jsonl``
when sharded), holding every input needed to audit it: the final prompt, the
continuation, the extracted answer, the golds, the scores and the patch report.

Batching: records are ordered by the tokenized length of their prompt
(longest first, ties in dataset order; :func:`order_by_length`) and cut into
batches, so each batch holds prompts of similar length and pads little. Lines
are keyed by (method, id), so nothing downstream depends on that order.

Order of work: batch by batch, every method of a batch before the next, so
a run stopped early holds whole questions (every method) and its report
(``python -m eval.rescore``) covers the questions done.

Determinism: the order and the batches are fixed *before* sharding or
resuming, so every question is always generated inside the same batch (same
padding) whatever the number of processes or interruptions. A batch with any
missing line is re-run and only its missing lines are written, so a resumed
run loses nothing and duplicates nothing. (A run begun before length ordering,
with batches in dataset order, resumes with length-ordered batches: its
missing lines get other batch neighbours, which changes nothing but padding.)

Progress: unless ``progress=False`` (``--quiet``), one line per batch on
stderr: lines done / total, time elapsed, and a rough estimate of the time left
at this session's average rate (methods differ in cost, so it is rough).

Sharding: under ``accelerate launch`` (or with ``rank``/``world_size``) each
process takes every ``world_size``-th batch; the report merges the files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from eval.datasets import QARecord
from eval.integrity import check_same_file, read_checked, seal, writer_lock
from eval.integrity import repair as integrity_repair
from eval.jsonl import repair_tail
from eval.methods import METHODS, EvalContext, hop_questions, record_prompt
from eval.metrics import score_continuation


def results_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / ("results.jsonl" if world_size == 1 else f"results.rank{rank}.jsonl")


def read_results(out_dir: Path) -> list[dict]:
    """Every result of every results file in ``out_dir`` (a torn last line is skipped; a damaged or edited line
    raises :class:`~eval.integrity.ResultsFileError` naming it)."""
    return [row for path in sorted(Path(out_dir).glob("results*.jsonl")) for row in read_checked(path)]


def _done(path: Path) -> set[tuple[str, str]]:
    return {(row["method"], row["id"]) for row in read_checked(path)}


def shard_info() -> tuple[int, int]:
    """``(rank, world_size)`` from accelerate / torchrun environment variables, else ``(0, 1)``."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return rank, world


def batches(records: Sequence[QARecord], batch_size: int) -> list[list[QARecord]]:
    return [list(records[i : i + batch_size]) for i in range(0, len(records), batch_size)]


def order_by_length(ctx: EvalContext, records: Sequence[QARecord]) -> list[QARecord]:
    """``records`` by the tokenized length of their prompt in the run's query format, longest first (ties: dataset
    order), so that the batches cut from them pad little. Deterministic for a given tokenizer and format."""
    lengths = [len(ctx.fmt.encode(ctx.tok, record_prompt(ctx, r)).input_ids[0]) for r in records]
    return [records[i] for i in sorted(range(len(records)), key=lambda i: (-lengths[i], i))]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _Progress:
    """One line per batch: lines done / total, elapsed, and the time left at this session's average rate."""

    def __init__(self, total: int, done: int, label: str, enabled: bool):
        self.total, self.done, self.label, self.enabled = total, done, label, enabled
        self.generated, self.started = 0, time.perf_counter()

    def update(self, method: str, n: int) -> None:
        self.done += n
        self.generated += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        left = (self.total - self.done) * elapsed / self.generated if self.generated else float("nan")
        print(f"{self.label} {method}: {self.done}/{self.total} lines, {_clock(elapsed)} elapsed, "
              f"ETA {_clock(left) if left == left else '?'} left", file=sys.stderr, flush=True)


def golds_for(method: str, record: QARecord) -> list[str]:
    """The golds a method is scored against (hop 1 is scored against the bridge)."""
    if method == "hop1":
        return hop_questions(record)[1]
    if method == "hop2":
        return hop_questions(record)[3]
    return list(record.golds)


def run_eval(ctx: EvalContext, records: Sequence[QARecord], methods: Sequence[str], out_dir: Path, *,
             batch_size: int = 16, rank: int | None = None, world_size: int | None = None,
             progress: bool = True, repair: bool = False, length_order: bool = True) -> Path:
    """Generate every (method, record) line not yet written; return this process's results file.

    Lines are sealed with a checksum (:mod:`eval.integrity`); a damaged line stops the run with its line number
    unless ``repair`` sets the damaged lines aside first. A second process writing the same file is refused.
    ``length_order=False`` cuts the batches in dataset order instead of :func:`order_by_length`'s.
    """
    env_rank, env_world = shard_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, rank, world_size)
    with writer_lock(path):
        if repair:
            dropped = integrity_repair(path)
            if dropped:
                print(f"repair: set aside {len(dropped)} damaged line(s) of {path} (lines {dropped[:10]}); the "
                      f"original is {path.name}.bak", flush=True)
        repair_tail(path)
        ordered = order_by_length(ctx, records) if length_order else list(records)
        return _generate(ctx, ordered, methods, path, _done(path), batch_size, rank, world_size, progress)


def _generate(ctx: EvalContext, records: Sequence[QARecord], methods: Sequence[str], path: Path,
              done: set[tuple[str, str]], batch_size: int, rank: int, world_size: int, progress: bool) -> Path:
    generating = [m for m in methods if METHODS[m].run is not None]
    mine = batches(records, batch_size)[rank::world_size]
    total = sum(len(b) for b in mine) * len(generating)
    todo = sum(1 for b in mine for m in generating for r in b if (m, r.id) not in done)
    bar = _Progress(total, total - todo, f"eval[{rank}]", progress)
    with path.open("a") as sink:
        for batch in mine:  # batch by batch, every method of a batch before the next: a stopped run holds whole questions
            for name in generating:
                method = METHODS[name]
                if method.run is None:  # never: generating holds only methods with a run
                    continue
                missing = [r for r in batch if (name, r.id) not in done]
                if not missing:
                    continue
                results = method.run(ctx, batch)  # the whole batch: same padding as an uninterrupted run
                check_same_file(sink, path)
                for record, result in zip(batch, results):
                    if (name, record.id) in done:
                        continue
                    golds = golds_for(name, record)
                    row = {
                        "method": name, "id": record.id, "question": record.question, "golds": golds,
                        "kind": record.meta.get("kind"), "hops": record.hops,
                        "bridge_golds": [record.question_decomposition[0].answer] if record.hops == 2 else [],
                        "prompt": result.prompt, "continuation": result.continuation,
                        **score_continuation(result.continuation, golds, cot=method.cot),
                        "n_tokens": result.n_tokens, "seconds": result.seconds, "patched": result.patched,
                        "gold_logprob": result.gold_logprob, "gold_rank": result.gold_rank,
                        "report": result.report,
                    }
                    sink.write(json.dumps(seal(row)) + "\n")
                    done.add((name, record.id))
                sink.flush()
                os.fsync(sink.fileno())
                bar.update(name, len(missing))
    return path


def iter_methods_rows(rows: Sequence[dict]) -> Iterator[tuple[str, dict[str, dict]]]:
    """``(method, {id: row})`` with duplicates (from re-runs) resolved to the first line."""
    by_method: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {}).setdefault(row["id"], row)
    yield from by_method.items()
