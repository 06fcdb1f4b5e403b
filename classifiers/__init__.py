"""The patch gate: small classifiers that decide, per question, whether patching will help.

Example:
    >>> from classifiers import default_gate_for
    >>> gate = default_gate_for(model)     # the gate shipped for this model, or None

Learned gates implement :class:`autopatch.gating.Gate`.
"""

from __future__ import annotations

from importlib import resources


def default_gate_for(model):
    """The gate shipped for this very model (``classifiers/shipped/<model_type>/``), or ``None``.

    A shipped gate trained on another model of the same type is not used: its
    fingerprint differs, and ``None`` is returned.
    """
    from autopatch.fingerprint import model_fingerprint

    model_type = getattr(model.config, "model_type", None)
    directory = resources.files("classifiers").joinpath("shipped", str(model_type))
    if not directory.joinpath("gate.json").is_file():
        return None
    from classifiers.gate import PatchGate

    gate = PatchGate.load(directory)
    return gate if gate.fingerprint == model_fingerprint(model) else None
