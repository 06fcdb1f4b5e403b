"""Train the patch gate end to end: label sweeps, features, model comparison, threshold, safe save.

Example:
    $ autopatch train-gate --out runs/gate --ship
    $ autopatch train-gate --train twohop:train:600,musique:calib:200 --dev twohop:dev:300 --out runs/gate

Steps (every one resumable; results are cached in ``--out``):

1. For each training and validation question, run vanilla and the profile's
   patch once (``eval.sweep.run_sweep`` with a single configuration) and
   record both answers: ``labels_<name>.jsonl``.
2. Extract gate features from the vanilla prefill: ``features_<name>.npz``.
3. Compare feature sets (scalars, states, both) with logistic regression and
   the model family (logistic regression, RBF SVM, small MLP) by 5-fold
   cross-validated ROC-AUC on the training questions: ``cv.md``.
4. Fit the logistic-regression pipeline on all training questions, tune the
   threshold on the validation questions for end-to-end accuracy, report the
   validation ROC-AUC, and save ``gate.json`` + ``gate.npz`` (``--ship`` also
   copies them to ``classifiers/shipped/<name>/``, keyed by the model's fingerprint).

Test questions are never read here.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from autopatch.profile import PatchProfile
from classifiers.choice import ChoiceGate, ChoiceRule, cross_validate_rule, tune_rule
from classifiers.features import SCALARS, FeatureSpec, extract_features
from classifiers.gate import PatchGate, make_pipeline
from classifiers.labels import gate_labels


def parse_sources(spec: str) -> list[tuple[str, str, int | None]]:
    """``"twohop:train:600,musique:calib"`` -> ``[("twohop", "train", 600), ("musique", "calib", None)]``."""
    from autopatch.errors import ConfigError

    sources = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        if len(fields) not in (2, 3):
            raise ConfigError(f"Bad source {part!r}: use DATASET:SPLIT[:LIMIT], e.g. twohop:train:600.")
        if fields[1] == "test":
            raise ConfigError(f"The gate never trains or tunes on a test split: drop {part!r} (use train/dev, or "
                              "MuSiQue calib).")
        limit = fields[2] if len(fields) == 3 else None
        if limit is not None and (not limit.isdigit() or int(limit) < 1):
            raise ConfigError(f"Bad source {part!r}: LIMIT must be a positive integer.")
        sources.append((fields[0], fields[1], int(limit) if limit is not None else None))
    if not sources:
        raise ConfigError(f"No sources in {spec!r}: use DATASET:SPLIT[:LIMIT],... e.g. twohop:train:600.")
    return sources


def _source_name(dataset: str, split: str) -> str:
    return f"{Path(dataset).stem}_{split}"


def collect(model, tok, profile, sources, out: Path, spec: FeatureSpec, batch_size: int, max_new_tokens: int, *,
            feature_dir: Path | None = None):
    """Labels and features for every question of ``sources``: ``(X, labels list, ids)``.

    Features are cached in ``feature_dir`` (default ``out``), so gates that read the same features share them.
    """
    from eval.datasets import load_dataset_by_name
    from eval.sweep import SweepConfig, load_sweep, run_sweep, stratified_sample

    config = SweepConfig.of(profile)
    out.mkdir(parents=True, exist_ok=True)
    X_parts, labels, ids = [], [], []
    for dataset, split, limit in sources:
        name = _source_name(dataset, split)
        records = stratified_sample(load_dataset_by_name(dataset, split=split, hops=2), limit)
        label_file = out / f"labels_{name}.jsonl"
        run_sweep(model, tok, records, [config], label_file, batch_size=batch_size, max_new_tokens=max_new_tokens)
        table = load_sweep(label_file)
        by_id = gate_labels(table, config)
        feature_file = (feature_dir or out) / f"features_{name}.npz"
        if feature_file.exists():
            with np.load(feature_file, allow_pickle=False) as data:
                f_ids, X = list(data["ids"]), data["X"]
        else:
            f_ids, X, _ = extract_features(model, tok, records, spec, profile=profile, batch_size=batch_size)
            np.savez(feature_file, ids=np.array(f_ids), X=X)
        for i, rid in enumerate(f_ids):
            if rid in by_id:  # located questions only: the others are never patched
                X_parts.append(X[i])
                labels.append(by_id[rid])
                ids.append(rid)
    return np.stack(X_parts), labels, ids


def _feature_columns(spec: FeatureSpec, hidden: int, use_states: bool, use_scalars: bool) -> np.ndarray:
    n_states = len(spec.layers) * len(spec.positions) * hidden
    cols = []
    if use_states:
        cols += list(range(n_states))
    if use_scalars:
        cols += list(range(n_states, n_states + len(SCALARS)))
    return np.array(cols)


def compare_models(X: np.ndarray, y: np.ndarray, w: np.ndarray, spec: FeatureSpec, hidden: int) -> list[dict]:
    """5-fold CV ROC-AUC for feature sets x model families (training questions only)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rows = []
    folds = min(5, int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:
        return [{"features": "-", "model": "-", "auc": float("nan"), "note": "too few positive labels for CV"}]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    settings = [("scalars", "logreg", False, True), ("states", "logreg", True, False), ("states+scalars", "logreg", True, True),
                ("states+scalars", "svm", True, True), ("states+scalars", "mlp", True, True)]
    for feature_set, kind, use_states, use_scalars in settings:
        cols = _feature_columns(spec, hidden, use_states, use_scalars)
        aucs = []
        for train_idx, test_idx in splitter.split(X, y):
            n_comp = max(1, min(32, len(train_idx) - 1, len(cols)))
            pipe = make_pipeline(kind, n_comp)
            fit_args = {} if kind == "mlp" else {"head__sample_weight": w[train_idx]}
            pipe.fit(X[train_idx][:, cols], y[train_idx], **fit_args)
            held_out = X[test_idx][:, cols]
            scores = pipe.decision_function(held_out) if kind == "svm" else pipe.predict_proba(held_out)[:, 1]
            aucs.append(roc_auc_score(y[test_idx], scores))
        rows.append({"features": feature_set, "model": kind, "auc": float(np.mean(aucs)), "auc_sd": float(np.std(aucs))})
    return rows


def train_gate(model, tok, *, train: str, dev: str, out: Path, layers: tuple[int, ...] | None = None,
               batch_size: int = 32, max_new_tokens: int = 12, ship: bool = False) -> PatchGate:
    """Run steps 1-4 of the module docstring and return the saved gate."""
    from sklearn.metrics import roc_auc_score

    out.mkdir(parents=True, exist_ok=True)
    profile = PatchProfile.shipped_for(model) or PatchProfile.default_for(model)
    n = model.config.num_hidden_layers
    spec = FeatureSpec(layers=layers or tuple(sorted({profile.source_layer, n // 2})), positions=("span_end", "last"))
    X, labels, _ = collect(model, tok, profile, parse_sources(train), out, spec, batch_size, max_new_tokens)
    y = np.array([l.target for l in labels])
    w = np.array([l.weight for l in labels])
    cv = compare_models(X, y, w, spec, model.config.hidden_size)
    X_dev, dev_labels, _ = collect(model, tok, profile, parse_sources(dev), out, spec, batch_size, max_new_tokens)
    gate = PatchGate.fit(X, y, w, spec=spec, profile=profile, model=model,
                         meta={"train": train, "dev": dev, "n_train": int(len(y)), "train_helps": int(y.sum()),
                               "train_hurts": int(sum(l.hurts for l in labels)), "cv": cv})
    gate.tune_threshold(X_dev, [l.vanilla for l in dev_labels], [l.patched for l in dev_labels])
    y_dev = np.array([l.target for l in dev_labels])
    dev_auc = float(roc_auc_score(y_dev, gate.scores(X_dev))) if 0 < y_dev.sum() < len(y_dev) else float("nan")
    gate.meta.update({"dev_auc": dev_auc, "n_dev": int(len(y_dev)), "dev_helps": int(y_dev.sum()),
                      "dev_hurts": int(sum(l.hurts for l in dev_labels)),
                      "dev_patched_accuracy": float(np.mean([l.patched for l in dev_labels]))})
    gate.profile = replace(profile)
    gate.save(out)
    (out / "cv.md").write_text(cv_markdown(gate))
    if ship:
        from autopatch.fingerprint import model_fingerprint
        from autopatch.profile import ship_name
        from classifiers import SHIPPED_DIR, shipped_gate_dir

        target = shipped_gate_dir(model_fingerprint(model)) or SHIPPED_DIR / ship_name(model)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("gate.json", "gate.npz"):
            shutil.copyfile(out / name, target / name)
    return gate


def train_choice_gate(model, tok, *, candidates: dict[str, PatchProfile], train: str, dev: str, out: Path,
                      layers: tuple[int, ...] | None = None, batch_size: int = 32, max_new_tokens: int = 12,
                      ship: bool = False, grid: int = 10, min_gain: float = 1.0) -> ChoiceGate:
    """One gate per candidate profile ("this candidate fixes a vanilla error"), and a rule tuned jointly on ``dev``.

    Each member's own threshold is tuned on ``dev`` as for a single gate (kept in its ``gate.json``, and the
    widest-margin rule of version-1 files); the :class:`~classifiers.choice.ChoiceRule` that decides is then tuned
    on the same questions for the accuracy of the whole choice (:func:`~classifiers.choice.tune_rule`, ``grid`` and
    ``min_gain`` go there). ``meta["dev"]`` records the chosen policy, its dev accuracy (optimistic: tuned there),
    every trivial policy's, the widest-margin rule's, and a 5-fold cross-validated accuracy of the tuning itself.
    """
    from sklearn.metrics import roc_auc_score

    out.mkdir(parents=True, exist_ok=True)
    n = model.config.num_hidden_layers
    first = next(iter(candidates.values()))
    spec = FeatureSpec(layers=layers or tuple(sorted({first.source_layer, n // 2})), positions=("span_end", "last"))
    members: dict[str, PatchGate] = {}
    dev_outcomes: dict[str, dict[str, tuple[float, float]]] = {}
    dev_X: dict[str, np.ndarray] = {}
    left_out: list[str] = []
    for name, profile in candidates.items():
        X, labels, _ = collect(model, tok, profile, parse_sources(train), out / name, spec, batch_size, max_new_tokens,
                               feature_dir=out)
        y = np.array([l.target for l in labels])
        w = np.array([l.weight for l in labels])
        if not 0 < y.sum() < len(y):  # nothing to learn: it never (or always) fixes a vanilla error on train
            print(f"train-gate: {name} fixes {int(y.sum())} of {len(y)} training questions' vanilla errors; left out "
                  "of the choice (a gate cannot learn when it helps)", flush=True)
            left_out.append(name)
            continue
        gate = PatchGate.fit(X, y, w, spec=spec, profile=profile, model=model,
                             meta={"train": train, "dev": dev, "n_train": int(len(y)), "train_helps": int(y.sum())})
        X_dev, dev_labels, dev_ids = collect(model, tok, profile, parse_sources(dev), out / name, spec, batch_size,
                                             max_new_tokens, feature_dir=out)
        gate.tune_threshold(X_dev, [l.vanilla for l in dev_labels], [l.patched for l in dev_labels])
        y_dev = np.array([l.target for l in dev_labels])
        gate.meta["dev_auc"] = float(roc_auc_score(y_dev, gate.scores(X_dev))) if 0 < y_dev.sum() < len(y_dev) else None
        members[name] = gate
        dev_outcomes[name] = {i: (l.vanilla, l.patched) for i, l in zip(dev_ids, dev_labels)}
        dev_X.update(zip(dev_ids, X_dev))
    if not members:
        from autopatch.errors import ConfigError

        raise ConfigError(f"No candidate of {', '.join(candidates)} ever fixes a vanilla error on {train} (or one always "
                          "does): there is nothing to choose between; use more training questions or other candidates.")
    choice = ChoiceGate(members, {"train": train, "dev_sources": dev, "candidates": list(members),
                                  "left_out": left_out})
    shared = sorted(set.intersection(*(set(o) for o in dev_outcomes.values())))
    if shared:
        choice.rule, choice.meta["dev"] = tune_choice_rule(choice, np.stack([dev_X[i] for i in shared]),
                                                           {name: [o[i] for i in shared] for name, o in dev_outcomes.items()},
                                                           grid=grid, min_gain=min_gain)
    choice.save(out)
    if ship:
        from autopatch.fingerprint import model_fingerprint
        from autopatch.profile import ship_name
        from classifiers import SHIPPED_DIR, shipped_gate_dir

        target = shipped_gate_dir(model_fingerprint(model)) or SHIPPED_DIR / ship_name(model)
        choice.save(target)
    return choice


def tune_choice_rule(choice: ChoiceGate, X_dev: np.ndarray, outcomes: dict[str, list[tuple[float, float]]], *,
                     grid: int = 10, min_gain: float = 1.0) -> tuple[ChoiceRule, dict]:
    """The jointly tuned rule for ``choice`` and the ``meta["dev"]`` record of how it compares on the dev questions.

    ``outcomes[name][i]``: (vanilla correct, candidate ``name`` correct) on row ``i`` of ``X_dev``. The members'
    widest-margin rule is one of the starting points, so the tuned rule is never below it on these questions.
    """
    scores = choice.scores(X_dev)
    vanilla = [v for v, _ in next(iter(outcomes.values()))]
    patched = {name: [p for _, p in rows] for name, rows in outcomes.items()}
    widest = ChoiceRule.widest_margin(choice.members)
    rule, report = tune_rule(scores, vanilla, patched, grid=grid, starts=[widest], min_gain=min_gain)
    picks = rule.pick(scores)
    record = {
        "n": report["n"], "policy": report["policy"], "rule": report["rule"],
        "choice_accuracy": report["accuracy"], "vanilla_accuracy": report["trivial"]["never patch"],
        "always": {name: report["trivial"][f"always {name}"] for name in choice.members},
        "trivial": report["trivial"], "widest_margin_accuracy": report["starts"][0]["accuracy"],
        "chosen": {name: sum(p == name for p in picks) for name in [*choice.members, None]},
        "grid": grid, "min_gain": min_gain,
        "cv": cross_validate_rule(scores, vanilla, patched, starts=[widest], grid=grid, min_gain=min_gain),
        "note": "choice_accuracy is optimistic: the rule was tuned on these questions (cv is tuned and scored on "
                "different folds of them); the test run is the honest number",
    }
    return rule, record


def retune_choice_gate(out: Path, *, grid: int = 10, min_gain: float = 1.0, model=None) -> ChoiceGate:
    """Re-tune the rule of the choice gate saved in ``out`` from what its training cached there, and save it.

    Reads ``out/choice.json``, the members, the dev features (``features_<source>.npz``) and each member's dev
    labels (``<member>/labels_<source>.jsonl``) for the dev sources recorded in its meta; generates nothing and
    needs no model (``model``, when given, is only checked against the gate's fingerprint).
    """
    from autopatch.errors import GateFileError
    from eval.sweep import SweepConfig, load_sweep

    choice = ChoiceGate.load(out, model=model)
    dev = choice.meta.get("dev_sources")
    if not isinstance(dev, str):
        raise GateFileError(f"{out}/choice.json records no dev sources ('dev_sources' in its meta): retrain it.")
    dev_X: dict[str, np.ndarray] = {}
    outcomes: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in choice.members}
    for dataset, split, _ in parse_sources(dev):
        source = _source_name(dataset, split)
        try:
            with np.load(out / f"features_{source}.npz", allow_pickle=False) as data:
                dev_X.update(zip((str(i) for i in data["ids"]), data["X"]))
        except (OSError, ValueError, KeyError) as err:
            raise GateFileError(f"Cannot read the cached dev features {out}/features_{source}.npz: {err}.") from err
        for name, gate in choice.members.items():
            labels = gate_labels(load_sweep(out / name / f"labels_{source}.jsonl"), SweepConfig.of(gate.profile))
            outcomes[name].update((i, (l.vanilla, l.patched)) for i, l in labels.items())
    shared = sorted(set(dev_X).intersection(*(set(o) for o in outcomes.values())))
    if not shared:
        raise GateFileError(f"{out} holds no dev question with features and labels for every member: nothing to tune on.")
    choice.rule, choice.meta["dev"] = tune_choice_rule(choice, np.stack([dev_X[i] for i in shared]),
                                                       {name: [o[i] for i in shared] for name, o in outcomes.items()},
                                                       grid=grid, min_gain=min_gain)
    choice.save(out)
    return choice


def cv_markdown(gate: PatchGate) -> str:
    meta = gate.meta
    lines = ["# Gate: feature and model comparison", "",
             f"Training questions: {meta['n_train']} located ({meta['train']}); {meta['train_helps']} where the patch "
             f"helps, {meta['train_hurts']} where it hurts. 5-fold cross-validated ROC-AUC of 'patch helps' "
             "(training questions only; PCA to at most 32 components inside each fold).", "",
             "| features | model | ROC-AUC (mean ± sd over folds) |", "|---|---|---|"]
    for row in meta["cv"]:
        lines.append(f"| {row['features']} | {row['model']} | {row['auc']:.3f} ± {row.get('auc_sd', float('nan')):.3f} |")
    t = meta.get("threshold_tuning", {})
    lines += ["", f"Shipped: logistic regression on states+scalars (feature layers {list(gate.spec.layers)}, positions "
              f"{list(gate.spec.positions)}). Threshold {gate.threshold:.3f}, tuned on {meta['dev']} "
              f"({meta['n_dev']} located questions) for end-to-end EM: gated {t.get('accuracy', float('nan')):.3f} vs "
              f"vanilla {t.get('vanilla_accuracy', float('nan')):.3f} vs always-patch {meta['dev_patched_accuracy']:.3f}. "
              f"Validation ROC-AUC {meta['dev_auc']:.3f} ({meta['dev_helps']} helps, {meta['dev_hurts']} hurts)."]
    return "\n".join(lines) + "\n"
