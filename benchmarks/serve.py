"""Serving throughput and latency: 1, 4, 16 and 64 concurrent streaming clients.

The server is ``glmrt serve`` in a process of its own, on loopback, with the 98M-parameter
checkpoint ``benchmarks/decode.py`` builds (its ``layers`` model: hidden 768, 12 layers,
vocabulary 16384, fp32, random weights). The clients are the official ``openai`` package's
async client in this process: each of N clients sends streaming ``/v1/completions``
requests with a fixed prompt of token ids (different per client) and a fixed output
length (``ignore_eos``, greedy), back to back, so N streams are always in flight. The
checkpoint has no tokenizer, so each token arrives as one chunk carrying its logprob.

Reported per concurrency: aggregate output tokens/s (tokens of finished requests over the
wall time), time to first token (request sent to first chunk) p50/p99, inter-token latency
(gap between successive chunks of a stream) p50/p99, and the speed-up over one stream.
Goal on the 2-core CPU (docs/serving.md): 16 streams at least 4x one stream's throughput,
with time to first token p99 under 2 s.

    python benchmarks/serve.py [--streams 1 4 16 64] [--prompt 64] [--new 64] [--requests 2]
                               [--workdir DIR] [--out docs/serve-speed] [--update-docs]

Writes ``<out>.json`` and ``<out>.png``; ``--update-docs`` also writes the table into
docs/serving.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import MODELS, make_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_num_seqs: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "glm_runtime.cli.main", "serve", str(model), "--port", str(port), "--backend", "cpu",
           "--max-num-seqs", str(max_num_seqs), "--max-queue", str(4 * max_num_seqs), "--name", "bench"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 600) -> None:
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(client, prompt: list[int], new: int) -> dict:
    t0 = time.perf_counter()
    stamps = []
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new, temperature=0,
                                             logprobs=0, stream=True, extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        c = chunk.choices[0] if chunk.choices else None
        if c is not None and c.logprobs is not None and c.logprobs.tokens:
            stamps.append(time.perf_counter())
            tokens += len(c.logprobs.tokens)
    if tokens != new:
        raise SystemExit(f"a request produced {tokens} tokens, not {new}")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "end": stamps[-1]}


async def level(port: int, streams: int, requests: int, prompt_len: int, new: int, vocab: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    rng = random.Random(streams)

    async def worker(i: int) -> list[dict]:
        out = []
        for _ in range(requests):
            prompt = [rng.randrange(2, vocab) for _ in range(prompt_len)]
            out.append(await one_request(client, prompt, new))
        return out

    t0 = time.perf_counter()
    done = [r for rs in await asyncio.gather(*(worker(i) for i in range(streams))) for r in rs]
    wall = max(r["end"] for r in done) - t0
    await client.close()
    ttft = [r["ttft"] for r in done]
    itl = [x for r in done for x in r["itl"]]
    return {"streams": streams, "requests": len(done), "tokens": sum(r["tokens"] for r in done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99)}


DOC = ROOT / "docs" / "serving.md"
DOC_BEGIN, DOC_END = "<!-- serve-table:begin -->", "<!-- serve-table:end -->"


def table(results: dict) -> str:
    """The measured figures as the markdown table of docs/serving.md."""
    lines = [f"{results['date']}, {results['threads']} threads, {results['cpu']}; prompt {results['prompt']}, "
             f"output {results['new']} tokens per request:", "",
             "| streams | output tokens/s | x one stream | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---|---|---|---|---|"]
    for r in results["levels"]:
        lines.append(f"| {r['streams']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {r['ttft_p50']:.2f} s | "
                     f"{r['ttft_p99']:.2f} s | {r['itl_p50'] * 1e3:.0f} ms | {r['itl_p99'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def update_doc(text: str) -> None:
    doc = DOC.read_text()
    head, rest = doc.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC.write_text(f"{head}{DOC_BEGIN}\n{text}\n{DOC_END}{tail}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["levels"]
    n = [r["streams"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    one = rows[0]["tokens_per_s"] if rows[0]["streams"] == 1 else None
    if one:
        a.plot(n, [one * k for k in n], ":", color="gray", label="N x one stream")
        a.set_ylim(0, max(r["tokens_per_s"] for r in rows) * 1.3)
    a.set_xscale("log", base=2)
    a.set_xticks(n, [str(k) for k in n])
    a.set_xlabel("concurrent streams")
    a.set_ylabel("output tokens/s (all streams)")
    a.set_title("aggregate decode throughput")
    a.legend()
    for key, style in (("ttft", "o-"), ("itl", "s--")):
        for q in ("p50", "p99"):
            b.plot(n, [r[f"{key}_{q}"] for r in rows], style, label=f"{'time to first token' if key == 'ttft' else 'inter-token latency'} {q}")
    b.axhline(2.0, color="red", lw=0.8, ls=":", label="2 s")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xticks(n, [str(k) for k in n])
    b.set_xlabel("concurrent streams")
    b.set_ylabel("seconds")
    b.set_title("latency")
    b.legend(fontsize=7)
    fig.suptitle(f"glmrt serve, {results['model']}, {results['threads']} threads ({results['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--new", type=int, default=64, help="output tokens per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", help="where decode.py's checkpoints are kept between runs (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve-speed"))
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs/serving.md")
    a = ap.parse_args()
    shape = MODELS["layers"]
    results = {"model": f"98M GLM-4-shaped (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers), "
                        "fp32", "threads": a.threads, "cpu": platform.processor() or platform.machine(),
               "prompt": a.prompt, "new": a.new, "date": time.strftime("%Y-%m-%d"), "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.workdir or tmp) / "layers" / "hf"
        make_checkpoint(d, shape)
        port = free_port()
        proc = start_server(d, port, max(a.streams), a.threads)
        try:
            wait_ready(proc, port)
            asyncio.run(level(port, 1, 1, a.prompt, 4, shape["vocab_size"]))  # warm-up
            print(f"{'streams':>7} {'tokens/s':>9} {'x one':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
                  f"{'ITL p99':>8}", flush=True)
            for n in a.streams:
                r = asyncio.run(level(port, n, a.requests, a.prompt, a.new, shape["vocab_size"]))
                results["levels"].append(r)
                base = results["levels"][0]["tokens_per_s"]
                r["speedup"] = r["tokens_per_s"] / base
                print(f"{n:>7} {r['tokens_per_s']:>9.1f} {r['speedup']:>6.2f} {r['ttft_p50']:>8.3f}s "
                      f"{r['ttft_p99']:>8.3f}s {r['itl_p50'] * 1e3:>6.0f}ms {r['itl_p99'] * 1e3:>6.0f}ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if a.update_docs:
        update_doc(table(results))
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
