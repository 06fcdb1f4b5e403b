"""Which machine made a bench's table: tables differ between CPUs, so each bench names its own.

Example:
    >>> from bench.machine import cpu_name
    >>> cpu_name()
    'AMD EPYC'
"""

from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
