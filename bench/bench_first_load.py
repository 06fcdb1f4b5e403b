"""An embedded model's first load, straight from the GGUF file and by the float32 route, and its later load, in one run.

Example:
    $ python bench/bench_first_load.py --model qwen2.5-coder-1.5b-instruct

Rows, each a fresh process (so none inherits another's imports or page cache of Python objects), timed from
outside with its peak RSS:

* ``load_model``, first: ``autopatch.load_model(model)`` in the model's default CPU mode into an empty cache. It
  reads the GGUF file straight into the quantized model (:mod:`autopatch.gguf_quantized`). What a user waits for.
* ``load_model``, later: the same call again, on the cache the first one left.
* the float32 route, into another empty cache: the GGUF file unpacked into the float32 cache
  (``embedded_model_dir``), then ``load_model`` quantizes it and caches the quantized layers. The first load before
  the direct route.
* the unpack alone with ``one_pass`` replaced by a no-op ("transformers alone"), into a third empty cache; its
  float32 cache and the float32 route's are compared tensor by tensor, bit for bit, and so are the quantized layers
  of the first row and of the float32 route.
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
elif sys.argv[2].startswith("float32"):
    loading.embedded_model_dir(sys.argv[1])
    autopatch.load_model(sys.argv[1])
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


def same_tensors(a: Path, b: Path, *, subset: bool = False) -> tuple[int, list[str]]:
    """How many tensors of ``a`` were compared with ``b``'s, and the names that differ (all of ``a``'s names must be
    in ``b``; with ``subset=False`` the names must be the same)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as x, safe_open(str(b), "pt") as y:
        if not set(x.keys()) <= set(y.keys()) or (not subset and set(x.keys()) != set(y.keys())):
            return 0, ["the tensor names differ"]
        differ = [k for k in x.keys() if not torch.equal(x.get_tensor(k).view(torch.uint8), y.get_tensor(k).view(torch.uint8))]
        return len(list(x.keys())), differ


def _quantized_file(cache: Path) -> Path:
    return next((cache / "quantized").glob("*/weights.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="gemma-3-270m", help="an embedded model's name")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="first-load-") as tmp:
        direct, route, theirs = Path(tmp) / "direct", Path(tmp) / "float32", Path(tmp) / "transformers"
        for variant, cache in (("load_model, first (empty cache)", direct), ("load_model, later", direct),
                               ("float32 route: unpack, then load_model", route),
                               ("unpack only, transformers alone", theirs)):
            rows.append((variant, *unpack(args.model, variant, cache)))
        count, differ = same_tensors(*(cache / args.model / "model.safetensors" for cache in (route, theirs)))
        layers, layers_differ = same_tensors(_quantized_file(route), _quantized_file(direct), subset=True)
    print(f"model {args.model}: each row a fresh process; the first, third and fourth into an empty cache\n")
    print("| row | wall s | peak RSS GB | steps |")
    print("|---|---|---|---|")
    for variant, wall, peak, steps in rows:
        print(f"| {variant} | {wall:.1f} | {peak:.1f} | {steps} |")
    print(f"\nfloat32 caches of the last two rows, {count} tensors compared bit for bit: "
          f"{'all identical' if not differ else f'{len(differ)} differ: {differ[:5]}'}")
    print(f"quantized layers of the float32 route and of the first row, {layers} tensors compared bit for bit: "
          f"{'all identical' if not layers_differ else f'{len(layers_differ)} differ: {layers_differ[:5]}'}")
    differ = differ + layers_differ
    count = min(count, layers)
    return 0 if count and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
