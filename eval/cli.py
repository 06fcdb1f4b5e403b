"""``autopatch eval``: run methods on a dataset and write the report.

Example:
    $ autopatch eval --dataset twohop --split test --methods vanilla,patch,control-random --out runs/demo --limit 40
    $ autopatch eval --dataset twohop --split test --out runs/sharded --num-processes 2
    $ torchrun --nproc_per_node 2 -m autopatch eval ...      # or accelerate launch on GPUs

Data parallelism: each process takes every N-th batch (``RANK``/``WORLD_SIZE``
from torchrun or ``accelerate launch``, or local workers started by
``--num-processes``), writes its own results file, and marks itself done; rank
0 waits for every mark, then merges and reports. Re-running the same command resumes an interrupted run. The output directory
remembers its settings (``config.json``); a command with any other setting,
``--methods`` included, is refused before the model loads. ``--add-methods``
adds methods to an existing run (every other setting must match), and each
command that wrote into the run is kept in ``config.json`` and the report.

Selection: a dataset file is evaluated whole unless ``--split`` is given;
``twohop`` and ``musique`` default to their test split. What was filtered,
and why, is printed and stored in ``config.json`` under ``selection``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from autopatch.cli import _add_model_arg, _positive_int, subcommand
from autopatch.errors import AutopatchError
from eval.dataset_registry import datasets
from eval.methods import METHODS, default_methods


class EvalConfigError(AutopatchError, ValueError):
    """The evaluation request is inconsistent (unknown method, a reused output directory, ...)."""


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="twohop",
                        help="twohop, musique (bundled MuSiQue-Ans dev), harm (do-no-harm requests), handwritten "
                             "(hand-written two-hop), hf:<hub-id>, or a JSON/JSONL file in the MuSiQue schema")
    parser.add_argument("--split", default=None,
                        help="twohop: train/dev/test; musique: calib/test; a file: all, or calib/test by meta.split "
                             "or the MuSiQue id rule (default: test for twohop and musique, all for a file)")
    parser.add_argument("--hops", type=int, default=None,
                        help="keep questions with this many hops (0 = all; default: all for harm, else 2)")
    parser.add_argument("--methods", default=",".join(default_methods()), help=f"comma-separated; known: {', '.join(METHODS)}")
    parser.add_argument("--add-methods", action="store_true",
                        help="add --methods to an existing run directory whose other settings match")
    parser.add_argument("--out", required=True, help="run directory (resumable)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="evaluate a deterministic stratified sample of N questions (default: all)")
    _add_model_arg(parser)
    parser.add_argument("--profile", default=None, help="a patch profile JSON file (default: resolved for the model)")
    parser.add_argument("--gate", default=None,
                        help="a gate directory for `autopatch` (default: the gate shipped for the model)")
    parser.add_argument("--source-model", default=None,
                        help="a second model attached for the cross-model strategy (autopatch.crossmodel), in the "
                             "same --quantize mode")
    parser.add_argument("--state-map", default=None,
                        help="the source-to-model state map directory (default: the one shipped for the pair)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budget", type=int, default=16, help="new tokens for direct-answer methods")
    parser.add_argument("--cot-budget", type=int, default=48, help="new tokens for chain-of-thought methods")
    parser.add_argument("--no-hops", action="store_true", help="skip the hop-1/hop-2 diagnostics (no gap subset)")
    parser.add_argument("--use-decomposition", action="store_true", help="let the locator use gold decompositions")
    parser.add_argument("--no-gold-scores", action="store_true", help="skip teacher-forced gold log-probabilities")
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress lines")
    parser.add_argument("--repair", action="store_true",
                        help="set damaged or edited result lines aside (into results*.jsonl.bak) and recompute them, "
                             "instead of stopping at the first one")
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel local worker processes")


def _check_source_model(args: argparse.Namespace, methods: list[str]) -> None:
    """A method whose strategy needs a second model is refused, before anything loads, when none is given."""
    from autopatch.registry import STRATEGIES

    needing = [m for m in methods if m in STRATEGIES and STRATEGIES[m].needs_source_model]
    if needing and not args.source_model:
        raise EvalConfigError(f"{', '.join(needing)} patches from a second model: pass --source-model NAME (and "
                              "--state-map DIR unless a map is shipped for the pair).")
    if args.state_map and not args.source_model:
        raise EvalConfigError("--state-map maps a --source-model's states; pass --source-model too.")


def _attach_source(model, args: argparse.Namespace) -> None:
    """Load ``--source-model`` in the run's mode and attach it to ``model`` through its state map."""
    from autopatch import load_model
    from autopatch.crossmodel import StateMap, attach, shipped_map

    source, _ = load_model(args.source_model, quantize=args.quantize)
    if args.state_map:
        state_map = StateMap.load(args.state_map, source=source, target=model)
    else:
        found = shipped_map(model, source)
        if found is None:
            raise EvalConfigError(f"No state map is shipped from {args.source_model} to this model: fit one with "
                                  "`python -m eval.fit_state_map` and pass --state-map DIR.")
        state_map = found[0]
    attach(model, source, state_map)
    print(f"cross-model: {args.source_model} layer {state_map.source_layer} -> layer {state_map.target_layer} "
          f"(held-out R² {state_map.meta.get('held_out_r2', float('nan')):.3f})", file=sys.stderr)


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


SETTINGS = ("dataset", "split", "hops", "limit", "model", "quantize", "batch_size", "budget", "cot_budget",
            "use_decomposition", "methods", "profile_file", "gate_file", "source_model", "state_map")


def _resolved_quantize(model: str | None, quantize: str | None) -> str | None:
    """The mode the run will use (``None`` for float32, as runs recorded before quantization existed)."""
    from autopatch.quantize import default_mode

    mode = quantize if quantize is not None else default_mode(model)
    return None if mode == "none" else mode


def _resolved_split(dataset: str, split: str | None) -> str | None:
    """``None`` means every record; named datasets default to their test split."""
    if split == "all":
        return None
    spec = datasets().get(dataset.strip().lower())
    return spec.default_split if split is None and spec is not None else split


def _resolved_hops(dataset: str, hops: int | None) -> int:
    """A named dataset's own default (the do-no-harm set: 0, every kind of request), else the 2-hop questions."""
    spec = datasets().get(dataset.strip().lower())
    return hops if hops is not None else (spec.default_hops if spec is not None else 2)


def check_run_dir(out: Path, settings: dict, *, add_methods: bool = False) -> list[str]:
    """Refuse ``out`` when it holds a run with other settings; return the methods the run will hold.

    Called before the model loads. With ``add_methods`` the methods may grow (never shrink).
    """
    path = out / "config.json"
    if not path.exists():
        return list(settings["methods"])
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalConfigError(f"{path} is unreadable ({err}); use a new --out directory.") from None
    changed = [k for k in SETTINGS if k != "methods" and previous.get(k) != settings.get(k)]
    old_methods = list(previous.get("methods", []))
    new_methods = list(settings["methods"])
    if add_methods:
        methods = list(dict.fromkeys(old_methods + new_methods))
    else:
        methods = new_methods
        if set(old_methods) != set(new_methods):
            changed.append("methods")
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
        hint = ("use a new --out directory, or the original settings to resume"
                + ("; pass --add-methods to add methods to this run" if changed == ["methods"] else ""))
        raise EvalConfigError(f"{out} holds a run with different settings ({detail}); {hint}.")
    return methods


def _write_config(out: Path, config: dict, command: str) -> list[str]:
    """Write ``config.json``, keeping every command that wrote into this run; return those commands."""
    path = out / "config.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    commands = list(previous.get("commands", []))
    if command not in commands:
        commands.append(command)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**config, "commands": commands}, indent=2) + "\n")
    return commands


@subcommand("eval", "evaluate methods (baselines, patching, controls, oracles) on a dataset", _configure)
def run_eval_command(args: argparse.Namespace) -> int:
    args.hops = _resolved_hops(args.dataset, args.hops)
    # hop diagnostics ask a 2-hop question's two hops: a set of other requests has none
    methods = _methods(args.methods, with_hops=not args.no_hops and args.hops == 2)
    split = _resolved_split(args.dataset, args.split)
    out = Path(args.out)
    settings = {"dataset": args.dataset, "split": split or "all", "hops": args.hops, "limit": args.limit,
                "model": args.model, "quantize": _resolved_quantize(args.model, args.quantize),
                "batch_size": args.batch_size, "budget": args.budget, "cot_budget": args.cot_budget,
                "use_decomposition": args.use_decomposition, "methods": methods, "profile_file": args.profile,
                "gate_file": args.gate, "source_model": args.source_model, "state_map": args.state_map,
                **({"batch_invariant": True} if args.batch_invariant else {})}  # absent in runs made without it
    _check_source_model(args, methods)
    methods = check_run_dir(out, settings, add_methods=args.add_methods)  # before anything slow
    if not args.repair:
        from eval.runner import read_results

        read_results(out)  # a damaged or edited line is named now, not after the model has loaded
    settings["methods"] = methods
    if args.num_processes > 1:
        return _spawn_workers(args)

    from eval.datasets import select_records
    from eval.sweep import stratified_sample

    records, selection = select_records(args.dataset, split=split, hops=args.hops or None)
    sampled = stratified_sample(records, args.limit)
    print(f"data: {selection.describe()}" + (f"; sampled {len(sampled)} (--limit {args.limit})"
                                            if len(sampled) < len(records) else ""), file=sys.stderr)
    if not sampled:
        raise EvalConfigError(f"Nothing to evaluate: {selection.describe()}.")
    records = sampled

    import torch

    from autopatch import load_model
    from eval.methods import build_context
    from eval.report import report_markdown, write_report
    from eval.runner import run_eval, shard_info
    from eval.sweep import default_grid, run_sweep

    torch.set_grad_enabled(False)
    explicit_methods = args.methods != ",".join(default_methods())
    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    from autopatch.resolve import resolve

    resolution = resolve(model, tok, profile=args.profile, gate=args.gate)
    gate = resolution.gate if resolution.gate_source != "default" else None
    gated = [m for m in methods if METHODS[m].needs_gate]
    if gated and gate is None:
        named = ", ".join(f"`{m}`" for m in gated)
        if explicit_methods:
            raise EvalConfigError(f"No gate for this model (none shipped, or the shipped one was refused), and {named} "
                                  "runs it: train one with `autopatch train-gate` and pass --gate, or leave "
                                  f"{named} out of --methods.")
        print(f"note: no gate for this model; {named} left out", file=sys.stderr)
        methods = [m for m in methods if m not in gated]
        settings["methods"] = methods
    profile = resolution.profile if resolution.profile_source in ("argument", "file") else None
    if args.source_model:
        _attach_source(model, args)
    ctx = build_context(model, tok, profile=profile, gate=gate, budget=args.budget, cot_budget=args.cot_budget,
                        use_decomposition=args.use_decomposition, gold_scores=not args.no_gold_scores)
    rank, world = shard_info()
    config = {**settings, "profile": ctx.profile.to_dict(), "resolution": resolution.to_dict(),
              "strategy_profiles": {k: v.to_dict() for k, v in ctx.strategy_profiles.items()},
              "selection": {**selection.to_dict(), "evaluated": len(records)}}
    command = "autopatch " + " ".join(_argv_from(args))
    commands = [command]
    if rank == 0:
        commands = _write_config(out, config, command)
    run_eval(ctx, records, methods, out, batch_size=args.batch_size, progress=not args.quiet, repair=args.repair)
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
        shown = "\n".join(commands)
        summary = write_report(out, shown)
        print(report_markdown(summary, shown))
        print(f"wrote {out}/summary.json, {out}/report.md, {out}/accuracy.png")
    return 0


def _wait_for_ranks(out: Path, world: int, timeout_s: float = 24 * 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not all((out / f"done.rank{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise EvalConfigError(f"Gave up waiting for all {world} ranks to finish in {out}.")
        time.sleep(1.0)


def _spawn_workers(args: argparse.Namespace) -> int:
    """``--num-processes N``: this same command under ``accelerate launch`` with N processes (the one mechanism:
    each process reads its rank from the launcher's environment, :func:`eval.runner.shard_info`), then the
    report here. Rank 0 of the launched run waits for the others and merges their files."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for marker in out.glob("done.rank*"):
        marker.unlink()
    per_worker = max(1, args.threads // args.num_processes)  # no oversubscription
    argv = [*_argv_from(args), "--threads", str(per_worker)]
    env = dict(os.environ, OMP_NUM_THREADS=str(per_worker), AUTOPATCH_WORKER="1")
    # torchrun's launcher (accelerate's "multi_gpu" mode) starts the processes; on a machine without GPUs they run on
    # the CPU, and nothing here opens a process group: the shards are fixed by rank before anything runs.
    code = subprocess.call([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                            str(args.num_processes), "--num_machines", "1", "--mixed_precision", "no",
                            "--dynamo_backend", "no", "-m", "autopatch", *argv], env=env)
    if code:
        raise EvalConfigError(f"The launched processes exited with {code}; re-run the same command to resume.")
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
        if key in ("run", "command", "num_processes", "threads") or value is None or value is False:
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
