"""An embedded model's first load, with and without :mod:`autopatch.gguf_read`, and its later load, in one run.

Example:
    $ python bench/bench_first_load.py --model qwen2.5-coder-1.5b-instruct

Rows, each a fresh process (so none inherits another's imports or page cache of Python objects), timed from
outside with its peak RSS:

* ``load_model``, first: ``autopatch.load_model(model)`` in the model's default CPU mode into an empty cache: the
  GGUF file unpacked to the float32 cache, then quantized once into the quantized cache. What a user waits for.
* ``load_model``, later: the same call again, on the caches the first one left.
* the unpack alone (GGUF file to float32 cache) with ``one_pass`` replaced by a no-op ("transformers alone"),
  into another empty cache; its float32 cache and the first row's are compared tensor by tensor, bit for bit.
The disk's write speed varies from run to run (the 6 GB float32 cache of the 1.5B took 8 to 30 s to write here),
so the step times each variant prints are part of the output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
import autopatch, autopatch.loading as loading
if sys.argv[2].startswith("unpack"):
    from contextlib import nullcontext
    loading.one_pass = nullcontext
    loading.embedded_model_dir(sys.argv[1])
else:
    autopatch.load_model(sys.argv[1])
import resource
print(f"peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""
STEP_LINE = ("unpack [", "autopatch: quantized ")


def unpack(model: str, variant: str, cache: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GB and the step lines of one fresh-process row ``variant`` in ``cache``."""
    env = {**os.environ, "AUTOPATCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("AUTOPATCH_QUANTIZED_CACHE", None)  # the quantized cache too, under the empty cache
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, model, variant], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{variant}: the unpack failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("peak_rss_kb=", 1)[1].split()[0]) / 2**20
    steps = "; ".join(line.split("] ", 1)[-1].removeprefix("autopatch: ")
                      for line in done.stderr.splitlines() if any(mark in line for mark in STEP_LINE))
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
    rows = []
    with tempfile.TemporaryDirectory(prefix="first-load-") as tmp:
        ours, theirs = Path(tmp) / "autopatch", Path(tmp) / "transformers"
        for variant, cache in (("load_model, first (empty cache)", ours), ("load_model, later", ours),
                               ("unpack only, transformers alone", theirs)):
            rows.append((variant, *unpack(args.model, variant, cache)))
        count, differ = same_tensors(*(cache / args.model / "model.safetensors" for cache in (ours, theirs)))
    print(f"model {args.model}: each row a fresh process; the first into an empty cache\n")
    print("| row | wall s | peak RSS GB | steps |")
    print("|---|---|---|---|")
    for variant, wall, peak, steps in rows:
        print(f"| {variant} | {wall:.1f} | {peak:.1f} | {steps} |")
    print(f"\nfloat32 caches of the first and last rows, {count} tensors compared bit for bit: "
          f"{'all identical' if not differ else f'{len(differ)} differ: {differ[:5]}'}")
    return 0 if count and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
