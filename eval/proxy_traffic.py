"""``serve --upstream`` on real traffic: its answers beside the upstream's own, on the do-no-harm and two-hop sets.

Example:
    $ python -m eval.proxy_traffic --model qwen2.5-coder-0.5b-instruct --out docs/runs/proxy_qwen0.5b
    $ python -m eval.proxy_traffic --model qwen2.5-coder-0.5b-instruct --no-screen --out docs/runs/proxy_qwen0.5b_noscreen

The upstream is an ``autopatch serve`` of ``--model`` with patching off (a plain chat server, in process); the
proxy (:func:`server.upstream.create_proxy_app`) sits in front of it with the screen of ``--screen-model``
(:mod:`server.screening`), or none with ``--no-screen``. Every request of each ``--datasets`` set (test split) is
sent, as the chat request it is, to the upstream directly and through the proxy, greedy, ``--max-tokens`` new
tokens. One JSON line per request and route goes to ``OUT/lines.jsonl`` (a re-run skips what is there), and the
summary, per set: how many answers are identical to the upstream's own, how many requests were located, passed
the screen and were decomposed, and EM of both routes where the set has gold answers. ``--concurrency``
requests are in flight at once, so the upstream batches them.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from eval.datasets import QARecord, select_records
from eval.metrics import mcnemar, score_continuation


def _messages(record: QARecord) -> list[dict[str, str]]:
    return [dict(m) for m in record.messages] if record.messages else [{"role": "user", "content": record.question}]


def _ask(url: str, record: QARecord, max_tokens: int) -> dict[str, Any]:
    messages = _messages(record)
    response = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    data = response.json()
    return {"text": data["choices"][0]["message"]["content"] or "", "report": data.get("autopatch")}


def summarize(lines: list[dict], sets: list[str]) -> str:
    """The summary table (markdown) of ``lines``."""
    rows = ["| set | n | identical to the upstream | located | passed the screen | decomposed | EM upstream → proxy "
            "(fixed/broken, McNemar p) | contains upstream → proxy |", "|---|---|---|---|---|---|---|---|"]
    for name in sets:
        mine = [line for line in lines if line["set"] == name]
        if not mine:
            continue
        n = len(mine)
        same = sum(line["direct"]["text"] == line["proxy"]["text"] for line in mine)
        decomposed = sum(bool((line["proxy"]["report"] or {}).get("patched")) for line in mine)
        located = sum(line["located"] for line in mine)
        screened = [line for line in mine if line["screen_passed"] is not None]
        passed = sum(bool(line["screen_passed"]) for line in screened) if screened else "–"
        gold = [line for line in mine if line["golds"]]
        em = found = "–"
        if gold:
            before = [bool(score_continuation(line["direct"]["text"], line["golds"])["em"]) for line in gold]
            after = [bool(score_continuation(line["proxy"]["text"], line["golds"])["em"]) for line in gold]
            test = mcnemar(before, after)
            em = (f"{sum(before) / len(gold):.3f} → {sum(after) / len(gold):.3f} ({test['b_fixed']}/{test['b_broken']}, "
                  f"p={test['p_value']:.2g}; n={len(gold)})")
            share = {route: sum(float(score_continuation(line[route]["text"], line["golds"])["contains"]) for line in gold)
                     / len(gold) for route in ("direct", "proxy")}
            found = f"{share['direct']:.3f} → {share['proxy']:.3f}"
        rows.append(f"| {name} | {n} | {same / n:.3f} ({same}) | {located} | {passed} | {decomposed} | {em} | {found} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the upstream's model")
    parser.add_argument("--screen-model", default=None, help="the proxy's screen (default: serve --upstream's)")
    parser.add_argument("--no-screen", action="store_true", help="decompose every located request")
    parser.add_argument("--datasets", default="harm,handwritten")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from autopatch import load_model
    from server import create_app
    from server.runner import BackgroundServer
    from server.screening import proxy_screen
    from server.upstream import create_proxy_app, plan

    torch.set_grad_enabled(False)
    sets = [s.strip() for s in args.datasets.split(",") if s.strip()]
    records = [(name, r) for name in sets for r in select_records(name, split="test", hops=None if name == "harm" else 2)[0]]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lines.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(line["set"], line["id"]) for line in lines}
    todo = [(name, r) for name, r in records if (name, r.id) not in done]
    model, tok = load_model(args.model)
    screen = None if args.no_screen else proxy_screen(args.screen_model)
    with BackgroundServer(create_app(model, tok, model_name=args.model, patching_default=False)) as upstream, \
            BackgroundServer(create_proxy_app(upstream.url, timeout_s=600, screen=screen)) as proxy, \
            path.open("a") as sink, ThreadPoolExecutor(args.concurrency) as pool:
        def one(item: tuple[str, QARecord]) -> dict:
            name, record = item
            located = plan(_messages(record)).location is not None
            # scored here too: a request the screen turns away comes back as the upstream's own, without the verdict
            score, passed = screen.verdict(_messages(record)) if (screen is not None and located) else (None, None)
            return {"set": name, "id": record.id, "golds": list(record.golds) if record.answerable else [],
                    "located": located, "screen_score": score, "screen_passed": passed,
                    "direct": _ask(upstream.url, record, args.max_tokens), "proxy": _ask(proxy.url, record, args.max_tokens)}

        for i, line in enumerate(pool.map(one, todo), 1):
            sink.write(json.dumps(line) + "\n")
            sink.flush()
            lines.append(line)
            if i % 25 == 0:
                print(f"proxy_traffic: {i}/{len(todo)}", file=sys.stderr, flush=True)
    command = "python -m eval.proxy_traffic " + " ".join(sys.argv[1:] if argv is None else argv)
    screen_name = "none (--no-screen)" if args.no_screen else (screen.name if screen else "none")
    text = (f"# serve --upstream on real traffic\n\nMade by `{command}`. Upstream: `autopatch serve` of {args.model} "
            f"with patching off; proxy screen: {screen_name}; greedy, {args.max_tokens} new tokens; test splits.\n\n"
            + summarize(lines, sets))
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
