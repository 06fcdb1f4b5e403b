"""Which machine made a bench's table: tables differ between CPUs, so each bench names its own.

Example:
    >>> from bench.machine import cpu_name, cpu_summary
    >>> cpu_name(), cpu_summary()
    ('AMD EPYC', '2 cores, AVX-512 with VNNI')
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def cpu_summary() -> str:
    """Cores and the widest vector instructions the kernels can use, from ``/proc/cpuinfo``'s flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {isa}" + (" with VNNI" if "vnni" in flags else "")
