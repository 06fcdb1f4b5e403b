"""``autopatch eval``: run methods on a dataset and write the report.

Example:
    $ autopatch eval --dataset twohop --split test --methods vanilla,patch,control-random --out runs/demo --limit 40
    $ autopatch eval --dataset twohop --split test --out runs/sharded --num-processes 2
    $ torchrun --nproc_per_node 2 -m autopatch eval ...      # or accelerate launch on GPUs

Data parallelism: each process takes every N-th batch (``RANK``/``WORLD_SIZE``
from torchrun or ``accelerate launch``, or local workers started by
``--num-processes``), writes its own results file, and marks itself done; rank
0 waits for every mark, then merges and reports. Re-running the same command resumes an interrupted run. The output directory
remembers its settings (``config.json``); a different command pointed at it
is refused rather than mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from autopatch.cli import _add_model_arg, subcommand
from autopatch.errors import AutopatchError
from eval.methods import DEFAULT_METHODS, METHODS


class EvalConfigError(AutopatchError, ValueError):
    """The evaluation request is inconsistent (unknown method, a reused output directory, ...)."""


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="twohop", help="twohop, musique, or a JSON/JSONL file in the MuSiQue schema")
    parser.add_argument("--split", default="test", help="twohop: train/dev/test; musique: calib/test")
    parser.add_argument("--hops", type=int, default=2, help="keep questions with this many hops (0 = all)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated; known: {', '.join(METHODS)}")
    parser.add_argument("--out", required=True, help="run directory (resumable)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a deterministic stratified sample of N questions")
    _add_model_arg(parser)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=16, help="new tokens for direct-answer methods")
    parser.add_argument("--cot-budget", type=int, default=48, help="new tokens for chain-of-thought methods")
    parser.add_argument("--no-hops", action="store_true", help="skip the hop-1/hop-2 diagnostics (no gap subset)")
    parser.add_argument("--use-decomposition", action="store_true", help="let the locator use gold decompositions")
    parser.add_argument("--no-gold-scores", action="store_true", help="skip teacher-forced gold log-probabilities")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel local worker processes")


def _methods(spec: str, with_hops: bool) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise EvalConfigError(f"Unknown method(s) {unknown}; known methods: {', '.join(METHODS)}.")
    for name in list(names):
        names.extend(n for n in METHODS[name].needs if n not in names)
    if with_hops:
        names.extend(h for h in ("hop1", "hop2") if h not in names)
    return list(dict.fromkeys(names))


def _check_config(out: Path, config: dict) -> None:
    path = out / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        keys = ("dataset", "split", "hops", "limit", "model", "batch_size", "budget", "cot_budget", "use_decomposition",
                "profile")
        changed = [k for k in keys if previous.get(k) != config.get(k)]
        if changed:
            raise EvalConfigError(f"{out} holds a run with different settings ({', '.join(changed)}); "
                                  "use a new --out directory, or the original settings to resume.")
        config["methods"] = list(dict.fromkeys(previous.get("methods", []) + config["methods"]))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


@subcommand("eval", "evaluate methods (baselines, patching, controls, oracles) on a dataset", _configure)
def run_eval_command(args: argparse.Namespace) -> int:
    import torch

    from autopatch import load_model
    from eval.datasets import load_dataset_by_name
    from eval.methods import build_context
    from eval.report import report_markdown, write_report
    from eval.runner import run_eval, shard_info
    from eval.sweep import default_grid, run_sweep, stratified_sample

    torch.set_grad_enabled(False)
    explicit_methods = args.methods != ",".join(DEFAULT_METHODS)
    methods = _methods(args.methods, with_hops=not args.no_hops)
    if args.num_processes > 1:
        return _spawn_workers(args)
    records = load_dataset_by_name(args.dataset, split=None if args.split == "all" else args.split,
                                   hops=args.hops or None)
    records = stratified_sample(records, args.limit)
    if not records:
        raise EvalConfigError(f"No questions in dataset {args.dataset!r} split {args.split!r} with {args.hops} hops.")
    model, tok = load_model(args.model)
    gate = None
    if "autopatch" in methods:
        from classifiers import default_gate_for

        gate = default_gate_for(model)
        if gate is None and explicit_methods:
            raise EvalConfigError("No gate is shipped for this model: train one with `autopatch train-gate`, "
                                  "or leave `autopatch` out of --methods.")
        if gate is None:
            print("note: no gate is shipped for this model; the `autopatch` method is left out", file=sys.stderr)
            methods.remove("autopatch")
    ctx = build_context(model, tok, gate=gate, budget=args.budget, cot_budget=args.cot_budget,
                        use_decomposition=args.use_decomposition, gold_scores=not args.no_gold_scores)
    out = Path(args.out)
    rank, world = shard_info()
    config = {"dataset": args.dataset, "split": args.split, "hops": args.hops, "limit": args.limit, "model": args.model,
              "batch_size": args.batch_size, "budget": args.budget, "cot_budget": args.cot_budget,
              "use_decomposition": args.use_decomposition, "profile": ctx.profile.to_dict(), "methods": methods,
              "strategy_profiles": {k: v.to_dict() for k, v in ctx.strategy_profiles.items()}}
    if rank == 0:
        _check_config(out, config)
    run_eval(ctx, records, methods, out, batch_size=args.batch_size, progress=not args.quiet)
    if "oracle-layers" in methods:
        from autopatch.architectures import num_layers

        mine = records[rank::world]
        run_sweep(model, tok, mine, default_grid(num_layers(model)), out / f"sweep{'' if world == 1 else f'.rank{rank}'}.jsonl",
                  batch_size=args.batch_size, max_new_tokens=args.budget, use_decomposition=args.use_decomposition)
    if world > 1:
        (out / f"done.rank{rank}").write_text("done\n")
        if rank != 0 or os.environ.get("AUTOPATCH_WORKER"):
            return 0
        _wait_for_ranks(out, world)
    if rank == 0:
        if world > 1:
            _merge_sweeps(out)
        command = "autopatch " + " ".join(_argv_from(args))
        summary = write_report(out, command)
        print(report_markdown(summary, command))
        print(f"wrote {out}/summary.json, {out}/report.md, {out}/accuracy.png")
    return 0


def _wait_for_ranks(out: Path, world: int, timeout_s: float = 24 * 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not all((out / f"done.rank{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise EvalConfigError(f"Gave up waiting for all {world} ranks to finish in {out}.")
        time.sleep(1.0)


def _spawn_workers(args: argparse.Namespace) -> int:
    """Run ``--num-processes`` local workers on disjoint shards, then merge and report here."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for marker in out.glob("done.rank*"):
        marker.unlink()
    argv = _argv_from(args)
    procs = []
    for rank in range(args.num_processes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.num_processes), AUTOPATCH_WORKER="1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_processes)))  # no oversubscription
        procs.append(subprocess.Popen([sys.executable, "-m", "autopatch", *argv], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise EvalConfigError(f"Worker exit codes {codes}; re-run the same command to resume.")
    from eval.report import report_markdown, write_report

    _merge_sweeps(out)
    command = "autopatch " + " ".join(argv) + f" (in {args.num_processes} processes)"
    summary = write_report(out, command)
    print(report_markdown(summary, command))
    return 0


def _argv_from(args: argparse.Namespace) -> list[str]:
    """The eval command line of the parsed arguments, without ``--num-processes`` (workers must not re-spawn)."""
    argv = ["eval"]
    for key, value in vars(args).items():
        if key in ("run", "command", "num_processes") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _merge_sweeps(out: Path) -> None:
    parts = sorted(out.glob("sweep.rank*.jsonl"))
    if parts:
        with (out / "sweep.jsonl").open("w") as sink:
            for part in parts:
                sink.write(part.read_text())
