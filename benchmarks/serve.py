"""Serving speed: time to first token and tokens/s through the HTTP API, for 1 and for 8 concurrent clients.

    python -m benchmarks.serve --model shakespeare.lam          # 1 and 8 clients, 200 tokens each
    python -m benchmarks.serve --model shakespeare.lam --clients 1 2 4 --tokens 100

The model is served by `lam.serving.server.create_app` under uvicorn on a free loopback port, as
`python -m lam.serve` serves it. Each client sends one streamed /v1/completions request (the same prompt,
its own seed, temperature 0.8) at the same moment, from its own thread and its own new connection, and reads
the server-sent events. TTFT is from sending the request to the first text piece; a client's tokens/s counts
its pieces after the first over the time they took. The server generates one request at a time (a lock), so
with 8 clients the later ones wait for the earlier: their TTFT grows, while the server's total tokens/s (all
pieces over the wall time of the round) stays about the single client's. One warm-up request comes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

import lam
from lam.serving.server import create_app, running


def one_client(url: str, prompt: str, tokens: int, seed: int) -> dict:
    """One streamed completion: seconds to the first piece, pieces, seconds from the first piece to the end."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": True}
    first = None
    pieces = 0
    with httpx.Client(timeout=600) as http:  # made before the clock starts: it builds an SSL context
        start = time.perf_counter()
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"]:
                    first = first or time.perf_counter()
                    pieces += 1
        end = time.perf_counter()
    return {"ttft": first - start, "pieces": pieces, "rest_s": end - first, "start": start, "end": end}


def round_of(url: str, clients: int, prompt: str, tokens: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda seed: one_client(url, prompt, tokens, seed), range(clients)))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttft = [r["ttft"] * 1000 for r in runs]
    return {"clients": clients, "ttft_median_ms": statistics.median(ttft), "ttft_max_ms": max(ttft),
            "client_tok_s": statistics.median((r["pieces"] - 1) / r["rest_s"] for r in runs),
            "server_tok_s": sum(r["pieces"] for r in runs) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model file written by lam.export")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each request")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = lam.load(args.model)
    with running(create_app(model, "bench", max_tokens=args.tokens)) as url:
        one_client(url, args.prompt, args.tokens, seed=0)  # warm-up
        rows = [round_of(url, n, args.prompt, args.tokens) for n in args.clients]
    print(f"model {args.model}: {model.info.get('parameters', '?')} parameters; {args.tokens} tokens a request; "
          f"torch threads {torch.get_num_threads()}")
    print("| clients | TTFT median ms | TTFT max ms | tokens/s per client | tokens/s server |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['ttft_median_ms']:.0f} | {r['ttft_max_ms']:.0f} | {r['client_tok_s']:.0f} | "
              f"{r['server_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
