"""lm-evaluation-harness with autopatch: the ``autopatch`` model and the ``autopatch_*`` tasks, offline.

Example:
    $ pip install -e ".[lm-eval]"
    $ python -m autopatch.lm_eval --model autopatch --model_args pretrained=gemma-3-270m,method=autopatch \\
          --tasks autopatch_twohop --limit 8
    $ python -m autopatch.lm_eval --model autopatch --model_args method=vanilla,render=raw --tasks arc_easy

lm-eval (0.4.13) finds models only through its own registry and tasks through ``--include_path``, so
:func:`main` imports :mod:`eval.lm_harness.model` (which registers ``autopatch`` with lm-eval's
``register_model``), adds ``--include_path`` for the bundled task files unless one is given, and hands the
command line to lm-eval's own CLI: every lm-eval argument works as it does there. The tasks
(``tasks/*.yaml``): ``autopatch_twohop``, ``autopatch_handwritten``, ``autopatch_musique`` (2-hop, closed book)
and ``autopatch_harm`` (the do-no-harm requests; scored where a gold answer exists), each the test split of the
bundled set, scored as ``autopatch eval`` scores (exact match, F1, contains).
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR", "main"]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with the ``autopatch`` model registered and the bundled tasks included."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("lm-eval is not installed: pip install -e \".[lm-eval]\" (lm-eval 0.4.13)", file=sys.stderr)
        return 2
    import eval.lm_harness.model  # noqa: F401  (registers the "autopatch" model with lm-eval)

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
