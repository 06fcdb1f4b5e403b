"""The patch gate: small classifiers that decide, per question, whether patching will help.

Example:
    >>> from classifiers import default_gate_for
    >>> gate = default_gate_for(model)     # the gate shipped for this model, or None

Learned gates implement :class:`autopatch.gating.Gate`.
"""

from __future__ import annotations

from importlib import resources


def default_gate_for(model):
    """The gate shipped for ``model``'s type (``classifiers/shipped/<model_type>/``), or ``None`` if there is none."""
    model_type = getattr(model.config, "model_type", None)
    directory = resources.files("classifiers").joinpath("shipped", str(model_type))
    if not directory.is_dir():
        return None
    from classifiers.gate import PatchGate

    return PatchGate.load(directory, model=model)
