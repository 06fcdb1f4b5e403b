"""Cross-model patching (Patchscopes §4.3): a smaller model reads the bridge; its state, mapped, is patched into a larger one.

Example:
    >>> small, small_tok = load_model("qwen2.5-coder-0.5b-instruct")
    >>> big, tok = load_model("qwen2.5-coder-1.5b-instruct")
    >>> state_map = fit_state_map(small, big, tok, prompts, source_layer=12, target_layer=14)   # calib prompts
    >>> state_map.save("maps/qwen05-to-qwen15")
    >>> attach(big, small, StateMap.load("maps/qwen05-to-qwen15", source=small, target=big))
    >>> profile = replace(reroute_profile, strategy="cross-model")
    >>> AutoPatcher(big, tok, profile, gate=AlwaysPatch()).answer("What is the capital of ...?")

The ``cross-model`` strategy is ``reroute`` with another source: the larger model's own state of the first hop
is replaced by the smaller model's state at the same token of the same prompt, sent through a linear map fitted
on calib prompts (ridge regression from the source layer to the target's state at the layer the profile reads),
as the paper fits one between Vicuna 7B and 13B. The two models must share a tokenizer, so "the same token" is
the same index. The map is saved as ``map.npz`` (plain arrays, never pickled) and ``map.json`` (layers, both
models' fingerprints, the fit's held-out R², and the arrays' SHA-256), and refused at load when any of that
does not match. Without a source model attached, the strategy is refused with what to do, and it is left out of
every list of strategies that must run on one model alone (:func:`autopatch.registry.standalone_strategies`).
"""

from __future__ import annotations

import hashlib
import io
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autopatch.engine import capture
from autopatch.errors import ConfigError
from autopatch.fingerprint import model_fingerprint
from autopatch.headers import read_header
from autopatch.prefix_cache import left_pad

__all__ = ["StateMap", "attach", "attached", "cross_model_jobs", "detach", "fit_state_map", "paired_states",
           "shipped_map"]

MAP_FORMAT_VERSION = 1
MAX_MAP_BYTES = 256 * 2**20


@dataclass
class StateMap:
    """``target_state ≈ source_state @ weight + bias``: the source's block ``source_layer`` output to the target's
    block ``target_layer`` output at the same token."""

    weight: np.ndarray  # (source hidden, target hidden)
    bias: np.ndarray  # (target hidden,)
    source_layer: int
    target_layer: int
    source_fingerprint: str
    target_fingerprint: str
    meta: dict = field(default_factory=dict)
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # device -> (weight, bias)

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        """Map ``(..., source hidden)`` states into the target's space (float32, on ``states``' device)."""
        if states.device not in self._on:  # moved to a device once, not on every call
            self._on[states.device] = (torch.from_numpy(self.weight).to(states.device),
                                       torch.from_numpy(self.bias).to(states.device))
        weight, bias = self._on[states.device]
        return states.float() @ weight + bias

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
        blob = buffer.getvalue()
        (directory / "map.npz").write_bytes(blob)
        header = {"format": "autopatch-state-map", "version": MAP_FORMAT_VERSION,
                  "arrays_sha256": hashlib.sha256(blob).hexdigest(), "source_layer": self.source_layer,
                  "target_layer": self.target_layer, "source_fingerprint": self.source_fingerprint,
                  "target_fingerprint": self.target_fingerprint, "meta": self.meta}
        (directory / "map.json").write_text(json.dumps(header, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, source: torch.nn.Module | None = None,
             target: torch.nn.Module | None = None) -> StateMap:
        """A saved map; with ``source``/``target``, refused unless it was fitted on those very models."""
        directory = Path(directory)
        for name in ("map.json", "map.npz"):
            path = directory / name
            if path.is_symlink():
                raise ConfigError(f"{path} is a symbolic link; state maps are read from plain files only.")
            if not path.is_file():
                raise ConfigError(f"{path} is missing: a state map is map.json and map.npz written by StateMap.save.")
            if path.stat().st_size > MAX_MAP_BYTES:
                raise ConfigError(f"{path} is over the {MAX_MAP_BYTES}-byte limit for a state map.")
        header = read_header(directory / "map.json", fmt="autopatch-state-map", versions=(MAP_FORMAT_VERSION,),
                             what="state map", redo="fit it again with `python -m eval.fit_state_map`",
                             error=ConfigError)
        blob = (directory / "map.npz").read_bytes()
        if hashlib.sha256(blob).hexdigest() != header.get("arrays_sha256"):
            raise ConfigError(f"{directory}/map.npz does not match the checksum in map.json: the map was modified "
                              "or corrupted. Fit it again or restore the original files.")
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
                weight, bias = np.asarray(arrays["weight"], np.float32), np.asarray(arrays["bias"], np.float32)
            state_map = cls(weight, bias, int(header["source_layer"]), int(header["target_layer"]),
                            str(header["source_fingerprint"]), str(header["target_fingerprint"]),
                            dict(header.get("meta", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{directory}: a malformed state map ({err}).") from err
        if weight.ndim != 2 or bias.shape != (weight.shape[1],) or not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ConfigError(f"{directory}/map.npz: weight {weight.shape} and bias {bias.shape} are not a finite "
                              "(source hidden, target hidden) map and its (target hidden,) offset.")
        for role, model, expected in (("source", source, state_map.source_fingerprint),
                                      ("target", target, state_map.target_fingerprint)):
            if model is not None and model_fingerprint(model) != expected:
                raise ConfigError(f"The state map in {directory} was fitted with another {role} model "
                                  f"(fingerprint {expected}, this one {model_fingerprint(model)}).")
        return state_map


def shipped_map(target: torch.nn.Module, source: torch.nn.Module) -> tuple[StateMap, Path] | None:
    """The map shipped for this pair of models (``autopatch/profiles/<target>/maps/<name>/``, matched by both
    fingerprints), with its folder; ``None`` when none is."""
    from autopatch.profile import shipped_profile_dir

    directory = shipped_profile_dir(model_fingerprint(target))
    if directory is None or not (directory / "maps").is_dir():
        return None
    wanted = model_fingerprint(source)
    for folder in sorted(p for p in (directory / "maps").iterdir() if (p / "map.json").is_file()):
        try:
            if json.loads((folder / "map.json").read_text()).get("source_fingerprint") == wanted:
                return StateMap.load(folder, source=source, target=target), folder
        except (OSError, json.JSONDecodeError):
            continue
    return None


# ---- fitting --------------------------------------------------------------------------------


def paired_states(source: torch.nn.Module, target: torch.nn.Module, rows: Sequence[Sequence[int]], *,
                  source_layer: int, target_layer: int, last: int = 32, batch_size: int = 8,
                  pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, Y)``: both models' states at each of the last ``last`` tokens of every prompt (token ids, shared)."""
    xs, ys = [], []
    for start in range(0, len(rows), batch_size):
        chunk = [torch.tensor(list(r), dtype=torch.long) for r in rows[start:start + batch_size]]
        positions = [list(range(max(0, len(r) - last), len(r))) for r in chunk]
        width = max(len(p) for p in positions)
        positions = [p + [p[-1]] * (width - len(p)) for p in positions]  # same count per row; repeats dropped below
        ids, mask = left_pad(chunk, pad_token_id)
        got = []
        for model, layer in ((source, source_layer), (target, target_layer)):
            device = next(model.parameters()).device
            with torch.no_grad(), capture(model, [layer], positions, attention_mask=mask.to(device)) as cap:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            got.append(cap.states[layer].float().cpu())
        for k, r in enumerate(chunk):
            keep = min(last, len(r))
            xs.append(got[0][k, :keep].numpy())
            ys.append(got[1][k, :keep].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _ridge(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    mx, my = X.mean(0), Y.mean(0)
    Xc = (X - mx).astype(np.float64)
    gram = Xc.T @ Xc + alpha * len(X) * np.eye(X.shape[1])
    weight = np.linalg.solve(gram, Xc.T @ (Y - my).astype(np.float64))
    return weight.astype(np.float32), (my - mx @ weight).astype(np.float32)


def _r2(X: np.ndarray, Y: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    residual = Y - (X @ weight + bias)
    return float(1.0 - (residual ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


def fit_state_map(source: torch.nn.Module, target: torch.nn.Module, tok, prompts: Sequence[str], *, source_layer: int,
                  target_layer: int, last: int = 32, alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                  held_out: float = 0.2, batch_size: int = 8, source_tok=None) -> StateMap:
    """Ridge-fit the map on ``prompts`` (calib text only): the penalty chosen on a held-out share of the prompts by
    R², then refitted on all of them. ``meta`` records pairs, penalty and the held-out R² of every penalty.
    ``tok`` is the target's tokenizer; ``source_tok``, when given, must have the same vocabulary."""
    if source_tok is not None:
        check_shared_vocabulary(tok, source_tok)
    rows = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: hashlib.sha256(prompts[i].encode()).hexdigest())
    cut = max(1, int(len(rows) * held_out))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = {"fit": [rows[i] for i in order[cut:]], "held": [rows[i] for i in order[:cut]]}
    X, Y = paired_states(source, target, pairs["fit"], source_layer=source_layer, target_layer=target_layer,
                         last=last, batch_size=batch_size, pad_token_id=pad)
    Xh, Yh = paired_states(source, target, pairs["held"], source_layer=source_layer, target_layer=target_layer,
                           last=last, batch_size=batch_size, pad_token_id=pad)
    scores = {float(a): _r2(Xh, Yh, *_ridge(X, Y, a)) for a in alphas}
    best = max(scores, key=lambda a: (scores[a], a))
    weight, bias = _ridge(np.concatenate([X, Xh]), np.concatenate([Y, Yh]), best)
    meta = {"prompts": len(prompts), "pairs": len(X) + len(Xh), "last_tokens": last, "alpha": best,
            "held_out_r2": scores[best], "held_out_r2_by_alpha": {str(a): s for a, s in scores.items()},
            "held_out_prompts": cut}
    return StateMap(weight, bias, source_layer, target_layer, model_fingerprint(source), model_fingerprint(target), meta)


# ---- the attached source, and the strategy's states -----------------------------------------


@dataclass(frozen=True)
class _Source:
    model: torch.nn.Module
    state_map: StateMap


_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, _Source] = weakref.WeakKeyDictionary()


def attach(target: torch.nn.Module, source: torch.nn.Module, state_map: StateMap) -> None:
    """Let ``cross-model`` patch ``target`` from ``source`` through ``state_map`` (checked against both models)."""
    for role, model, expected in (("source", source, state_map.source_fingerprint),
                                  ("target", target, state_map.target_fingerprint)):
        if model_fingerprint(model) != expected:
            raise ConfigError(f"This state map was fitted with another {role} model (fingerprint {expected}, this "
                              f"one {model_fingerprint(model)}).")
    _ATTACHED[target] = _Source(source, state_map)


def detach(target: torch.nn.Module) -> None:
    _ATTACHED.pop(target, None)


def attached(target: torch.nn.Module) -> Any:
    """The ``(source model, state map)`` attached to ``target``, else ``None``."""
    found = _ATTACHED.get(target)
    return None if found is None else (found.model, found.state_map)


def check_shared_vocabulary(tok, source_tok) -> None:
    """Refuse two tokenizers with different vocabularies (the source reads the target's token ids)."""
    if tok is not source_tok and tok.get_vocab() != source_tok.get_vocab():
        raise ConfigError("cross-model patching needs the two models to share a tokenizer (the same vocabulary): "
                          "the source reads the target's prompt token for token.")


def cross_model_jobs(model: torch.nn.Module, tok, profile, jobs: Sequence[Any]) -> list[Any]:
    """Registered as ``cross-model``'s source: each job's vector becomes the attached source model's state at the
    same token of the same prompt, mapped into ``model``'s space (further positions are dropped)."""
    found = attached(model)
    if found is None:
        raise ConfigError("The cross-model strategy needs a source model: autopatch.crossmodel.attach(model, source, "
                          "StateMap.load(...)) in Python, or `autopatch eval --source-model NAME --state-map DIR`.")
    source, state_map = found
    if state_map.target_layer != profile.source_layer:
        raise ConfigError(f"The attached state map imitates layer {state_map.target_layer} of this model, but the "
                          f"profile reads layer {profile.source_layer}; use a profile with source_layer "
                          f"{state_map.target_layer} or fit a map for layer {profile.source_layer}.")
    if not jobs:
        return []
    rows = [job.prompt_ids.cpu() for job in jobs]
    ids, mask = left_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
    device = next(source.parameters()).device
    with torch.no_grad(), capture(source, [state_map.source_layer], [[job.source_index] for job in jobs],
                                  attention_mask=mask.to(device)) as cap:
        source(input_ids=ids.to(device), attention_mask=mask.to(device))
    mapped = state_map.apply(cap.states[state_map.source_layer][:, 0])
    return [replace(job, vector=mapped[k].to(job.vector.device, job.vector.dtype), more=())
            for k, job in enumerate(jobs)]
