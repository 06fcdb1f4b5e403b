"""The patch gate: small classifiers that decide, per question, whether patching will help.

Example:
    >>> from classifiers import default_gate_for
    >>> gate = default_gate_for(model)     # the gate shipped for this very model, or None
    >>> from autopatch import AutoPatcher
    >>> AutoPatcher(model, tok).resolution.gate_source   # 'shipped': found through GATE_PROVIDER

Learned gates implement :class:`autopatch.gating.Gate`. This package plugs into
the core through the ``autopatch.gate_providers`` entry point (``GATE_PROVIDER``);
the core never imports it directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_gate_dir(fingerprint: str, root: Path = SHIPPED_DIR) -> Path | None:
    """The directory under ``classifiers/shipped/`` whose gate (``choice.json`` or ``gate.json``) was fitted on
    weights with ``fingerprint``."""
    from autopatch.errors import GateFileError
    from autopatch.fingerprint import shipped_dir_for

    return (shipped_dir_for(root, "choice.json", fingerprint, GateFileError)
            or shipped_dir_for(root, "gate.json", fingerprint, GateFileError))


def load_gate_dir(directory: str | os.PathLike[str], model: Any = None):
    """The gate saved in ``directory``: a :class:`~classifiers.choice.ChoiceGate` (``choice.json``) or a
    :class:`~classifiers.gate.PatchGate` (``gate.json``), behind its :class:`~classifiers.screen.ScreenedGate`
    screen when ``screen.json`` is there."""
    from classifiers.screen import ScreenedGate, load_screen

    gate: Any
    if (Path(directory) / "choice.json").is_file():
        from classifiers.choice import ChoiceGate

        gate = ChoiceGate.load(Path(directory), model=model)
    else:
        from classifiers.gate import PatchGate

        gate = PatchGate.load(directory, model=model)
    screen = load_screen(Path(directory), model=model)  # "is this a two-hop question?", when one was trained beside it
    return gate if screen is None else ScreenedGate(screen, gate)


def default_gate_for(model: Any):
    """The gate shipped for this very model (matched by weight fingerprint), or ``None``.

    Gates of several models, of one ``model_type`` or not, ship side by side in
    ``classifiers/shipped/<name>/``. A shipped gate that fails its checks raises
    :class:`~autopatch.errors.GateFileError`.
    """
    from autopatch.fingerprint import model_fingerprint

    directory = shipped_gate_dir(model_fingerprint(model))
    return None if directory is None else load_gate_dir(directory, model=model)


class _Provider:
    """The gate provider the core finds through the ``autopatch.gate_providers`` entry point."""

    def shipped_gate(self, model: Any):
        return default_gate_for(model)

    def load_gate(self, path: str | os.PathLike[str], model: Any):
        return load_gate_dir(path, model=model)


GATE_PROVIDER = _Provider()
