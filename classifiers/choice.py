"""``ChoiceGate``: a gate that chooses how to correct a question, not only whether.

Example:
    >>> from classifiers.choice import ChoiceGate
    >>> gate = ChoiceGate.load("runs/choice_gate", model=model)     # choice.json + one PatchGate folder per strategy
    >>> patcher = AutoPatcher(model, tok, gate=gate)
    >>> patcher.answer(question)[0].report.strategy                 # e.g. "verbalize", "decompose", or not patched

One :class:`~classifiers.gate.PatchGate` per candidate (a profile: ``verbalize``,
``reroute``, the text-only ``decompose``, ...) scores "this candidate answers a
question that vanilla gets wrong", from the same vanilla-prefill features. A
:class:`ChoiceRule` turns the members' scores into one choice per question: a
*default* (leave the question alone, or always use one candidate) that a member
*overrides* when its score reaches that member's threshold; when several
override, the widest margin (score minus threshold) wins. The rule is tuned
jointly on validation questions for the accuracy of the whole decision
(:func:`tune_rule`), among policies that include the trivial ones (never patch,
always one candidate), so on those questions it is never below the best trivial
policy. Every member's profile travels in its decision, so
:class:`~autopatch.patcher.AutoPatcher` patches each row with the chosen
strategy. Saved without pickle: ``choice.json`` (members, rule, fingerprint, the
SHA-256 of each member's ``gate.json`` and of the rule) and one checked gate
folder per member. Version-1 files (no rule) still load, with the rule they
were written for: no default, each member's own threshold, widest margin wins.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from autopatch.errors import GateFileError
from autopatch.gating import GateDecision, GateInput
from autopatch.headers import read_header
from autopatch.profile import PatchProfile
from classifiers.gate import PatchGate

CHOICE_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no rule in choice.json (the widest margin over each member's own threshold)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
_EPS = 1e-9
Outcomes = Sequence[float] | np.ndarray  # per question: 1/0 correct (or any score to maximise)


@dataclass
class ChoiceRule:
    """Per row: the member whose score clears its threshold by the widest margin, else ``default``.

    ``thresholds[name]`` is the score at which that member overrides the default (``None``: it never does);
    ``default`` is the member used when none overrides (``None``: leave the row alone).
    """

    thresholds: dict[str, float | None]
    default: str | None = None

    @classmethod
    def widest_margin(cls, members: Mapping[str, PatchGate]) -> ChoiceRule:
        """The version-1 rule: no default, each member's own threshold."""
        return cls({name: float(g.threshold) for name, g in members.items()}, None)

    @property
    def overrides(self) -> list[str]:
        """Members that can override the default."""
        return [n for n, t in self.thresholds.items() if t is not None and n != self.default]

    def effective(self) -> dict[str, float]:
        """Per member, the threshold the rule applies (``inf``: never overrides; the default never overrides)."""
        return {n: (np.inf if t is None or n == self.default else float(t)) for n, t in self.thresholds.items()}

    def pick(self, scores: Mapping[str, np.ndarray]) -> list[str | None]:
        """Per row, the chosen member's name, or ``None`` to leave the row alone."""
        names = list(self.thresholds)
        limits = self.effective()
        margins = np.stack([np.asarray(scores[n], float) - limits[n] for n in names], axis=1)
        best = margins.argmax(axis=1)
        return [names[b] if margins[i, b] >= 0 else self.default for i, b in enumerate(best)]

    def describe(self) -> str:
        """One line, e.g. ``"always decompose unless verbalize >= 0.731"``."""
        over = " or ".join(f"{n} >= {self.thresholds[n]:.3f}" for n in self.overrides)
        over += " (widest margin)" if len(self.overrides) > 1 else ""
        if self.default is None:
            return f"patch with {over}, else leave alone" if over else "never patch"
        return f"always {self.default} unless {over}" if over else f"always {self.default}"

    def to_dict(self) -> dict:
        return {"default": self.default, "thresholds": dict(self.thresholds)}

    @classmethod
    def from_dict(cls, data: object, members: Sequence[str], where: str) -> ChoiceRule:
        """Read a rule saved by :meth:`to_dict`, refusing anything that is not one for exactly ``members``."""
        if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict):
            raise GateFileError(f"{where}: 'rule' is malformed: it needs 'default' and 'thresholds'.")
        thresholds, default = data["thresholds"], data.get("default")
        if sorted(thresholds) != sorted(members):
            raise GateFileError(f"{where}: the rule's thresholds name {sorted(thresholds)}, not the members "
                                f"{sorted(members)}.")
        if default is not None and default not in members:
            raise GateFileError(f"{where}: the rule's default {default!r} is not a member.")
        for name, t in thresholds.items():
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0 + 1e-6):
                raise GateFileError(f"{where}: the rule's threshold for {name!r} is {t!r}; it must be a probability "
                                    "in [0, 1] or null (never overrides).")
        return cls({n: (None if thresholds[n] is None else float(thresholds[n])) for n in members}, default)


def _rule_digest(rule: dict) -> str:
    return hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()


@dataclass
class ChoiceGate:
    """Per row, the candidate strategy its :class:`ChoiceRule` picks, or none (see the module docstring).

    ``rule=None`` is the version-1 rule (:meth:`ChoiceRule.widest_margin` over the members' own thresholds).
    """

    members: dict[str, PatchGate]
    meta: dict = field(default_factory=dict)
    rule: ChoiceRule | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise GateFileError("A choice gate needs at least one member gate.")
        bad = [name for name in self.members if not name or not set(name) <= _NAME_CHARS]
        if bad:
            raise GateFileError(f"Member names must be lowercase letters, digits, '-' or '_': {bad}.")
        specs = {json.dumps(g.spec.to_dict(), sort_keys=True) for g in self.members.values()}
        if len(specs) != 1:
            raise GateFileError("Every member of a choice gate must read the same features (one FeatureSpec).")
        if self.rule is not None:  # the same checks as a loaded rule
            self.rule = ChoiceRule.from_dict(self.rule.to_dict(), list(self.members), "choice gate")

    @property
    def active_rule(self) -> ChoiceRule:
        return self.rule or ChoiceRule.widest_margin(self.members)

    @property
    def profile(self) -> PatchProfile:
        """The rule's default member's profile (the first member's when there is none): what a patcher using
        this gate reports as its profile; each patched row still uses its chosen member's."""
        default = self.rule.default if self.rule is not None else None
        return (self.members[default] if default in self.members else next(iter(self.members.values()))).profile

    @property
    def fingerprint(self) -> str:
        return next(iter(self.members.values())).fingerprint

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The features' layers plus every member's source layer, so the prefill captures what any choice needs."""
        layers = {layer for g in self.members.values() for layer in (*g.spec.layers, g.profile.source_layer)}
        return tuple(sorted(layers))

    def scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        return {name: g.scores(X) for name, g in self.members.items()}

    def margins(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Per member, score minus the rule's threshold (>= 0: the member would override; -inf: it never does)."""
        limits = self.active_rule.effective()
        return {name: s - limits[name] for name, s in self.scores(X).items()}

    def choose(self, X: np.ndarray) -> list[str | None]:
        """Per row, the chosen member's name, or ``None`` to leave the row alone."""
        return self.active_rule.pick(self.scores(X))

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        if not inputs:
            return []
        spec = next(iter(self.members.values())).spec
        X = np.stack([spec.vector(i) for i in inputs])
        scores, rule = self.scores(X), self.active_rule
        limits = rule.effective()
        decisions = []
        for i, chosen in enumerate(rule.pick(scores)):
            listed = ", ".join(f"{name} {scores[name][i]:.3f}/" + ("off" if np.isinf(limits[name]) else f"{limits[name]:.3f}")
                               for name in self.members)
            if chosen is None:
                decisions.append(GateDecision(False, float(max(s[i] for s in scores.values())),
                                              f"choice gate: no candidate clears its threshold ({listed})"))
            else:
                how = " (default: no other candidate clears its threshold)" if limits[chosen] > scores[chosen][i] else ""
                decisions.append(GateDecision(True, float(scores[chosen][i]), f"choice gate: {chosen}{how} ({listed})",
                                              profile=self.members[chosen].profile))
        return decisions

    # ---- persistence ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, gate in self.members.items():
            gate.save(directory / name)
            digests[name] = hashlib.sha256((directory / name / "gate.json").read_bytes()).hexdigest()
        rule = self.active_rule.to_dict()
        header = {"format": "autopatch-choice-gate", "version": CHOICE_FORMAT_VERSION, "members": list(self.members),
                  "member_sha256": digests, "rule": rule, "rule_sha256": _rule_digest(rule),
                  "model_fingerprint": self.fingerprint, "meta": self.meta}
        (directory / "choice.json").write_text(json.dumps(header, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model: torch.nn.Module | None = None) -> ChoiceGate:
        directory = Path(directory)
        header = read_header(directory / "choice.json", fmt="autopatch-choice-gate", versions=READABLE_VERSIONS,
                             what="choice-gate", redo="retrain it with `autopatch train-gate --choose ...`",
                             error=GateFileError)
        version = header["version"]
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
        rule = None
        if version >= 2:
            if "rule" not in header or _rule_digest(header["rule"]) != header.get("rule_sha256"):
                raise GateFileError(f"{directory}/choice.json: the rule is missing or does not match its checksum "
                                    "('rule_sha256'): the file was modified or corrupted. Retrain it or restore it.")
            rule = ChoiceRule.from_dict(header["rule"], names, f"{directory}/choice.json")
        return cls(members, dict(header.get("meta", {})), rule)


# ---- tuning the rule on validation questions ------------------------------------------------


def _picks(S: np.ndarray, limits: np.ndarray, default: int) -> np.ndarray:
    """Column of the outcome matrix each row takes: 0 vanilla, 1 + j member j (``limits``: inf = never overrides)."""
    margins = S - limits
    best = margins.argmax(axis=1)
    cleared = margins[np.arange(len(S)), best] >= 0
    return np.where(cleared, best + 1, default)


def tune_rule(scores: Mapping[str, np.ndarray], vanilla: Outcomes, patched: Mapping[str, Outcomes], *,
              grid: int = 10, starts: Sequence[ChoiceRule] = (), min_gain: float = 1.0,
              max_rounds: int = 20) -> tuple[ChoiceRule, dict]:
    """The rule that maximises the accuracy of the whole decision on validation questions, and a report.

    ``scores[name]``: member ``name``'s scores on the questions; ``vanilla`` and ``patched[name]``: whether vanilla
    and candidate ``name`` answer each correctly (1/0, or any score to maximise). For every default (none, then
    each member) the override thresholds are searched by coordinate ascent over a quantile grid of each member's
    scores (``grid`` steps), from "no overrides" (the trivial policy) and from each rule of ``starts``. A move
    must gain accuracy, or keep it and simplify, so ties go to the simpler policy: fewer overriding members, fewer
    questions moved off the default, no default before a default, a stricter threshold before a looser one. The
    trivial policies are among those compared, so the result is never below the best of them on these questions
    (an optimistic figure: the rule was chosen on them). A policy with overrides is kept only when it answers at
    least ``min_gain`` more questions (summed outcomes) than the best trivial policy; 1 means any gain at all.
    """
    names = list(scores)
    S = np.stack([np.asarray(scores[n], float) for n in names], axis=1)
    O = np.column_stack([np.asarray(vanilla, float), *(np.asarray(patched[n], float) for n in names)])
    rows, k = np.arange(len(S)), len(names)
    options: list[list[float]] = []  # per member: never overrides, then thresholds from strict to loose
    for j in range(k):
        levels = np.quantile(S[:, j], np.linspace(0.0, 1.0, grid + 1)[:-1], method="higher") if len(S) else []
        options.append([np.inf, *sorted({float(v) for v in levels}, reverse=True)])

    def total(limits: np.ndarray, default: int) -> float:
        return float(O[rows, _picks(S, limits, default)].sum())

    def rank(j: int, value: float) -> int:
        return options[j].index(value) if value in options[j] else len(options[j])

    def ascend(limits: np.ndarray, default: int) -> tuple[np.ndarray, float]:
        current = total(limits, default)
        for _ in range(max_rounds):
            moved = False
            for j in range(k):
                if j + 1 == default:
                    continue
                for r, value in enumerate(options[j]):
                    if value == limits[j]:
                        continue
                    trial = limits.copy()
                    trial[j] = value
                    acc = total(trial, default)
                    if acc > current + _EPS or (acc > current - _EPS and r < rank(j, limits[j])):
                        limits, current, moved = trial, acc, True
            if not moved:
                break
        return limits, current

    results: list[tuple[tuple, ChoiceRule, float]] = []
    for default in range(k + 1):
        inits = [np.full(k, np.inf)] + [np.array([rule.effective()[n] for n in names]) for rule in starts]
        for start, init in enumerate(inits):
            init = init.copy()
            if default:
                init[default - 1] = np.inf
            limits, acc = ascend(init, default)
            if start == 0:  # the trivial policy itself, whatever the ascent found from it
                results.append(((-round(total(init, default), 9), 0, 0, default, 0),
                                ChoiceRule({n: None for n in names}, None if default == 0 else names[default - 1]),
                                total(init, default)))
            moved = int((_picks(S, limits, default) != default).sum())
            key = (-round(acc, 9), int(np.isfinite(limits).sum()), moved, default,
                   sum(rank(j, limits[j]) for j in range(k)))
            rule = ChoiceRule({n: (None if np.isinf(limits[j]) else float(limits[j])) for j, n in enumerate(names)},
                              None if default == 0 else names[default - 1])
            results.append((key, rule, acc))
    results.sort(key=lambda item: item[0])
    _, best, best_total = results[0]
    _, trivial, trivial_total = next(item for item in results if not item[1].overrides)
    if best.overrides and best_total < trivial_total + min_gain - _EPS:
        best, best_total = trivial, trivial_total
    n = max(len(S), 1)
    report = {"n": len(S), "policy": best.describe(), "rule": best.to_dict(), "accuracy": best_total / n, "grid": grid,
              "min_gain": min_gain,
              "trivial": {"never patch": float(O[:, 0].sum()) / n,
                          **{f"always {name}": float(O[:, j + 1].sum()) / n for j, name in enumerate(names)}},
              "starts": [{"policy": r.describe(), "accuracy": total(np.array([r.effective()[m] for m in names]),
                                                                    0 if r.default is None else names.index(r.default) + 1) / n}
                         for r in starts]}
    return best, report


def cross_validate_rule(scores: Mapping[str, np.ndarray], vanilla: Outcomes, patched: Mapping[str, Outcomes], *,
                        folds: int = 5, seed: int = 0, **tune_args) -> dict:
    """Held-out accuracy of :func:`tune_rule` itself: tuned on all folds but one, scored on that one, in turn.

    Also the same for the procedure restricted to trivial policies (never patch, always one candidate), so the
    two can be compared on questions neither was tuned on: a tuned rule that wins only on the questions it was
    tuned on overfits. ``tune_args`` go to :func:`tune_rule`.
    """
    names = list(scores)
    S = {n: np.asarray(scores[n], float) for n in names}
    V = np.asarray(vanilla, float)
    P = {n: np.asarray(patched[n], float) for n in names}
    n = len(V)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    tuned = trivial = 0.0
    for f in range(folds):
        held = order[f::folds]
        kept = np.setdiff1d(order, held)
        rule, report = tune_rule({m: S[m][kept] for m in names}, V[kept], {m: P[m][kept] for m in names}, **tune_args)
        picks = rule.pick({m: S[m][held] for m in names})
        tuned += sum(V[i] if p is None else P[p][i] for i, p in zip(held, picks))
        best = max(report["trivial"], key=lambda key: (report["trivial"][key], key == "never patch"))
        col = V if best == "never patch" else P[best.removeprefix("always ")]
        trivial += float(col[held].sum())
    return {"folds": folds, "seed": seed, "tuned": float(tuned) / max(n, 1), "best_trivial": trivial / max(n, 1)}
