"""The ``autopatch`` command line.

Example:
    $ autopatch demo                      # token-identity decoding of hidden states on the embedded Gemma
    $ autopatch demo --model /path/to/model --text "I visited Paris" --layers 1,4,8

Each subcommand lives in a small function; later modules register more
subcommands through :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say its default, and never "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def subcommand(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args) -> exit code`` as ``autopatch <name>``."""

    def register(fn: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (help_text, configure, fn)
        return fn

    return register


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="an embedded model (gemma-3-270m, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct), "
                             "a local path or an HF id (default: gemma-3-270m)")
    add_quantize_arg(parser)


def add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    """``--quantize MODE``: checked when the model loads, so a refusal names the modes that work on this machine."""
    parser.add_argument("--quantize", default=None, metavar="MODE",
                        help="int4 (4-bit weights where exact, else int8; float32 activations; CPU), int4-all "
                             "(4-bit weights everywhere), int8, int4-bf16 and int8-bf16 (their weights, a prefill's "
                             "matmuls in bfloat16 on a CPU with AMX or AVX512-BF16), int4-q8 and int8-q8 (their weights, every "
                             "matmul's activations rounded to int8 per 32 inputs), int4-q8-floatdown (int4-q8, the MLP "
                             "down-projections' inputs float32), int8-dynamic, or none "
                             "(float32); default: the model's measured CPU default (docs/quantization.md)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="in a -bf16 or -q8 mode, give every prompt the answer it gets alone, whatever its "
                             "batch (attention per row; under a bfloat16 prefill fixed GEMM blocks, which cost "
                             "prefill time)")


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share a core's arithmetic units, so they do not speed up matmuls)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return max(1, cores or os.cpu_count() or 1)


def _add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=physical_cores(),
                        help="torch CPU threads; on a machine that is busy with other work, 1 is often fastest")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (and the environment that worker processes inherit)."""
    if not threads:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--text", action="append", help="source text(s); the state of the last token is decoded")
    parser.add_argument("--layers", default="1,3,6,9,12", help="comma-separated decoder layers to read")


@subcommand("demo", "capture hidden states and decode them with the token-identity Patchscope", _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    import torch

    from autopatch import capture, load_model, num_layers
    from autopatch.patchscope import IDENTITY_PROMPT, decode_state

    started = time.perf_counter()
    model, tok = load_model(args.model, quantize=args.quantize, batch_invariant=args.batch_invariant)
    print(f"loaded {model.config.model_type} ({num_layers(model)} layers) in {time.perf_counter() - started:.1f}s")
    layers = [int(x) for x in args.layers.split(",")]
    texts = args.text or ["I visited Paris", "The Colosseum is located in the country of"]
    print(f"identity prompt: {IDENTITY_PROMPT!r}")
    for text in texts:
        enc = tok(text, return_tensors="pt").to(model.device)
        with torch.no_grad(), capture(model, layers=layers, positions=[-1]) as cap:
            model(**enc)
        print(f"\nsource: {text!r} (last token {tok.convert_ids_to_tokens(enc.input_ids[0, -1:].tolist())[0]!r})")
        for layer in layers:
            top = decode_state(model, tok, cap.states[layer][0, 0], layer=layer, k=3)
            shown = ", ".join(f"{t!r} {p:.2f}" for t, p in top)
            print(f"  layer {layer:2d}: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    _import_plugins()
    parser = argparse.ArgumentParser(prog="autopatch", description="Inference-time multi-hop correction for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure, fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_DefaultsFormatter)
        configure(p)
        _add_threads_arg(p)
        p.set_defaults(run=fn)
    return parser


def _import_plugins() -> None:
    """Import modules that register subcommands; missing optional parts are skipped."""
    import importlib

    for module in ("autopatch.cli_generate", "eval.cli", "classifiers.cli", "server.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autopatch`` console script."""
    from autopatch.errors import AutopatchError

    args = build_parser().parse_args(argv)
    apply_threads(getattr(args, "threads", None))
    try:
        return int(args.run(args) or 0)
    except AutopatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run the registered copy of this module, not __main__'s
    from autopatch.cli import main as registered_main

    sys.exit(registered_main())
