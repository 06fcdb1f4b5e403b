"""``PatchGate``: a scikit-learn pipeline that decides per question whether to patch, saved without pickle.

Example:
    >>> from classifiers.gate import PatchGate
    >>> gate = PatchGate.fit(X_train, y_train, weights, spec=spec, profile=profile, model=model)
    >>> gate.tune_threshold(X_dev, vanilla_correct_dev, patched_correct_dev)
    >>> gate.save("gate_dir")                          # gate.json + gate.npz, no pickle
    >>> gate = PatchGate.load("gate_dir", model=model) # refuses another model, a tampered file, a wrong version
    >>> patcher = AutoPatcher(model, tok, gate.profile, gate=gate)

The fitted pipeline is ``StandardScaler -> PCA -> LogisticRegression``; every
preprocessing step lives inside it, so training and inference cannot diverge
(the published Auto-Patch notebook trained with a scaler and predicted
without one). Saving exports the pipeline's arrays (scaler mean and scale, PCA
mean and components, coefficients, intercept) to ``gate.npz`` and everything
else to ``gate.json``: the threshold, the feature spec, the patch profile, a
fingerprint of the model, the format version and the SHA-256 of the arrays.
Loading rebuilds the same computation in NumPy; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autopatch.errors import GateFileError
from autopatch.fingerprint import model_fingerprint
from autopatch.gating import GateDecision, GateInput
from autopatch.headers import read_header
from autopatch.profile import PatchProfile
from classifiers.features import FeatureSpec

GATE_FORMAT_VERSION = 1
MAX_GATE_BYTES = 64 * 2**20  # a gate is a few hundred kilobytes; anything near this is not one
_ARRAYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "intercept")


def make_pipeline(kind: str = "logreg", n_components: int = 32, seed: int = 0):
    """The scikit-learn pipeline for ``kind`` in {"logreg", "svm", "mlp"} (only logreg is persisted)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    heads = {
        "logreg": LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced"),
        "svm": SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced", probability=False, random_state=seed),
        "mlp": MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=500, random_state=seed),
    }
    return Pipeline([("scale", StandardScaler()), ("pca", PCA(n_components=n_components, random_state=seed)),
                     ("head", heads[kind])])


@dataclass
class PatchGate:
    """Scores a row from its vanilla-prefill features; patches when the score reaches ``threshold``."""

    arrays: dict[str, np.ndarray]
    threshold: float
    spec: FeatureSpec
    profile: PatchProfile
    fingerprint: str
    meta: dict

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.spec.layers

    # ---- training -------------------------------------------------------------------------

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None, *, spec: FeatureSpec,
            profile: PatchProfile, model: torch.nn.Module, n_components: int = 32, meta: dict | None = None) -> PatchGate:
        n_components = max(1, min(n_components, X.shape[0] - 1, X.shape[1]))
        pipeline = make_pipeline("logreg", n_components)
        pipeline.fit(X, y, head__sample_weight=sample_weight)
        scale, pca, head = pipeline.named_steps["scale"], pipeline.named_steps["pca"], pipeline.named_steps["head"]
        arrays = {"scaler_mean": scale.mean_, "scaler_scale": scale.scale_, "pca_mean": pca.mean_,
                  "pca_components": pca.components_, "coef": head.coef_[0], "intercept": head.intercept_}
        gate = cls({k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}, 0.5, spec, profile,
                   model_fingerprint(model), dict(meta or {}))
        # the NumPy path must reproduce scikit-learn's probabilities: checked once, here
        ours, theirs = gate.scores(X[:8]), pipeline.predict_proba(X[:8])[:, 1]
        if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-6, atol=1e-8, equal_nan=True):
            worst = float(np.max(np.abs(ours - theirs))) if ours.shape == theirs.shape else float("nan")
            raise GateFileError(f"The exported gate arrays do not reproduce scikit-learn's probabilities (largest "
                                f"difference {worst:.3g} on {len(theirs)} training rows), so a saved gate would score "
                                "differently. The installed scikit-learn computes the pipeline another way: report "
                                "this with the output of `pip show scikit-learn`.")
        return gate

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Probability that patching helps, for each row of ``X``."""
        a = self.arrays
        z = (np.atleast_2d(X) - a["scaler_mean"]) / a["scaler_scale"]
        z = (z - a["pca_mean"]) @ a["pca_components"].T
        logit = z @ a["coef"] + a["intercept"][0]
        return 1.0 / (1.0 + np.exp(-logit))

    def tune_threshold(self, X: np.ndarray, vanilla_correct: Sequence[float], patched_correct: Sequence[float]) -> float:
        """Pick the threshold that maximises end-to-end accuracy on a validation split (ties: patch less)."""
        scores = self.scores(X)
        vanilla, patched = np.asarray(vanilla_correct, float), np.asarray(patched_correct, float)
        candidates = np.unique(np.concatenate([scores, [1.0 + 1e-9]]))
        best_t, best_acc = 1.0 + 1e-9, float(vanilla.mean())
        for t in candidates:
            acc = float(np.where(scores >= t, patched, vanilla).mean())
            if acc > best_acc or (acc == best_acc and t > best_t):
                best_t, best_acc = float(t), acc
        self.threshold = best_t
        self.meta["threshold_tuning"] = {"n": len(scores), "accuracy": best_acc, "vanilla_accuracy": float(vanilla.mean())}
        return best_t

    # ---- inference (the autopatch.gating.Gate protocol) -----------------------------------

    def decide(self, inputs: Sequence[GateInput]) -> list[GateDecision]:
        if not inputs:
            return []
        scores = self.scores(np.stack([self.spec.vector(i) for i in inputs]))
        return [GateDecision(bool(s >= self.threshold), float(s),
                             f"gate: P(patch helps)={s:.3f} {'>=' if s >= self.threshold else '<'} "
                             f"threshold {self.threshold:.3f}")
                for s in scores]

    # ---- persistence ----------------------------------------------------------------------

    def with_threshold(self, threshold: float) -> PatchGate:
        """A copy that patches where the score reaches ``threshold`` (a server request's override); this gate is
        never modified."""
        return replace(self, threshold=float(threshold))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays)  # type: ignore[arg-type]  # mypy matches **arrays against savez's allow_pickle: bool
        blob = buffer.getvalue()
        (directory / "gate.npz").write_bytes(blob)
        header = {"format": "autopatch-gate", "version": GATE_FORMAT_VERSION, "threshold": self.threshold,
                  "feature_spec": self.spec.to_dict(), "profile": self.profile.to_dict(),
                  "model_fingerprint": self.fingerprint, "arrays_sha256": hashlib.sha256(blob).hexdigest(),
                  "meta": self.meta}
        (directory / "gate.json").write_text(json.dumps(header, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory, *, model: torch.nn.Module | None = None) -> PatchGate:
        """Load a saved gate; with ``model``, refuse a gate trained on another model.

        Every refusal is a :class:`GateFileError` naming the file and the field: symlinks, files over
        :data:`MAX_GATE_BYTES`, a checksum mismatch, arrays that are not plain finite numbers of consistent
        shapes, a threshold outside [0, 1], feature layers the model does not have.
        """
        directory = Path(str(directory))
        for name in ("gate.json", "gate.npz"):
            path = directory / name
            if path.is_symlink():
                raise GateFileError(f"{path} is a symbolic link; gates are read from plain files only.")
            if path.is_file() and path.stat().st_size > MAX_GATE_BYTES:
                raise GateFileError(f"{path} is {path.stat().st_size} bytes, over the {MAX_GATE_BYTES}-byte limit "
                                    "for a gate file.")
        header = read_header(directory / "gate.json", fmt="autopatch-gate", versions=(GATE_FORMAT_VERSION,),
                             what="gate", redo="retrain it with `autopatch train-gate`", error=GateFileError)
        try:
            blob = (directory / "gate.npz").read_bytes()
        except OSError as err:
            raise GateFileError(f"Cannot read a gate from {directory}: {err}. Expected gate.json and gate.npz "
                                "written by PatchGate.save / `autopatch train-gate`.") from err
        if hashlib.sha256(blob).hexdigest() != header.get("arrays_sha256"):
            raise GateFileError(f"{directory}/gate.npz does not match the checksum in gate.json: the gate was "
                                "modified or corrupted. Retrain it or restore the original files.")
        arrays = _read_arrays(directory / "gate.npz", blob)
        try:
            gate = cls(arrays, float(header["threshold"]), FeatureSpec.from_dict(header["feature_spec"]),
                       PatchProfile.from_dict(header["profile"]), str(header["model_fingerprint"]), dict(header.get("meta", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise GateFileError(f"{directory}/gate.json is malformed: {err}") from err
        _check_gate(directory, gate, model)
        if model is not None and model_fingerprint(model) != gate.fingerprint:
            raise GateFileError(f"The gate in {directory} was trained on another model (fingerprint {gate.fingerprint}, "
                                f"this model {model_fingerprint(model)}). Train a gate for this model with "
                                "`autopatch train-gate`.")
        return gate


def _read_arrays(path: Path, blob: bytes) -> dict[str, np.ndarray]:
    """The six arrays of ``gate.npz``: plain numbers only (no pickle), each checked for size before it is read."""
    import zipfile

    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:  # plain arrays only: no pickle
            missing = [k for k in _ARRAYS if k not in data.files]
            if missing:
                raise GateFileError(f"{path} lacks arrays {missing}.")
            for k in _ARRAYS:
                size = data.zip.getinfo(f"{k}.npy").file_size
                if size > MAX_GATE_BYTES:
                    raise GateFileError(f"{path}: array {k!r} unpacks to {size} bytes, over the {MAX_GATE_BYTES}-byte "
                                        "limit.")
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in _ARRAYS}
    except GateFileError:
        raise
    except (ValueError, TypeError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise GateFileError(f"{path} is not a plain-number gate array file ({type(err).__name__}: {err}).") from err
    return arrays


def _check_gate(directory: Path, gate: PatchGate, model: torch.nn.Module | None) -> None:
    """Refuse values that would make the gate score NaN or fail later inside ``generate``."""
    a = gate.arrays
    for key, v in a.items():
        if not np.all(np.isfinite(v)):
            raise GateFileError(f"{directory}/gate.npz: array {key!r} holds NaN or infinite values.")
    if np.any(a["scaler_scale"] == 0):
        raise GateFileError(f"{directory}/gate.npz: array 'scaler_scale' holds zeros (a division by zero).")
    d = int(a["scaler_mean"].shape[-1]) if a["scaler_mean"].ndim else 0
    k = int(a["pca_components"].shape[0]) if a["pca_components"].ndim else 0
    expected = {"scaler_mean": (d,), "scaler_scale": (d,), "pca_mean": (d,),
                "pca_components": (k, d), "coef": (k,), "intercept": (1,)}
    for name, shape in expected.items():
        if a[name].shape != shape:
            raise GateFileError(f"{directory}/gate.npz: array {name!r} has shape {a[name].shape}, expected {shape} "
                                "for the other arrays' sizes.")
    if not (np.isfinite(gate.threshold) and 0.0 <= gate.threshold <= 1.0 + 1e-6):
        raise GateFileError(f"{directory}/gate.json: 'threshold' is {gate.threshold}; it must be a probability in [0, 1].")
    if model is not None:
        from autopatch.architectures import num_layers

        n = num_layers(model)
        bad = [layer for layer in (*gate.spec.layers, gate.profile.source_layer, gate.profile.target_layer)
               if not 0 <= layer < n]
        if bad:
            raise GateFileError(f"{directory}/gate.json: layers {bad} do not exist in this {n}-layer model.")
        config: Any = model.config
        width = gate.spec.width(int(config.hidden_size))
        if width != d:
            raise GateFileError(f"{directory}/gate.npz: the arrays expect {d} features but the feature spec gives "
                                f"{width} on this model.")
