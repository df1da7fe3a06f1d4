"""Prefill and decode speed of glm-runtime at every bit width, against transformers and
llama.cpp on the same weights, in one interleaved run.

Two random-weight GLM-4-architecture checkpoints are written by transformers
(``GlmForCausalLM``, partial rotary 0.5, grouped KV heads):

* ``layers``: 98M parameters, hidden 768, 12 layers, 12 query / 2 KV heads, FFN 2048,
  vocabulary 16384: most of a decode step's bytes are in the layers;
* ``head``: 98M parameters, hidden 256, 20 layers, 4 / 2 heads, FFN 1024, vocabulary
  151552 (GLM-4's): most of a decode step's bytes are in the output projection.

Runners, all on the same threads: transformers (fp32); glm-runtime's cpu backend and onnx
backend at fp32, INT8 and INT4 (``glmrt quantize``'s default scheme: INT4 scales per block
of 32 inputs, an INT8 output projection; the onnx runs use exports of those same
checkpoints, their quantized linears as onnxruntime's MatMulNBits); and, when
``llama-cpp-python`` and ``gguf`` are installed, llama.cpp at f32, q8_0 and q4_0 on a GGUF
written from the same weights (benchmarks/llama_cpp_peer.py; its f32 greedy output is
checked against transformers' first). Every round runs every runner once, those of one
bit width side by side and every other round in reverse order, so that drift in the
machine's speed hits peers alike; ratios are taken round by round and their median
reported. Each timed call starts on an idle machine (:data:`SETTLE_S`).

Reported per model and prompt length: prefill tokens/s (one prompt), decode tokens/s
(the tokens after the first, batch 1, greedy: timed inside the generating call, from the
moment its first new token is out to the moment its last is, see :class:`TokenClock`), the ratio to transformers and to
llama.cpp at the same bit width, the bytes a decode step must read (every weight but the
embedding table, of which one row is read) and the fraction of the bandwidth roofline
reached (``tokens/s x bytes / bandwidth``; the bandwidth is measured here by streaming
reads of a buffer far larger than the caches).

    python benchmarks/decode.py [--threads 2] [--repeat 3] [--prompts 16 512] [--new 64]
                                [--models layers head] [--workdir DIR] [--out docs/decode-speed]
                                [--update-readme]

Writes ``<out>.json`` and ``<out>.png`` (bar chart of decode tokens/s) and, with
``--update-readme``, the speed table between the README's speed-table markers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

MODELS = {
    "layers": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=2, head_dim=64),
    "head": dict(vocab_size=151552, hidden_size=256, intermediate_size=1024, num_hidden_layers=20,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
COMMON = dict(max_position_embeddings=4096, attention_bias=True, pad_token_id=0, eos_token_id=[1])
BITS = ("fp32", "int8", "int4")
LLAMA_KIND = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
README_BEGIN, README_END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of streaming reads (fp32 sum over a buffer far larger than the caches)."""
    x = torch.ones(int(gib * 2 ** 30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def make_checkpoint(d: Path, shape: dict) -> None:
    from transformers import GlmConfig, GlmForCausalLM

    if (d / "config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = GlmConfig(**shape, **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5})
    GlmForCausalLM(cfg).save_pretrained(d)


def tensor_bytes(files) -> dict[str, int]:
    """{tensor name: bytes} of safetensors files (from their headers)."""
    from safetensors import safe_open

    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                out[k] = math.prod(s.get_shape()) * sizes[s.get_dtype()]
    return out


def decode_bytes(d: Path) -> int:
    """What a decode step reads: every tensor but the embedding table."""
    return sum(n for k, n in tensor_bytes(d.glob("*.safetensors")).items() if "embed" not in k)


def gguf_decode_bytes(path: Path) -> int:
    """The same for a GGUF file: every tensor but ``token_embd``."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if not t.name.startswith("token_embd"))


class TokenClock:
    """Stamps the time each new token comes out of a generating call (a streamer callback;
    transformers' streamer interface ``put``/``end`` too). Decode time is the span from the
    first new token to the last: the n - 1 single-token steps, each with its sampling and
    host work, and nothing of the prompt. Earlier this benchmark took generate - prefill,
    two separately timed calls, whose difference on a 512-token prompt carried all the
    noise of a prefill as long as the decode itself."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, _tokens=None) -> None:
        self.stamps.append(time.perf_counter())

    put = __call__  # transformers: the prompt first, then each new token

    def end(self) -> None:
        pass

    def decode_seconds(self, n: int) -> float:
        """Seconds from the first to the last of the ``n`` new tokens."""
        new = self.stamps[-n:]
        return new[-1] - new[0]


class HFRunner:
    bits = "fp32"

    def __init__(self, d, name="transformers"):
        from transformers import AutoModelForCausalLM

        self.m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        self.name = name

    @torch.inference_mode()
    def prefill(self, ids):
        self.m(ids, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, ids, n):
        clock = TokenClock()
        out = self.m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=COMMON["pad_token_id"], streamer=clock)
        self.decode_seconds = clock.decode_seconds(n)
        return out


class GLMRunner:
    def __init__(self, d, backend, bits, name):
        from glm_runtime import load_model

        self.m = load_model(d, backend=backend)
        self.name, self.bits = name, bits

    def prefill(self, ids):
        self.m.generate(ids, max_new_tokens=1, stop_token_ids=[])

    def generate(self, ids, n):
        clock = TokenClock()
        out = self.m.generate(ids, max_new_tokens=n, stop_token_ids=[], streamer=clock)
        self.decode_seconds = clock.decode_seconds(n)
        return out


# Thread pools keep spinning on the cores for a while after their work ends (torch's
# OpenMP, onnxruntime's, llama.cpp's): measured here, onnxruntime's fp32 prefill of 16 tokens took 27 ms
# right after a torch runner and 22 ms half a second later. Each timed call waits this
# long first, so that no runner is timed against the previous one's threads.
SETTLE_S = 0.5


def time_once(r, ids, n):
    """(prefill tokens/s, decode tokens/s) of one run: a timed prefill call, then a
    generating call that times its own decode steps (``r.decode_seconds``)."""
    time.sleep(SETTLE_S)
    t = time.perf_counter()
    r.prefill(ids)
    tp = time.perf_counter() - t
    time.sleep(SETTLE_S)
    out = r.generate(ids, n)
    assert out.shape[1] == ids.shape[1] + n, (r.name, out.shape)
    return ids.shape[1] / tp, (n - 1) / r.decode_seconds  # the first new token comes from the prefill


def timing_order(runners) -> list:
    """The runners as a round times them: those of one bit width side by side (glm-runtime's
    beside llama.cpp's), so that a ratio compares runs seconds apart. The machine's speed
    drifts over tens of seconds here, and with the peers a whole round apart their ratio
    moved by ~0.15 from run to run."""
    return sorted(runners, key=lambda r: (r.name != "transformers", BITS.index(r.bits)))


def time_all(runners, ids, n, repeat, progress):
    """Per runner: medians of prefill and decode tokens/s, and per-round ratios to
    transformers and to llama.cpp at the same bit width. Every other round runs in reverse
    order, so that no runner is always timed first after its peer."""
    for r in runners:  # warm-up
        r.prefill(ids)
        r.generate(ids, 4)
    order = timing_order(runners)
    rounds = []
    for i in range(repeat):
        rounds.append({r.name: time_once(r, ids, n) for r in (order if i % 2 == 0 else order[::-1])})
        progress(f"  round {i + 1}/{repeat} done")
    out = {}
    llama = {r.bits: r.name for r in runners if r.name.startswith("llama.cpp")}
    for r in runners:
        rec = {"prefill": statistics.median(x[r.name][0] for x in rounds),
               "decode": statistics.median(x[r.name][1] for x in rounds)}
        for peer, key in (("transformers", "vs_transformers"), (llama.get(r.bits), "vs_llama_cpp")):
            if peer and peer != r.name:
                rec[key] = {"prefill": statistics.median(x[r.name][0] / x[peer][0] for x in rounds),
                            "decode": statistics.median(x[r.name][1] / x[peer][1] for x in rounds)}
        out[r.name] = rec
    return out


def build_runners(d: Path, work: Path, threads: int, progress) -> tuple[list, dict[str, int]]:
    """Every runner on checkpoint ``d``, and the bytes each reads per decode step."""
    from glm_runtime.converters import hf, native
    from glm_runtime.converters.onnx.export import export_checkpoint
    from glm_runtime.converters.quantize import quantize_scheme

    runners, nbytes = [HFRunner(d)], {"transformers": decode_bytes(d)}
    natives = {"fp32": d}
    for bits in (8, 4):  # glmrt quantize's default scheme
        out = work / f"native-int{bits}"
        if not (out / "config.json").is_file():
            qc, qs = quantize_scheme(*hf.read(d), bits, "fast")
            native.save(out, qc, qs)
        natives[f"int{bits}"] = out
    for bits, src in natives.items():
        runners.append(GLMRunner(src, "cpu", bits, f"glm-runtime cpu {bits}"))
        nbytes[runners[-1].name] = decode_bytes(src)
    for bits, src in natives.items():
        out = work / f"onnx-{bits}"
        if not (out / "model.onnx").is_file():
            progress(f"  exporting {bits} to ONNX")
            export_checkpoint(src, out, progress=False)
        runners.append(GLMRunner(out, "onnx", bits, f"glm-runtime onnx {bits}"))
        nbytes[runners[-1].name] = decode_bytes(src)
    import llama_cpp_peer as peer

    why = peer.unavailable_reason()
    if why:
        progress(f"  {why}: llama.cpp is not compared")
        return runners, nbytes
    f32 = work / "llama-f32.gguf"
    if not f32.is_file():
        peer.write_gguf(d, f32)
    ref = HFRunner(d, "check")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    want = ref.generate(ids, 16)
    for bits in BITS:
        kind = LLAMA_KIND[bits]
        path = f32 if kind == "f32" else work / f"llama-{kind}.gguf"
        if not path.is_file():
            peer.quantize(f32, path, kind)
        r = peer.LlamaCppRunner(path, threads, f"llama.cpp {kind}")
        r.bits = bits
        if kind == "f32" and not torch.equal(r.generate(ids, 16), want):
            raise SystemExit("llama.cpp's f32 greedy output differs from transformers': the GGUF is not the same "
                             "model, the comparison would be meaningless")
        runners.append(r)
        nbytes[r.name] = gguf_decode_bytes(path)
    return runners, nbytes


def report_lines(results: dict) -> list[str]:
    bw = results["bandwidth_gbs"]
    lines = []
    for mname, m in results["models"].items():
        lines.append(f"\nmodel '{mname}': {m['params'] / 1e6:.0f}M parameters ({m['description']})")
        for plen, runs in m["prompts"].items():
            lines.append(f"  prompt {plen}, decode {results['new_tokens']} tokens, batch 1:")
            lines.append(f"    {'runner':<26}{'prefill tok/s':>14}{'decode tok/s':>13}{'MB/step':>9}{'% roof':>8}"
                         f"{'vs transformers':>17}{'vs llama.cpp':>14}")
            for name, r in runs.items():
                mb = m["bytes_per_step"][name] / 1e6
                roof = 100 * r["decode"] * m["bytes_per_step"][name] / (bw * 1e9)
                vt = r.get("vs_transformers", {})
                vl = r.get("vs_llama_cpp", {})
                fmt = lambda v: f"{v['prefill']:.2f}/{v['decode']:.2f}" if v else "-"  # noqa: E731
                lines.append(f"    {name:<26}{r['prefill']:>14.0f}{r['decode']:>13.1f}{mb:>9.0f}{roof:>7.0f}%"
                             f"{fmt(vt):>17}{fmt(vl):>14}")
    return lines


def readme_table(results: dict) -> str:
    """The README's speed table: the layer-dominated model, prompts 16 and 512."""
    m = results["models"].get("layers") or next(iter(results["models"].values()))
    plens = list(m["prompts"])
    head = "| runtime | " + " | ".join(f"prefill p{p}" for p in plens) + " | " + \
        " | ".join(f"decode p{p}" for p in plens) + " | decode vs llama.cpp | % of roofline |"
    rows = [head, "|" + "---|" * (len(plens) * 2 + 3)]
    for name in m["prompts"][plens[0]]:
        runs = [m["prompts"][p][name] for p in plens]
        vl = runs[0].get("vs_llama_cpp")
        versus = f"{vl['decode']:.2f}" if vl else "-"
        roof = 100 * runs[0]["decode"] * m["bytes_per_step"][name] / (results["bandwidth_gbs"] * 1e9)
        rows.append(f"| {name} | " + " | ".join(f"{r['prefill']:.0f}" for r in runs) + " | "
                    + " | ".join(f"{r['decode']:.1f}" for r in runs) + f" | {versus} | {roof:.0f} % |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, p) for m in results["models"] for p in results["models"][m]["prompts"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    families = [("glm-runtime cpu", "tab:blue"), ("glm-runtime onnx", "tab:orange"), ("llama.cpp", "tab:green")]
    for ax, (mname, plen) in zip(axes[0], panels):
        runs = results["models"][mname]["prompts"][plen]
        width = 0.25
        for i, (fam, color) in enumerate(families):
            ys = []
            for bits in BITS:
                name = next((n for n in runs if n.startswith(fam) and
                             (n.endswith(bits) or n.endswith(LLAMA_KIND[bits]))), None)
                ys.append(runs[name]["decode"] if name else 0)
            ax.bar([j + (i - 1) * width for j in range(len(BITS))], ys, width, label=fam, color=color)
        if "transformers" in runs:
            ax.axhline(runs["transformers"]["decode"], color="gray", ls="--", label="transformers fp32")
        ax.set_xticks(range(len(BITS)), BITS)
        ax.set_title(f"model '{mname}', prompt {plen}")
        ax.set_ylabel("decode tokens/s (batch 1)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"decode speed, {results['threads']} threads, {results['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(README_BEGIN), text.index(README_END)
    readme.write_text(text[:a + len(README_BEGIN)] + "\n" + table + "\n" + text[b:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 512], help="prompt lengths")
    ap.add_argument("--new", type=int, default=64, help="tokens to decode")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--workdir", help="keep checkpoints, exports and GGUFs here between runs (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "decode-speed"), help="results path without suffix")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's speed table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    results = {"threads": a.threads, "new_tokens": a.new, "repeat": a.repeat,
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "models": {}}
    results["bandwidth_gbs"] = measure_bandwidth() / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.workdir) if a.workdir else Path(tmp)
        for mname in a.models:
            progress(f"model '{mname}': building checkpoints and runners")
            work = base / mname
            work.mkdir(parents=True, exist_ok=True)
            d = work / "hf"
            make_checkpoint(d, MODELS[mname])
            runners, nbytes = build_runners(d, work, a.threads, progress)
            shape = MODELS[mname]
            m = {"params": sum(n for n in tensor_bytes(d.glob("*.safetensors")).values()) // 4,
                 "description": f"hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocabulary "
                                f"{shape['vocab_size']}",
                 "bytes_per_step": nbytes, "prompts": {}}
            for plen in a.prompts:
                progress(f"  prompt {plen}")
                ids = torch.randint(0, 1000, (1, plen), generator=torch.Generator().manual_seed(0))
                m["prompts"][str(plen)] = time_all(runners, ids, a.new, a.repeat, progress)
            results["models"][mname] = m
            del runners
    print(f"{results['cpu']}, {a.threads} threads, torch {results['torch']}; streaming-read bandwidth "
          f"{results['bandwidth_gbs']:.1f} GB/s; median of {a.repeat} interleaved rounds")
    print("\n".join(report_lines(results)))
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    if a.update_readme:
        update_readme(readme_table(results))


if __name__ == "__main__":
    main()
