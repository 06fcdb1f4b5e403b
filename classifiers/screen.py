"""The screen: "is this a composable two-hop question?", asked before any gate patches a request.

Example:
    >>> from classifiers.screen import ScreenedGate, train_screen
    >>> screen = train_screen(model, tok, out=Path("runs/screen"))       # calib/train questions and requests only
    >>> gate = ScreenedGate(screen, shipped_choice_gate)                  # leaves what is not one alone
    >>> AutoPatcher(model, tok, gate=gate).answer("Write a haiku about the sea")[0].report.reason
    'screen: P(two-hop question)=0.031 < 0.412: left alone'

A plugin in front of a model sees every kind of request. The locator reads
noun phrases with relative clauses as first hops in instructions too ("Write a
function that returns ..."), and the gates were trained on two-hop questions
only, so nothing taught them what is not one. The screen is that lesson: a
logistic regression (the :class:`~classifiers.gate.PatchGate` pipeline, saved
the same pickle-free way) on the vanilla prefill's last-token states (the model's own
reading of the whole request) at two middle layers, fitted on

* positives: composable two-hop questions (the generator's train split and
  MuSiQue-Ans 2-hop calib questions, written by people);
* negatives: the do-no-harm set's calib half (instructions, code, chat,
  multi-turn conversations, arithmetic, summaries, translation, questions with
  relative clauses that one fact answers, MuSiQue single-hop questions) and
  more MuSiQue single-hop questions from calib records: the first
  sub-question, and the second with its bridge filled in.

Each question is seen in both renderings a deployment meets (the query format
of ``answer()``/the harness, and a single chat turn as the server renders it),
so the screen learns the request, not the prompt layout. Its threshold is set
on cross-validated calib scores: the lowest at which at most ``max_fpr`` of
the located negatives pass (only located rows ever reach a gate). Every
prompt trains it, located or not: the last token needs no location, and the
unlocated requests are most of what teaches it what a request is. The
hand-written two-hop set is never seen: it measures how the screen carries to
question forms it was not fitted on.

Saved as ``screen/`` (``gate.json`` + ``gate.npz``) beside a gate, with its
checksum in ``screen.json``; :func:`classifiers.load_gate_dir` wraps the gate
in a :class:`ScreenedGate` when one is there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from autopatch.errors import ConfigError, GateFileError
from autopatch.gating import Gate, GateDecision, GateInput
from autopatch.headers import read_header
from classifiers.gate import PatchGate

SCREEN_FORMAT_VERSION = 1


@dataclass
class ScreenedGate:
    """``inner`` decides only the rows the screen passes (P(two-hop question) >= its threshold); the rest are left
    alone, exactly as ``model.generate`` would answer them."""

    screen: PatchGate
    inner: Gate

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(sorted({*self.screen.spec.layers, *self.inner.feature_layers}))

    @property
    def profile(self):
        return getattr(self.inner, "profile", None)

    @property
    def fingerprint(self) -> str:
        return self.screen.fingerprint

    def with_threshold(self, threshold: float) -> ScreenedGate:
        """The same screen before the inner gate at another threshold (the screen's own is not a request's to
        move); :class:`ConfigError` when the inner gate has none (a choosing gate: one threshold per member)."""
        inner_with = getattr(self.inner, "with_threshold", None)
        if inner_with is None:
            raise ConfigError(f"the screened {type(self.inner).__name__} has no single threshold to override")
        return replace(self, inner=inner_with(threshold))

    @property
    def reads_last_token_only(self) -> bool:
        """True when the screen's features do not depend on where the question was located (its states are the
        last token's), so it can run before a decomposition is proposed (:func:`autopatch.gating.decide_rows`)."""
        return not self.screen.spec.use_states or set(self.screen.spec.positions) == {"last"}

    def prescreen(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        """The screen's verdict per row: rows it turns away are decided (left alone); rows it passes carry
        ``screen_passed=True`` and their score, for :meth:`decide_passed`."""
        if not inputs:
            return []
        scores = self.screen.scores(np.stack([self.screen.spec.vector(i) for i in inputs]))
        threshold = self.screen.threshold
        return [GateDecision(False, None, f"screen: P(two-hop question)={s:.3f} < {threshold:.3f}: left alone",
                             screen_score=float(s), screen_passed=False) if s < threshold
                else GateDecision(False, None, "screen passed", screen_score=float(s), screen_passed=True)
                for s in scores]

    def decide_passed(self, inputs: Sequence[GateInput], verdicts: Sequence[GateDecision]) -> list[GateDecision]:
        """The inner gate's decisions on rows :meth:`prescreen` passed, each with the screen's verdict."""
        threshold = self.screen.threshold
        return [replace(d, reason=f"screen: P(two-hop question)={v.screen_score:.3f} >= {threshold:.3f}; {d.reason}",
                        screen_score=v.screen_score, screen_passed=True)
                for v, d in zip(verdicts, self.inner.decide(inputs))]

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        decisions = self.prescreen(inputs)
        passed = [i for i, d in enumerate(decisions) if d.screen_passed]
        for i, d in zip(passed, self.decide_passed([inputs[i] for i in passed], [decisions[i] for i in passed])):
            decisions[i] = d
        return decisions

    def save(self, directory: str | Path) -> Path:
        """The inner gate (``choice.json`` or ``gate.json``), then ``screen/`` and ``screen.json``."""
        directory = Path(directory)
        save_inner = getattr(self.inner, "save", None)
        if save_inner is None:
            raise GateFileError("The inner gate cannot be saved (it has no save method).")
        save_inner(directory)
        save_screen(self.screen, directory)
        return directory


def save_screen(screen: PatchGate, directory: str | Path) -> Path:
    """Write ``screen/`` and ``screen.json`` (the checksum of ``screen/gate.json``) into a gate directory."""
    directory = Path(directory)
    screen.save(directory / "screen")
    digest = hashlib.sha256((directory / "screen" / "gate.json").read_bytes()).hexdigest()
    header = {"format": "autopatch-screen", "version": SCREEN_FORMAT_VERSION, "screen_sha256": digest,
              "threshold": screen.threshold, "meta": {k: v for k, v in screen.meta.items() if k in ("summary",)}}
    (directory / "screen.json").write_text(json.dumps(header, indent=2) + "\n")
    return directory


def load_screen(directory: str | Path, *, model: Any = None) -> PatchGate | None:
    """The screen saved beside a gate in ``directory`` (``None`` when there is none); refuses a tampered one."""
    directory = Path(directory)
    path = directory / "screen.json"
    if not path.exists():
        return None
    if (directory / "screen").is_symlink():
        raise GateFileError(f"{directory}/screen is a symbolic link; gates are read from plain files only.")
    header = read_header(path, fmt="autopatch-screen", versions=(SCREEN_FORMAT_VERSION,), what="screen",
                         redo="retrain it with `autopatch train-screen`", error=GateFileError)
    try:
        blob = (directory / "screen" / "gate.json").read_bytes()
    except OSError as err:
        raise GateFileError(f"Cannot read the screen in {directory}: {err}.") from err
    if hashlib.sha256(blob).hexdigest() != header.get("screen_sha256"):
        raise GateFileError(f"{directory}/screen/gate.json does not match the checksum in screen.json: the screen was "
                            "modified or corrupted. Retrain it or restore the original files.")
    return PatchGate.load(directory / "screen", model=model)


# ---- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training prompt: the rendered text, the question the locator reads, and whether it is a two-hop one."""

    id: str
    prompt: str
    question: str
    label: int  # 1: a composable two-hop question
    source: str


def screen_examples(model_tok: tuple[Any, Any], fmt, *, twohop_limit: int = 200, musique_limit: int = 300,
                    single_hop_limit: int = 200) -> list[Example]:
    """The screen's training prompts, from calib/train splits only (see the module docstring)."""
    from autopatch.prompts import render_chat
    from eval.datasets import load_musique, select_records
    from eval.sweep import stratified_sample
    from eval.twohop import generate_twohop

    _, tok = model_tok

    def both(rec_id: str, question: str, label: int, source: str) -> list[Example]:
        texts = {fmt.render(question, tok), render_chat([{"role": "user", "content": question}], tok, fmt).text}
        return [Example(f"{rec_id}@{k}", t, question, label, source) for k, t in enumerate(sorted(texts))]

    out: list[Example] = []
    for rec in stratified_sample(generate_twohop(split="train"), twohop_limit):
        out += both(rec.id, rec.question, 1, "twohop:train")
    musique = sorted(load_musique(split="calib", hops=2), key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    for rec in musique[:musique_limit]:
        out += both(rec.id, rec.question, 1, "musique:calib")
    handwritten, _ = select_records("handwritten", split="calib", hops=2)
    for rec in handwritten:
        out += both(rec.id, rec.question, 1, "handwritten:calib")
    harm, _ = select_records("harm", split="calib")
    used = {r.question.strip().lower() for r in harm}
    for rec in harm:
        if rec.messages is not None:
            out.append(Example(rec.id, render_chat(rec.messages, tok, fmt).text, rec.question, 0, "harm:calib"))
        else:
            out += both(rec.id, rec.question, 0, "harm:calib")
    out += _single_hops(handwritten, used, None, "handwritten-single-hop:calib", both)
    out += _single_hops(musique, used, single_hop_limit, "musique-single-hop:calib", both)
    return out


def _single_hops(records, used: set[str], limit: int | None, source: str, both) -> list[Example]:
    """Negatives: each two-hop record's first sub-question, and its second with the bridge filled in (one fact
    answers each), skipping relation-only steps and questions already used."""
    out: list[Example] = []
    taken = 0
    for rec in records:
        first, second = rec.question_decomposition
        for k, step in enumerate((first, second.filled(first.answer))):
            text = step.question.strip()
            if step.is_relation or text.lower() in used or (limit is not None and taken >= limit):
                continue
            used.add(text.lower())
            taken += 1
            out += both(f"{rec.id}#{k + 1}", text, 0, source)
    return out


def screen_features(model, tok, examples: Sequence[Example], spec, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(X, located)``: each example's features from its vanilla prefill, as the gate sees them at inference."""
    from classifiers.features import extract_prompt_features

    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt)  # one rendering per batch: long shared prefix
    X, located = extract_prompt_features(model, tok, [examples[i].prompt for i in order],
                                         [examples[i].question for i in order], spec, batch_size=batch_size)
    back = np.argsort(order)
    return X[back], located[back]


def cv_scores(X: np.ndarray, y: np.ndarray, groups: Sequence[str], *, folds: int = 5, n_components: int = 32) -> np.ndarray:
    """Held-out screen scores: each example scored by a screen fitted on the other folds (grouped by question, so
    a question's two renderings are never split across a fold)."""
    from classifiers.gate import make_pipeline

    keys = sorted(set(groups))
    fold_of = {g: int(hashlib.sha256(g.encode()).hexdigest(), 16) % folds for g in keys}
    held = np.array([fold_of[g] for g in groups])
    scores = np.zeros(len(y))
    for f in range(folds):
        train, test = held != f, held == f
        pipe = make_pipeline("logreg", max(1, min(n_components, int(train.sum()) - 1, X.shape[1])))
        pipe.fit(X[train], y[train])
        scores[test] = pipe.predict_proba(X[test])[:, 1]
    return scores


def pick_threshold(scores: np.ndarray, y: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold at which at most ``max_fpr`` of the negatives score at or above it."""
    negatives = np.sort(scores[y == 0])[::-1]
    allowed = int(np.floor(max_fpr * len(negatives)))
    if len(negatives) == 0:
        return 0.5
    # strictly above the (allowed+1)-th highest negative score, so at most `allowed` negatives pass
    bar = negatives[min(allowed, len(negatives) - 1)]
    return float(np.nextafter(bar, np.inf))


def platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` such that ``sigmoid(a * logit(score) + b)`` is a calibrated probability on held-out ``scores``
    (Platt scaling); ``(1, 0)`` when one class is missing."""
    from sklearn.linear_model import LogisticRegression

    if not 0 < y.sum() < len(y):
        return 1.0, 0.0
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(scores)[:, None], y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _calibrate(scores: np.ndarray, ab: tuple[float, float]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(ab[0] * _logit(scores) + ab[1])))


def held_out_sources(X: np.ndarray, y: np.ndarray, sources: Sequence[str], located: np.ndarray, *, threshold: float,
                     ab: tuple[float, float], n_components: int) -> dict[str, float]:
    """Share of each source's located prompts that pass a screen fitted on every *other* source (calibrated with
    ``ab``, at ``threshold``): recall on two-hop forms, and pass rate on other requests, the screen never saw."""
    from classifiers.gate import make_pipeline

    src = np.asarray(sources)
    out = {}
    for source in sorted(set(sources)):
        train, test = src != source, (src == source) & located
        if not test.any() or not 0 < y[train].sum() < train.sum():
            continue
        pipe = make_pipeline("logreg", max(1, min(n_components, int(train.sum()) - 1, X.shape[1])))
        pipe.fit(X[train], y[train])
        out[source] = float((_calibrate(pipe.predict_proba(X[test])[:, 1], ab) >= threshold).mean())
    return out


def train_screen(model, tok, *, out: Path, layers: Sequence[int] | None = None, max_fpr: float = 0.05,
                 n_components: int = 64, batch_size: int = 16, examples: Sequence[Example] | None = None) -> PatchGate:
    """Fit the screen for ``model``, calibrate its scores and set its threshold on cross-validated calib scores,
    write ``out/screen.md``."""
    from autopatch.architectures import num_layers
    from autopatch.resolve import model_profile
    from classifiers.features import FeatureSpec

    base = model_profile(model, tok)
    n = num_layers(model)
    spec = FeatureSpec(layers=tuple(layers) if layers else (n // 2, (2 * n) // 3), positions=("last",))
    examples = list(examples) if examples is not None else screen_examples((model, tok), base.prompt_format)
    X, located = screen_features(model, tok, examples, spec, batch_size=batch_size)
    y = np.array([e.label for e in examples])
    raw = cv_scores(X, y, [e.id.split("@")[0] for e in examples], n_components=n_components)
    ab = platt(raw[located], y[located])  # only located rows ever reach a gate: calibrate on those
    held = _calibrate(raw, ab)
    threshold = pick_threshold(held[located], y[located], max_fpr)
    per_source: dict[str, dict[str, float]] = {}
    for source in sorted({e.source for e in examples}):
        rows = [i for i, e in enumerate(examples) if e.source == source]
        per_source[source] = {"prompts": len(rows), "label": int(examples[rows[0]].label),
                              "located": int(located[rows].sum()),
                              "passed": int(sum(held[i] >= threshold for i in rows if located[i]))}
    unseen = held_out_sources(X, y, [e.source for e in examples], located, threshold=threshold, ab=ab,
                              n_components=n_components)
    for source, rate in unseen.items():
        per_source[source]["passed_source_held_out"] = rate
    yl, hl = y[located], held[located]
    summary = {"examples": len(examples), "located": int(located.sum()), "positives": int(y.sum()),
               "negatives": int(len(y) - y.sum()), "max_fpr": max_fpr, "threshold": threshold,
               "platt": list(ab), "brier": float(np.mean((hl - yl) ** 2)) if len(yl) else None,
               "cv_recall": float((hl[yl == 1] >= threshold).mean()) if yl.sum() else None,
               "cv_fpr": float((hl[yl == 0] >= threshold).mean()) if (yl == 0).any() else None,
               "cv_auc": _auc(yl, hl), "per_source": per_source, "spec": spec.to_dict(), "n_components": n_components}
    screen = PatchGate.fit(X, y, None, spec=spec, profile=base, model=model, n_components=n_components,
                           meta={"kind": "screen", "summary": summary})
    # Platt's map is affine in the logit, so it folds into the logistic head: scores() is calibrated as saved
    screen.arrays["coef"] = screen.arrays["coef"] * ab[0]
    screen.arrays["intercept"] = screen.arrays["intercept"] * ab[0] + ab[1]
    screen.threshold = threshold
    out.mkdir(parents=True, exist_ok=True)
    save_screen(screen, out)
    (out / "screen.md").write_text(screen_markdown(summary))
    return screen


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    if not 0 < y.sum() < len(y):
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def screen_markdown(summary: dict) -> str:
    """What the screen was fitted on and how it did on held-out folds of calib, and on held-out sources."""
    auc = summary["cv_auc"]
    platt_note = ""
    if "platt" in summary:
        a, b = summary["platt"]
        platt_note = (f" Scores are calibrated (Platt scaling of the held-out scores on located prompts, a={a:.3f}, "
                      f"b={b:.3f}, folded into the saved head; Brier score {summary['brier']:.3f}).")
    lines = ["# Two-hop screen", "",
             f"Training prompts: {summary['examples']} ({summary['positives']} two-hop, {summary['negatives']} not; "
             f"{summary['located']} located). Features: {summary['spec']}, PCA to {summary['n_components']}.{platt_note}", "",
             f"Threshold {summary['threshold']:.4f}: the lowest at which at most {summary['max_fpr']:.0%} of the located "
             f"negatives pass, on 5-fold cross-validated scores (folds grouped by question). Held out, on located "
             f"prompts: recall {summary['cv_recall']:.3f} on two-hop questions, {summary['cv_fpr']:.3f} of other "
             f"requests passed, ROC-AUC {'n/a' if auc is None else f'{auc:.3f}'}.", "",
             "Last column: the share of the source's located prompts passed by a screen fitted on every other source "
             "(the forms of that source never seen), at the same threshold.", "",
             "| source | two-hop | prompts | located | passed the screen (held-out folds) | passed, source held out |",
             "|---|---|---|---|---|---|"]
    for source, row in summary["per_source"].items():
        unseen = row.get("passed_source_held_out")
        label = {1: "yes", 0: "no"}.get(row.get("label"), "")
        lines.append(f"| {source} | {label} | {row['prompts']} | {row['located']} | {row['passed']} | "
                     f"{'' if unseen is None else f'{unseen:.3f}'} |")
    return "\n".join(lines) + "\n"
