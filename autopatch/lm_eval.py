"""``python -m autopatch.lm_eval ...``: lm-evaluation-harness with the ``autopatch`` model and tasks.

Example:
    $ python -m autopatch.lm_eval --model autopatch --model_args pretrained=gemma-3-270m --tasks autopatch_twohop --limit 8

The integration lives in :mod:`eval.lm_harness` (beside the harness whose methods it runs); this module is its
front door under the package's name.
"""

from __future__ import annotations

if __name__ == "__main__":
    from eval.lm_harness import main

    raise SystemExit(main())
