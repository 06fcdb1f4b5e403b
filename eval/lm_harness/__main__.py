"""``python -m eval.lm_harness``: the same as ``python -m autopatch.lm_eval``."""

from eval.lm_harness import main

raise SystemExit(main())
