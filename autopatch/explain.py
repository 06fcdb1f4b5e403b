"""Where is the bridge resolved? Every layer's state at the located positions, read back as words.

Example:
    >>> from autopatch.explain import explain
    >>> view = explain(model, tok, "What is the capital of the country where the Colosseum is located?")
    >>> print(view.table())              # one row per layer: what each reading decodes to, with its probability
    >>> view.save("runs/colosseum")      # explain.json and explain.png (a heat map)

For one question (Patchscopes' diagnostic use, Ghandeharioun et al. 2024, §4):

* the located *subject* and *span end* states at every layer, read through the
  token-identity Patchscope (``cat -> cat; ...; ? ->``, same layer in and out)
  and through the *span* Patchscope (the first hop asked as a question with the
  subject's state in its slot, as ``verbalize`` reads the bridge);
* the *last* token's state at every layer, through the logit lens (final norm
  and unembedding) and through the identity Patchscope.

One forward pass captures every layer; each Patchscope is then one batched
forward with one row per (layer, source), so the whole view costs three
forward passes whatever the depth. With ``bridge`` (the gold first-hop answer,
or the one ``decompose`` found) each reading also reports the probability that
the model starts writing the bridge there (its first token after a space or at
the start of a turn, :func:`bridge_token_ids`), which is what the heat map shows.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch.architectures import final_norm, num_layers, unembedding
from autopatch.engine import PatchEdit, capture, patch
from autopatch.locate import UnlocatableQuestion
from autopatch.patchscope import IDENTITY_PROMPT, patched_prompt
from autopatch.plan import Planner
from autopatch.profile import Position
from autopatch.prompts import PromptFormat, target_prompt

READINGS = ("subject: identity", "span end: identity", "subject: span prompt", "last: logit lens", "last: identity")


@dataclass(frozen=True)
class Reading:
    """What one state decodes to: the top token, its probability, and the probability of starting the bridge."""

    token: str
    prob: float
    bridge_prob: float | None = None


@dataclass
class Explanation:
    """Per layer and reading (:data:`READINGS`), what the state decodes to; see the module docstring."""

    question: str
    span: str
    subject: str
    span_prompt: str
    bridge: str | None
    layers: list[int]
    readings: dict[str, list[Reading]] = field(default_factory=dict)  # reading -> one per layer

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["readings"] = {name: [asdict(r) for r in rows] for name, rows in self.readings.items()}
        return data

    def table(self) -> str:
        """A markdown table: one row per layer, one column per reading, ``token (p)``; ``*`` marks the bridge."""
        head = "| layer | " + " | ".join(READINGS) + " |"
        lines = [f"Question: {self.question}", f"Span: {self.span!r} (subject {self.subject!r}); bridge: "
                 f"{self.bridge or 'not given'}", "", head, "|---|" + "---|" * len(READINGS)]
        for i, layer in enumerate(self.layers):
            cells = []
            for name in READINGS:
                r = self.readings[name][i]
                mark = "*" if self.bridge and _same_word(r.token, self.bridge) else ""
                cells.append(f"{mark}{r.token.strip() or repr(r.token)}{mark} ({r.prob:.2f})")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path) -> Path:
        """Write ``explain.json``, ``explain.md`` and ``explain.png`` (heat map) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "explain.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        (directory / "explain.md").write_text(self.table())
        self.heatmap(directory / "explain.png")
        return directory

    def heatmap(self, path: Path) -> None:
        """Layers by readings, coloured by the bridge's probability (or the top token's without a bridge)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        use_bridge = self.bridge is not None
        grid = np.array([[(r.bridge_prob if use_bridge else r.prob) or 0.0 for r in self.readings[name]]
                         for name in READINGS]).T
        fig, ax = plt.subplots(figsize=(9, 1.5 + 0.32 * len(self.layers)))
        image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(grid.max()), 1e-6))
        for i in range(len(self.layers)):
            for j, name in enumerate(READINGS):
                token = self.readings[name][i].token.strip()[:10]
                ax.text(j, i, token, ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.5 * grid.max() else "black")
        ax.set_xticks(range(len(READINGS)), list(READINGS), rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_ylabel("layer")
        what = f"P(bridge '{self.bridge}')" if use_bridge else "P(top token)"
        ax.set_title(f"{self.question[:70]}\ncell: top token; colour: {what}", fontsize=8)
        fig.colorbar(image)
        with warnings.catch_warnings():  # tokens of other scripts may lack a glyph in the default font
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        plt.close(fig)


def _same_word(token: str, bridge: str) -> bool:
    t, b = token.strip().lower(), bridge.strip().lower()
    return bool(t) and (b == t or b.startswith(t) and len(t) >= 3)


def bridge_token_ids(tok: PreTrainedTokenizerBase, bridge: str) -> tuple[int, ...]:
    """The tokens the model starts ``bridge`` with, however the slot is written: after a space (a few-shot answer,
    the identity prompt's ``->``) or at the start of a turn (a chat model's answer). A variant whose first token is
    only whitespace (a byte-level tokenizer's space) is left out: that token starts any word."""
    ids: list[int] = []
    for text in (" " + bridge.strip(), bridge.strip()):
        first = tok(text, add_special_tokens=False).input_ids[:1]
        if first and str(tok.decode(first)).strip() and first[0] not in ids:
            ids.append(int(first[0]))
    return tuple(ids)


def _readings(logits: torch.Tensor, tok: PreTrainedTokenizerBase, bridge_ids: Sequence[int]) -> list[Reading]:
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.max(dim=-1)
    bridge = probs[:, list(bridge_ids)].sum(-1) if bridge_ids else None
    return [Reading(cast(str, tok.decode([int(i)])), float(p), None if bridge is None else float(bridge[r]))
            for r, (p, i) in enumerate(zip(top.values, top.indices))]


@torch.no_grad()
def _patched_last_logits(model, prompt_ids: torch.Tensor, position: int, edits: list[tuple[int, torch.Tensor]],
                         ) -> torch.Tensor:
    """One row per (layer, vector): ``prompt_ids`` with the vector at ``position`` of that layer; last logits."""
    device = next(model.parameters()).device
    ids = prompt_ids.reshape(1, -1).repeat(len(edits), 1).to(device)
    with patch(model, [PatchEdit(layer, row, position, vec) for row, (layer, vec) in enumerate(edits)]):
        return cast(Any, model)(input_ids=ids, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def explain(model, tok: PreTrainedTokenizerBase, question: str, *, fmt: PromptFormat | None = None,
            bridge: str | None = None, layers: list[int] | None = None, placeholder: str = "x") -> Explanation:
    """The layer-by-layer view of ``question`` (see the module docstring); raises ``UnlocatableQuestion``."""
    fmt = fmt or PromptFormat.for_tokenizer(tok)
    layers = list(range(num_layers(model))) if layers is None else list(layers)
    ids = fmt.encode(tok, fmt.render(question, tok)).input_ids[0]
    plan = Planner(tok, fmt).row(ids, question)
    location = plan.location
    if location is None or not plan.positions:
        raise UnlocatableQuestion(question, plan.why_not.removeprefix("unlocatable: "))
    positions = [plan.positions[kind] for kind in (Position.SUBJECT_END, Position.SPAN_END, Position.LAST)]
    device = next(model.parameters()).device
    with capture(model, layers, positions) as cap:
        cast(Any, model)(input_ids=ids[None].to(device), logits_to_keep=1)
    subject, span_end, last = ([cap.states[layer][0, k] for layer in layers] for k in range(3))
    bridge_ids = bridge_token_ids(tok, bridge) if bridge else ()

    identity = patched_prompt(tok, IDENTITY_PROMPT)
    rows = [(layer, v) for vectors in (subject, span_end, last) for layer, v in zip(layers, vectors)]
    id_logits = _patched_last_logits(model, identity.input_ids[0], identity.position, rows)
    n = len(layers)
    span_target = target_prompt(fmt, tok, location.first_hop(), placeholder=placeholder)
    span_logits = _patched_last_logits(model, span_target.input_ids, span_target.placeholder_index,
                                       list(zip(layers, subject)))
    lens_logits = unembedding(model)(final_norm(model)(torch.stack(last)[:, None]))[:, 0]

    view = Explanation(question, location.span, location.subject, span_target.text, bridge, layers)
    view.readings = {
        "subject: identity": _readings(id_logits[:n], tok, bridge_ids),
        "span end: identity": _readings(id_logits[n:2 * n], tok, bridge_ids),
        "subject: span prompt": _readings(span_logits, tok, bridge_ids),
        "last: logit lens": _readings(lens_logits, tok, bridge_ids),
        "last: identity": _readings(id_logits[2 * n:], tok, bridge_ids),
    }
    return view
