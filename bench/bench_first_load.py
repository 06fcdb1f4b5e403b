"""An embedded model's first load (GGUF file to float32 cache), with and without :mod:`autopatch.gguf_read`, in one run.

Example:
    $ python bench/bench_first_load.py --model qwen2.5-coder-1.5b-instruct

Each variant unpacks the model into its own empty cache in a fresh process (so neither inherits the other's
imports or page cache of Python objects), timed from outside with its peak RSS; then the two caches are compared
tensor by tensor, bit for bit. "transformers alone" is the same conversion with ``one_pass`` replaced by a no-op.
The disk's write speed varies from run to run (the 6 GB float32 cache of the 1.5B took 8 to 30 s to write here),
so the step times each variant prints are part of the output.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
import autopatch.loading as loading
if sys.argv[2] == "transformers alone":
    from contextlib import nullcontext
    loading.one_pass = nullcontext
loading.embedded_model_dir(sys.argv[1])
"""


def unpack(model: str, variant: str, cache: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GB and the step lines of one fresh-process unpack into ``cache``."""
    env = {**os.environ, "AUTOPATCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, model, variant], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{variant}: the unpack failed:\n{done.stderr[-3000:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    steps = "; ".join(line.split("] ", 1)[1] for line in done.stderr.splitlines() if "unpack [" in line)
    return wall, peak, steps


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as x, safe_open(str(b), "pt") as y:
        if sorted(x.keys()) != sorted(y.keys()):
            return 0, ["the tensor names differ"]
        differ = [k for k in x.keys() if not torch.equal(x.get_tensor(k).view(torch.uint8), y.get_tensor(k).view(torch.uint8))]
        return len(list(x.keys())), differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="gemma-3-270m", help="an embedded model's name")
    args = parser.parse_args(argv)
    rows, caches = [], []
    with tempfile.TemporaryDirectory(prefix="first-load-") as tmp:
        for variant in ("autopatch (one_pass)", "transformers alone"):
            cache = Path(tmp) / variant.split()[0]
            rows.append((variant, *unpack(args.model, variant, cache)))
            caches.append(cache / args.model / "model.safetensors")
        count, differ = same_tensors(*caches)
    print(f"model {args.model}: first load, GGUF file to float32 cache, each in a fresh process and empty cache\n")
    print("| variant | wall s | ratio | peak RSS GB | steps |")
    print("|---|---|---|---|---|")
    for variant, wall, peak, steps in rows:
        print(f"| {variant} | {wall:.1f} | {rows[1][1] / wall:.2f}x | {peak:.1f} | {steps} |")
    print(f"\n{count} tensors compared bit for bit: {'all identical' if not differ else f'{len(differ)} differ: {differ[:5]}'}")
    return 0 if count and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
