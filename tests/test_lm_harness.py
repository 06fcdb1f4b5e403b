"""eval.lm_harness: the `autopatch` model of lm-eval and the `autopatch_*` tasks. Model arguments are checked;
log-likelihoods are the plain model's; generation is autopatch eval's own, and on the embedded model lm-eval's exact
match equals autopatch eval's EM for each method."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval.lm_harness.model import AutopatchLM, generation_methods

torch.set_grad_enabled(False)


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def vanilla(tiny_dir):
    return AutopatchLM(pretrained=str(tiny_dir), method="vanilla", batch_size=4)


@pytest.mark.parametrize("args, message", [
    ({"method": "vanilla", "temperature": 0.5}, "unknown model_args temperature; accepted: pretrained, method"),
    ({"method": "cot"}, "method='cot' is not a direct-answer method"),
    ({"method": "oracle-gate"}, "method='oracle-gate' is not a direct-answer method"),
    ({"method": "decompose", "render": "raw"}, "render=raw runs vanilla, autopatch"),
    ({"method": "vanilla", "decomposer": "model"}, "decomposer='model' applies to method=autopatch"),
    ({"method": "vanilla", "render": "prompt"}, "render='prompt'; choose one of question, raw"),
    ({"method": "autopatch"}, "runs the gate and no gate is shipped"),
])
def test_model_args_are_checked_and_refusals_say_what_is_accepted(tiny_dir, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AutopatchLM(pretrained=str(tiny_dir), **args)


def test_direct_answer_methods_only():
    methods = generation_methods()
    assert {"vanilla", "decompose", "autopatch", "autopatch-model", "control-random"} <= set(methods)
    assert not {"cot", "hop1", "oracle-gate", "oracle-layers"} & set(methods)


def test_loglikelihoods_are_the_plain_model_s(vanilla):
    model, tok = vanilla.model, vanilla.tok
    (logprob, greedy), = vanilla.loglikelihood([_Request("The capital of Italy is", " Rome")])
    context, continuation = tok("The capital of Italy is").input_ids, tok(" Rome", add_special_tokens=False).input_ids
    logits = torch.log_softmax(model(input_ids=torch.tensor([context + continuation[:-1]])).logits.float(), -1)[0]
    expected = sum(float(logits[len(context) - 1 + k, t]) for k, t in enumerate(continuation))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logits[len(context) - 1 + k].argmax()) == t for k, t in enumerate(continuation))
    text = "Rome is the capital of Italy."
    (rolling,) = vanilla.loglikelihood_rolling([_Request(text)])
    tokens = tok(text, add_special_tokens=False).input_ids
    logits = torch.log_softmax(model(input_ids=torch.tensor([[vanilla._prefix_token(), *tokens[:-1]]])).logits.float(), -1)[0]
    assert rolling == pytest.approx(sum(float(logits[k, t]) for k, t in enumerate(tokens)), abs=1e-4)
    batch = vanilla.loglikelihood([_Request("A", " b"), _Request("A longer context here", " c d"), _Request("", " e")])
    assert [math.isfinite(lp) for lp, _ in batch] == [True, True, True]


def test_generation_is_autopatch_eval_s_and_cut_at_until(vanilla):
    from eval.lm_harness.model import _record
    from eval.methods import METHODS

    questions = ["What is the capital of the country where the Colosseum is located?", "Who wrote Hamlet?"]
    texts = vanilla.generate_until([_Request(q, {"until": [], "max_gen_toks": 5}) for q in questions])
    ctx = vanilla.ctx.__class__(**{**vanilla.ctx.__dict__, "budget": 5, "vanilla_tokens": {}, "vanilla_seconds": {}})
    expected = [r.continuation for r in METHODS["vanilla"].run(ctx, [_record(str(i), q) for i, q in enumerate(questions)])]
    assert texts == expected
    stop = texts[0][2:4]
    cut = vanilla.generate_until([_Request(questions[0], {"until": [stop], "max_gen_toks": 5})])[0]
    assert cut == texts[0][: texts[0].find(stop)]


def test_a_chat_request_is_sent_as_its_messages():
    from eval.lm_harness.model import _record

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Who wrote Hamlet?"}]
    record = _record("0", json.dumps({"messages": messages}))
    assert record.messages == tuple(messages) and record.question == "Who wrote Hamlet?"
    assert _record("1", "  Who wrote Hamlet? ").question == "Who wrote Hamlet?" and _record("1", "Q").messages is None


def test_the_tasks_read_the_bundled_sets_in_autopatch_eval_s_sample_order():
    from eval.datasets import select_records
    from eval.lm_harness.tasks import loaders
    from eval.sweep import stratified_sample

    twohop = loaders.twohop()["test"]
    records, _ = select_records("twohop", split="test", hops=2)
    assert len(twohop) == len(records)
    assert list(twohop["id"][:16]) == [r.id for r in stratified_sample(records, 16)]
    harm = loaders.harm()["test"]
    chat = next(row for row in harm if row["request"].startswith('{"messages"'))
    assert json.loads(chat["request"])["messages"][-1]["content"] == chat["question"]
    unanswerable = next(row for row in harm if not row["answerable"])
    assert loaders.process_results(unanswerable, ["anything"]) == {"exact_match": None, "f1": None, "contains": None}
    assert loaders.process_results({"answerable": True, "golds": ["Rome"]}, [" Rome\n\nQ:"])["exact_match"] == 1.0
    assert loaders.mean_of_scored([1.0, None, 0.0]) == 0.5 and math.isnan(loaders.mean_of_scored([None]))


@pytest.mark.gemma
def test_lm_eval_exact_match_equals_autopatch_eval_em_on_16_two_hop_questions(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from autopatch.cli import main
    from eval.lm_harness import TASKS_DIR

    methods = ["vanilla", "decompose", "autopatch"]
    assert main(["eval", "--dataset", "twohop", "--split", "test", "--limit", "16", "--methods", ",".join(methods),
                 "--batch-size", "8", "--no-hops", "--no-gold-scores", "--quiet", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    manager = TaskManager(include_path=str(TASKS_DIR))
    for method in methods:
        results = lm_eval.simple_evaluate(model="autopatch", model_args={"method": method}, tasks=["autopatch_twohop"],
                                          limit=16, batch_size=8, task_manager=manager)
        scores = results["results"]["autopatch_twohop"]
        assert scores["exact_match,none"] == pytest.approx(summary["methods"][method]["all"]["em"]), method
        assert scores["contains,none"] == pytest.approx(summary["methods"][method]["all"]["contains"]), method


@pytest.mark.gemma
def test_lm_eval_local_chat_completions_against_autopatch_serve_agrees_with_the_in_process_model(gemma):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.lm_harness import TASKS_DIR
    from server import create_app
    from server.runner import BackgroundServer

    model, tok = gemma
    manager = TaskManager(include_path=str(TASKS_DIR))
    local = lm_eval.simple_evaluate(model="autopatch", model_args={"method": "autopatch"}, tasks=["autopatch_twohop"],
                                    limit=8, batch_size=1, task_manager=manager, log_samples=True)
    with BackgroundServer(create_app(model, tok, model_name="gemma-3-270m")) as server:
        served = lm_eval.simple_evaluate(
            model="local-chat-completions", model_args={"base_url": server.url + "/v1/chat/completions",
                                                         "model": "gemma-3-270m", "num_concurrent": 1,
                                                         "tokenized_requests": False},
            tasks=["autopatch_twohop"], limit=8, apply_chat_template=True, task_manager=manager, log_samples=True)
    first_line = [[s["filtered_resps"][0].strip().split("\n")[0] for s in run["samples"]["autopatch_twohop"]]
                  for run in (local, served)]
    assert first_line[0] == first_line[1]  # the served answers are the in-process ones
    assert (served["results"]["autopatch_twohop"]["exact_match,none"]
            == local["results"]["autopatch_twohop"]["exact_match,none"])


def test_lm_eval_s_own_models_stay_registered_beside_autopatch():
    from lm_eval.api.registry import get_model

    assert get_model("autopatch") is AutopatchLM
    assert get_model("dummy").__name__ == "DummyLM" and get_model("local-chat-completions") is not None
