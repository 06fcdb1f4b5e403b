"""The three ways to use a captured bridge state: reroute, backpatch, verbalize.

Example:
    >>> from autopatch.strategies import PatchJob, plan_targets, run_targets
    >>> jobs = [PatchJob(row=0, location=loc, prompt_ids=ids, source_index=7, vector=h)]
    >>> targets = plan_targets(model, tok, profile, jobs)        # fresh prompts + patch edits
    >>> out = run_targets(model, tok, targets, max_new_tokens=16)

Each strategy turns a :class:`PatchJob` (one row to correct) into a
:class:`Target`: the token ids to generate from and the patches to apply to
their prefill. :func:`autopatch.generate.run_targets` batches all targets with left padding into one
``generate`` call. Controls (``random``, ``zero``, ``nopatch``) replace the
vector, or drop the patch, while keeping everything else identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from autopatch import registry
from autopatch.datatypes import PatchJob as PatchJob  # re-exported: the types live in autopatch.datatypes
from autopatch.datatypes import Target as Target
from autopatch.generate import run_targets as run_targets  # re-exported: the one layout-and-generate lives there
from autopatch.patchscope import IDENTITY_PLACEHOLDER, IDENTITY_PROMPT, patched_prompt
from autopatch.prefix_cache import left_pad as left_pad  # re-exported: batches are laid out by autopatch.prefix_cache
from autopatch.profile import PatchProfile
from autopatch.prompts import target_prompt
from autopatch.stopping import BRIDGE_STOPS, stop_token_ids

Control = str  # a name registered in autopatch.registry.CONTROLS


def _placeholder(profile: PatchProfile, job: PatchJob) -> str:
    return job.placeholder if job.placeholder is not None else profile.placeholder


def control_vector(vector: torch.Tensor, control: Control | None, seed_text: str) -> torch.Tensor | None:
    """The vector a control patches in, by its registered rule (``None``: no patch); ``vector`` without one."""
    return vector if control is None else registry.control(control).rule()(vector, seed_text)


def random_like(vector: torch.Tensor, seed_text: str) -> torch.Tensor:
    """The ``random`` control: a random vector of ``vector``'s norm, seeded by ``seed_text`` (reproducible)."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    noise = torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (noise * (vector.float().norm() / noise.norm())).to(vector.dtype)


def zero_like(vector: torch.Tensor, seed_text: str) -> torch.Tensor:
    """The ``zero`` control."""
    return torch.zeros_like(vector)


def no_vector(vector: torch.Tensor, seed_text: str) -> None:
    """The ``nopatch`` and ``text`` controls: nothing is patched in."""
    return None


def _reroute(tok: PreTrainedTokenizerBase, profile: PatchProfile, job: PatchJob, vector: torch.Tensor | None) -> Target:
    target = target_prompt(profile.prompt_format, tok, job.location.second_hop, placeholder=_placeholder(profile, job))
    edits = [] if vector is None else [(profile.target_layer, target.placeholder_index, vector)]
    return Target(job.row, target.input_ids, edits, target.text)


def _backpatch(tok: PreTrainedTokenizerBase, profile: PatchProfile, job: PatchJob, vector: torch.Tensor | None) -> Target:
    edits = [] if vector is None else [(profile.target_layer, job.source_index, vector),
                                       *((profile.target_layer, index, v) for index, v in job.more)]
    return Target(job.row, job.prompt_ids, edits, cast(str, tok.decode(job.prompt_ids, skip_special_tokens=True)))


def _bridge_from_description(text: str) -> str:
    """The words before the identity prompt's separator (``;``) or the end of the line."""
    return text.split(";", 1)[0].split("\n", 1)[0].strip().strip("\"'.,")


def _bridge_from_answer(text: str) -> str:
    """The first line of a QA answer."""
    return text.split("\n", 1)[0].strip().strip("\"'.,")


def _bridge_prompts(tok: PreTrainedTokenizerBase, profile: PatchProfile,
                    jobs: Sequence[PatchJob]) -> list[tuple[torch.Tensor, int]]:
    """Per job, the decoding prompt's ids and the index of its placeholder token."""
    prompts = []
    if profile.bridge_prompt == "identity":
        for job in jobs:
            words = IDENTITY_PLACEHOLDER if job.placeholder is None else job.placeholder
            identity = patched_prompt(tok, IDENTITY_PROMPT.replace(IDENTITY_PLACEHOLDER, words), words)
            prompts.append((identity.input_ids[0], identity.position))
        return prompts
    for job in jobs:
        t = target_prompt(profile.prompt_format, tok, job.location.first_hop(), placeholder=_placeholder(profile, job))
        prompts.append((t.input_ids, t.placeholder_index))
    return prompts


@torch.no_grad()
def decode_bridges_counted(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    profile: PatchProfile,
    jobs: Sequence[PatchJob],
    vectors: Sequence[torch.Tensor | None],
) -> list[tuple[str, int]]:
    """The words each job's vector decodes to under ``profile.bridge_prompt`` (one batched generate), with the
    number of tokens each decoding generated."""
    prompts = _bridge_prompts(tok, profile, jobs)
    targets = [Target(i, ids, [] if v is None else [(profile.target_layer, position, v)])
               for i, ((ids, position), v) in enumerate(zip(prompts, vectors))]
    out, width = run_targets(model, tok, targets, do_sample=False, max_new_tokens=profile.max_bridge_tokens,
                             eos_token_id=stop_token_ids(tok, BRIDGE_STOPS))
    parse = _bridge_from_description if profile.bridge_prompt == "identity" else _bridge_from_answer
    return [(parse(cast(str, tok.decode(out[i, width:], skip_special_tokens=True))),
             len(generated_ids(out[i, width:], tok.pad_token_id))) for i in range(len(jobs))]


def generated_ids(new_ids: torch.Tensor, pad_id: int) -> list[int]:
    """The tokens a row generated, without the padding ``generate`` appends to rows that finished early."""
    ids = new_ids.tolist()
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def verbalized_target(tok: PreTrainedTokenizerBase, profile: PatchProfile, job: PatchJob, bridge: str,
                      bridge_tokens: int = 0) -> Target:
    """The explicit second-hop question with ``bridge`` in the slot (the span itself if nothing was decoded)."""
    text = profile.prompt_format.render(job.location.fill(bridge or job.location.span), tok)
    return Target(job.row, tok(text, return_tensors="pt").input_ids[0], [], text, bridge, bridge_tokens)


def build_reroute(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob], vectors) -> list[Target]:
    """Registered as ``reroute`` in :mod:`autopatch.registry`."""
    return [_reroute(tok, profile, job, vector) for job, vector in zip(jobs, vectors)]


def build_backpatch(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob], vectors) -> list[Target]:
    """Registered as ``backpatch`` in :mod:`autopatch.registry`."""
    return [_backpatch(tok, profile, job, vector) for job, vector in zip(jobs, vectors)]


def build_verbalize(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob], vectors) -> list[Target]:
    """Registered as ``verbalize`` in :mod:`autopatch.registry`."""
    bridges = decode_bridges_counted(model, tok, profile, jobs, vectors)
    return [verbalized_target(tok, profile, job, bridge, n) for job, (bridge, n) in zip(jobs, bridges)]


def spoken_bridges(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob]) -> list[tuple[str, int]]:
    """``decompose``'s bridges: each job's first-hop span asked as a question, in words (the span prompt with the
    subject's own words where ``verbalize`` patches its state), with the tokens each answer took."""
    text_jobs = [replace(job, placeholder=job.location.subject) for job in jobs]
    return decode_bridges_counted(model, tok, replace(profile, bridge_prompt="span"), text_jobs, [None] * len(jobs))


def build_decompose(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob], vectors) -> list[Target]:
    """Registered as ``decompose``: text only. The first-hop span is asked as a question ("What is the country
    where the Colosseum is located?"), and its short answer fills the second-hop slot; no state is patched.

    The same prompts and token budget as ``verbalize`` with the span prompt, with the subject's words where
    ``verbalize`` patches the subject's state, so the two differ only in what the hidden state adds.
    """
    return [verbalized_target(tok, profile, job, bridge, n)
            for job, (bridge, n) in zip(jobs, spoken_bridges(model, tok, profile, jobs))]


def _same_bridge(a: str, b: str) -> bool:
    """Two bridges name the same thing: equal once case, punctuation and a leading article are set aside."""
    def norm(text: str) -> str:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        return " ".join(words[1:] if words[:1] in (["the"], ["a"], ["an"]) else words)
    return norm(a) == norm(b)


@torch.no_grad()
def answer_confidence(model: torch.nn.Module, tok: PreTrainedTokenizerBase, targets: Sequence[Target],
                      max_new_tokens: int) -> list[tuple[float, int]]:
    """Per target, the mean log-probability of its greedy answer line (up to ``max_new_tokens`` tokens, to the first
    line break or EOS) and the tokens generated to find it; ``-inf`` for an empty answer."""
    if not targets:
        return []
    out, width = run_targets(model, tok, targets, do_sample=False, max_new_tokens=max_new_tokens,
                             output_scores=True, return_dict_in_generate=True,
                             eos_token_id=stop_token_ids(tok, BRIDGE_STOPS))
    steps = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)  # (rows, steps, vocab)
    results = []
    for i in range(len(targets)):
        ids = generated_ids(out.sequences[i, width:], tok.pad_token_id)
        kept = 0
        while kept < len(ids) and "\n" not in tok.decode(ids[: kept + 1], skip_special_tokens=True):
            kept += 1
        chosen = [float(steps[i, k, ids[k]]) for k in range(kept)]
        results.append((sum(chosen) / len(chosen) if chosen else float("-inf"), len(ids)))
    return results


def build_second_opinion(model, tok, profile: PatchProfile, jobs: Sequence[PatchJob], vectors) -> list[Target]:
    """Registered as ``second-opinion``: ``decompose``, with the hidden state as a second opinion.

    The first hop is asked in words (``decompose``'s bridge) and read from the state (``verbalize``'s Patchscope,
    under ``profile``). Where the two agree, or the state reads nothing, the words' bridge fills the slot, as in
    ``decompose``. Where they disagree, the second hop is asked with each bridge, and the one whose answer line the
    model gives with the higher mean log-probability wins. Every token spent (both bridges, both probes) counts in
    the target's ``bridge_tokens``.
    """
    said = spoken_bridges(model, tok, profile, jobs)
    read = decode_bridges_counted(model, tok, profile, jobs, vectors)
    disputed = [i for i, ((a, _), (b, _)) in enumerate(zip(said, read)) if b and not _same_bridge(a, b)]
    probes = answer_confidence(model, tok, [verbalized_target(tok, profile, jobs[i], bridge)
                                            for i in disputed for bridge in (said[i][0], read[i][0])],
                               profile.max_bridge_tokens)
    chosen = {i: (read[i][0] if probes[2 * k + 1][0] > probes[2 * k][0] else said[i][0],
                  probes[2 * k][1] + probes[2 * k + 1][1]) for k, i in enumerate(disputed)}
    targets = []
    for i, job in enumerate(jobs):
        bridge, probe_tokens = chosen.get(i, (said[i][0], 0))
        targets.append(verbalized_target(tok, profile, job, bridge, said[i][1] + read[i][1] + probe_tokens))
    return targets


def _scaled(vector: torch.Tensor, profile: PatchProfile) -> torch.Tensor:
    return vector * profile.scale if profile.scale != 1 else vector


def _controlled(job: PatchJob, profile: PatchProfile, control: Control | None) -> tuple[tuple[int, torch.Tensor], ...]:
    """A multi-position job's further states under ``control`` (each random vector seeded by its position)."""
    pairs = [(index, control_vector(_scaled(v, profile), control, f"{job.location.question}#{index}"))
             for index, v in job.more]
    return tuple((index, v) for index, v in pairs if v is not None)


def plan_targets(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    profile: PatchProfile,
    jobs: Sequence[PatchJob],
    *,
    control: Control | None = None,
) -> list[Target]:
    """Build the target prompt and patches of each job under ``profile.strategy``."""
    recompute = registry.strategy(profile.strategy).states()
    if recompute is not None:  # a strategy with its own source (``isolate``); controls then act on those states
        jobs = list(recompute(model, tok, profile, jobs))
    if control is not None and registry.control(control).subject_text:
        jobs = [replace(job, placeholder=job.location.subject) for job in jobs]
    vectors = [control_vector(_scaled(j.vector, profile), control, j.location.question) for j in jobs]
    jobs = [replace(j, more=_controlled(j, profile, control)) if j.more else j for j in jobs]
    return registry.strategy(profile.strategy).build()(model, tok, profile, jobs, vectors)


def targets_for(model: torch.nn.Module, tok: PreTrainedTokenizerBase, pre: Any, decisions: Sequence[Any],
                rows: Sequence[int], profile: PatchProfile, *, control: Control | None = None) -> list[Target]:
    """The targets of a prefill's patched ``rows``, each under the profile its gate decision chose (else
    ``profile``): a choosing gate may mix strategies in one batch. In row order."""
    groups: dict[PatchProfile, list[int]] = {}
    for i in rows:
        groups.setdefault(decisions[i].profile or profile, []).append(i)
    targets = []
    for chosen, members in groups.items():
        jobs = [pre.job(i, chosen.source_position, chosen.source_layer) for i in members]
        targets += plan_targets(model, tok, chosen, jobs, control=control)
    return sorted(targets, key=lambda t: t.row)
