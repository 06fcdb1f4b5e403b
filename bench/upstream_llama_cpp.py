"""The text route at llama.cpp's speed: ``serve --upstream`` in front of llama-cpp-python's OpenAI server.

Example:
    $ pip install llama-cpp-python sse-starlette starlette-context pydantic-settings   # builds llama.cpp from source
    $ python bench/upstream_llama_cpp.py --model qwen2.5-coder-0.5b-instruct --limit 32

It starts llama-cpp-python's server (``python -m llama_cpp.server``) on the very GGUF file autopatch ships for the
model, puts autopatch's proxy (:func:`server.upstream.create_proxy_app`) in front of it, and sends it the first
``--limit`` questions of the two-hop test as chat requests. The same questions go through the local ``decompose``
(``AutoPatcher`` with the model's decompose profile, always patching) on autopatch's own copy of the weights.
It prints, per route, EM and seconds per question, and how often the proxy's bridge and answer equal the local
ones. llama.cpp multiplies with its own kernels (8-bit activations), so a few answers may differ in wording; that
is what the agreement column measures.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_llama_server(gguf: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with log.open("w") as sink:  # a file, not a pipe: llama.cpp logs a lot, and a full pipe would stall the server
        process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                                    "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048"],
                                   stdout=sink, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {process.returncode}: {log.read_text()[-800:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("llama_cpp.server did not answer within 120 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="an embedded instruct model")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from autopatch import load_model
    from autopatch.gating import AlwaysPatch
    from autopatch.loading import _assemble_gguf
    from autopatch.models import embedded_model
    from autopatch.patcher import AutoPatcher
    from autopatch.profile import strategy_profile
    from autopatch.quantize import model_quantization
    from eval.datasets import select_records
    from eval.metrics import score_continuation
    from eval.sweep import stratified_sample
    from server.runner import BackgroundServer
    from server.upstream import create_proxy_app

    torch.set_grad_enabled(False)
    spec = embedded_model(args.model)
    if spec is None:
        raise SystemExit(f"{args.model!r} is not an embedded model (the bench runs the GGUF file autopatch ships)")
    records = stratified_sample(select_records("twohop", split="test")[0], args.limit)
    model, tok = load_model(args.model)
    patcher = AutoPatcher(model, tok, strategy_profile(model, "decompose", AutoPatcher(model, tok).profile)[0],
                          gate=AlwaysPatch())
    started = time.perf_counter()
    local = patcher.answer([r.question for r in records], max_new_tokens=args.max_tokens)
    local_s = (time.perf_counter() - started) / len(records)

    gguf = _assemble_gguf(spec, lambda _msg: None)
    llama, url = _start_llama_server(gguf, args.threads, Path(tempfile.gettempdir()) / "autopatch-llama-server.log")
    proxied = []
    try:
        with BackgroundServer(create_proxy_app(url, timeout_s=120, fmt=patcher.profile.prompt_format)) as proxy:
            started = time.perf_counter()
            for r in records:
                response = httpx.post(proxy.url + "/v1/chat/completions", timeout=180, json={
                    "messages": [{"role": "user", "content": r.question}], "max_tokens": args.max_tokens,
                    "temperature": 0})
                response.raise_for_status()
                data = response.json()
                proxied.append((data["choices"][0]["message"]["content"].strip(), data["autopatch"]))
            proxy_s = (time.perf_counter() - started) / len(records)
    finally:
        llama.terminate()
        llama.wait(timeout=30)

    em_local = sum(score_continuation(a.text, r.golds)["em"] for a, r in zip(local, records)) / len(records)
    em_proxy = sum(score_continuation(text, r.golds)["em"] for (text, _), r in zip(proxied, records)) / len(records)
    same_answer = sum(text == a.text for (text, _), a in zip(proxied, local))
    same_bridge = sum(report.get("bridge") == a.report.bridge for (_, report), a in zip(proxied, local))
    patched = sum(bool(report.get("patched")) for _, report in proxied)
    print(f"model: {args.model} (local: {model_quantization(model)}; upstream: llama.cpp on {gguf.name}), "
          f"{len(records)} two-hop test questions, {args.max_tokens} new tokens, greedy, threads: {args.threads}\n")
    print("| route | EM | s/q | decomposed |")
    print("|---|---|---|---|")
    print(f"| local decompose (AutoPatcher) | {em_local:.3f} | {local_s:.2f} | "
          f"{sum(a.report.patched for a in local)}/{len(records)} |")
    print(f"| serve --upstream in front of llama_cpp.server | {em_proxy:.3f} | {proxy_s:.2f} | {patched}/{len(records)} |")
    print(f"\nthe proxy's bridge equals the local one: {same_bridge}/{len(records)}; "
          f"its answer equals the local one: {same_answer}/{len(records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
