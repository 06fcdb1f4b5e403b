"""``ChoiceGate``: a gate that chooses how to correct a question, not only whether.

Example:
    >>> from classifiers.choice import ChoiceGate
    >>> gate = ChoiceGate.load("runs/choice_gate", model=model)     # choice.json + one PatchGate folder per strategy
    >>> patcher = AutoPatcher(model, tok, gate=gate)
    >>> patcher.answer(question)[0].report.strategy                 # e.g. "verbalize", "decompose", or not patched

One :class:`~classifiers.gate.PatchGate` per candidate (a profile: ``verbalize``,
``reroute``, the text-only ``decompose``, ...) scores "this candidate answers a
question that vanilla gets wrong", from the same vanilla-prefill features, and
has its own threshold tuned on validation questions. Per question the candidate
whose score clears its threshold by the widest margin is chosen; when none
does, the question is left alone. Every member's profile travels in its
decision, so :class:`~autopatch.patcher.AutoPatcher` patches each row with the
chosen strategy. Saved without pickle: ``choice.json`` (members, fingerprint,
the SHA-256 of each member's ``gate.json``) and one checked gate folder per member.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autopatch.errors import GateFileError
from autopatch.gating import GateDecision, GateInput
from autopatch.profile import PatchProfile
from classifiers.gate import PatchGate

CHOICE_FORMAT_VERSION = 1
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass
class ChoiceGate:
    """Per row, the candidate strategy most likely to fix it, or none (see the module docstring)."""

    members: dict[str, PatchGate]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise GateFileError("A choice gate needs at least one member gate.")
        bad = [name for name in self.members if not name or not set(name) <= _NAME_CHARS]
        if bad:
            raise GateFileError(f"Member names must be lowercase letters, digits, '-' or '_': {bad}.")
        specs = {json.dumps(g.spec.to_dict(), sort_keys=True) for g in self.members.values()}
        if len(specs) != 1:
            raise GateFileError("Every member of a choice gate must read the same features (one FeatureSpec).")

    @property
    def profile(self) -> PatchProfile:
        """The first member's profile: what a patcher reports when no row is patched."""
        return next(iter(self.members.values())).profile

    @property
    def fingerprint(self) -> str:
        return next(iter(self.members.values())).fingerprint

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The features' layers plus every member's source layer, so the prefill captures what any choice needs."""
        layers = {layer for g in self.members.values() for layer in (*g.spec.layers, g.profile.source_layer)}
        return tuple(sorted(layers))

    def margins(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Per member, score minus its threshold (>= 0: the member would patch)."""
        return {name: g.scores(X) - g.threshold for name, g in self.members.items()}

    def choose(self, X: np.ndarray) -> list[str | None]:
        """Per row, the chosen member's name, or ``None`` to leave the row alone."""
        margins = self.margins(X)
        names = list(margins)
        stacked = np.stack([margins[n] for n in names], axis=1)
        best = stacked.argmax(axis=1)
        return [names[b] if stacked[i, b] >= 0 else None for i, b in enumerate(best)]

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        if not inputs:
            return []
        spec = next(iter(self.members.values())).spec
        X = np.stack([spec.vector(i) for i in inputs])
        scores = {name: g.scores(X) for name, g in self.members.items()}
        decisions = []
        for i, chosen in enumerate(self.choose(X)):
            listed = ", ".join(f"{name} {scores[name][i]:.3f}/{g.threshold:.3f}" for name, g in self.members.items())
            if chosen is None:
                decisions.append(GateDecision(False, float(max(s[i] for s in scores.values())),
                                              f"choice gate: no candidate clears its threshold ({listed})"))
            else:
                member = self.members[chosen]
                decisions.append(GateDecision(True, float(scores[chosen][i]),
                                              f"choice gate: {chosen} ({listed})", profile=member.profile))
        return decisions

    # ---- persistence ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, gate in self.members.items():
            gate.save(directory / name)
            digests[name] = hashlib.sha256((directory / name / "gate.json").read_bytes()).hexdigest()
        header = {"format": "autopatch-choice-gate", "version": CHOICE_FORMAT_VERSION, "members": list(self.members),
                  "member_sha256": digests, "model_fingerprint": self.fingerprint, "meta": self.meta}
        (directory / "choice.json").write_text(json.dumps(header, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model: torch.nn.Module | None = None) -> ChoiceGate:
        directory = Path(directory)
        if (directory / "choice.json").is_symlink():
            raise GateFileError(f"{directory}/choice.json is a symbolic link; gates are read from plain files only.")
        try:
            header = json.loads((directory / "choice.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GateFileError(f"Cannot read a choice gate from {directory}: {err}.") from err
        if not isinstance(header, dict) or header.get("format") != "autopatch-choice-gate":
            raise GateFileError(f"{directory}/choice.json is not an autopatch choice-gate file.")
        if header.get("version") != CHOICE_FORMAT_VERSION:
            raise GateFileError(f"Choice-gate format version {header.get('version')} is not supported (this autopatch "
                                f"reads version {CHOICE_FORMAT_VERSION}); retrain it.")
        names, digests = header.get("members"), header.get("member_sha256")
        if not isinstance(names, list) or not isinstance(digests, dict) or not names:
            raise GateFileError(f"{directory}/choice.json is malformed: it needs 'members' and 'member_sha256'.")
        members = {}
        for name in names:
            if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
                raise GateFileError(f"{directory}/choice.json names an invalid member {name!r}.")
            if (directory / name).is_symlink():
                raise GateFileError(f"Choice gate member {directory / name} is a symbolic link; refused.")
            try:
                blob = (directory / name / "gate.json").read_bytes()
            except OSError as err:
                raise GateFileError(f"Choice gate member {name!r} is missing in {directory}: {err}.") from err
            if hashlib.sha256(blob).hexdigest() != digests.get(name):
                raise GateFileError(f"{directory}/{name}/gate.json does not match the checksum in choice.json: the "
                                    "gate was modified or corrupted. Retrain it or restore the original files.")
            members[name] = PatchGate.load(directory / name, model=model)
        return cls(members, dict(header.get("meta", {})))
