"""Prefill and decode speed of glm-runtime against transformers, in one run.

A random-weight GLM-4-architecture checkpoint of ~98M parameters (transformers' ``glm``:
vocab 151552, hidden 256, 20 layers, 4 query heads / 2 KV groups, head_dim 64, FFN 1024)
is saved by transformers, then both runtimes load the same directory and run the same
greedy work, alternating, on the same threads; glm-runtime also runs the same weights
with its linears quantized to INT8 and INT4 (weight-only, GLM-130B scheme). Reported:

* prefill tokens/s (one prompt of --prompt tokens) and decode tokens/s (--new tokens
  after it, batch 1), median over --repeat runs;
* the ratio ours / transformers;
* decode's fraction of the memory-bandwidth roofline: every decode step must read every
  weight once (the embedding row aside), so tokens/s cannot exceed
  ``bandwidth / weight bytes``. Bandwidth is measured here by streaming reads of a
  buffer much larger than the caches (``torch.sum`` over 1 GiB, best of 5).

    python benchmarks/decode.py [--threads 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

CONFIG = dict(vocab_size=151552, hidden_size=256, intermediate_size=1024, num_hidden_layers=20,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
              attention_bias=True, pad_token_id=151329, eos_token_id=[151329])


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


def make_checkpoint(d: Path) -> None:
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    m = GlmForCausalLM(GlmConfig(**CONFIG, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5}))
    m.save_pretrained(d)


class HFRunner:
    name = "transformers"

    def __init__(self, d):
        from transformers import AutoModelForCausalLM

        self.m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    @torch.inference_mode()
    def prefill(self, ids):
        self.m(ids, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, ids, n):
        return self.m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=CONFIG["pad_token_id"])


class GLMRunner:
    def __init__(self, d, backend="cpu", name=None):
        from glm_runtime import load_model

        self.m = load_model(d, backend=backend)
        self.name = name or f"glm-runtime[{backend}]"

    def prefill(self, ids):
        self.m.generate(ids, max_new_tokens=1, stop_token_ids=[])

    def generate(self, ids, n):
        return self.m.generate(ids, max_new_tokens=n, stop_token_ids=[])


def time_once(r, ids, n):
    """(prefill tokens/s, decode tokens/s) of one run; decode time = generate - prefill."""
    t = time.perf_counter()
    r.prefill(ids)
    tp = time.perf_counter() - t
    t = time.perf_counter()
    out = r.generate(ids, n)
    tg = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + n
    return ids.shape[1] / tp, (n - 1) / max(tg - tp, 1e-9)  # the first new token comes from the prefill


def time_all(runners, ids, n, repeat):
    """Medians per runner, the runners taking turns in every round so that drift in the
    machine's speed affects them alike; the ratio to the first runner is taken round by
    round, then its median reported."""
    for r in runners:  # warm-up
        r.prefill(ids)
        r.generate(ids, 4)
    rounds = [[time_once(r, ids, n) for r in runners] for _ in range(repeat)]
    out = {}
    for i, r in enumerate(runners):
        pre = statistics.median(x[i][0] for x in rounds)
        dec = statistics.median(x[i][1] for x in rounds)
        ratio_p = statistics.median(x[i][0] / x[0][0] for x in rounds)
        ratio_d = statistics.median(x[i][1] / x[0][1] for x in rounds)
        out[r.name] = (pre, dec, ratio_p, ratio_d)
    return out


def weight_shapes(d: Path) -> dict[str, int]:
    """Element count of every tensor in the checkpoint."""
    from safetensors import safe_open

    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = math.prod(h.get_slice(k).get_shape())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=128, help="prompt length")
    ap.add_argument("--new", type=int, default=64, help="tokens to decode")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bw = measure_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "glm4-98m"
        make_checkpoint(d)
        sizes = weight_shapes(d)
        # a decode step reads every weight once, except the embedding table (one row)
        wbytes = 4 * sum(n for k, n in sizes.items() if "embed_tokens" not in k)
        runners = [HFRunner(d), GLMRunner(d, "cpu")]
        # weight-only INT8 / INT4 (GLM-130B scheme) of the same weights, on the cpu low-bit kernels
        from glm_runtime.converters import hf, native
        from glm_runtime.converters.quantize import quantize_state

        wbytes_of = {}
        for bits in (8, 4):
            qc, qs = quantize_state(*hf.read(d), bits)
            native.save(Path(tmp) / f"int{bits}", qc, qs)
            runners.append(GLMRunner(Path(tmp) / f"int{bits}", "cpu", f"glm-runtime[cpu] INT{bits}"))
            wbytes_of[runners[-1].name] = sum(t.numel() * t.element_size() for k, t in qs.items()
                                              if k != "embed.weight")
        # the onnx backend: an ONNX export of the same weights (fp32 graph) on onnxruntime's CPU provider
        from glm_runtime.converters.onnx.export import export_checkpoint

        export_checkpoint(d, Path(tmp) / "onnx", progress=False)
        runners.append(GLMRunner(Path(tmp) / "onnx", "onnx"))
        ids = torch.randint(0, 150000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
        results = time_all(runners, ids, a.new, a.repeat)
    roof = bw / wbytes
    n_params = sum(sizes.values())
    print(f"model: GLM-4 architecture, {n_params / 1e6:.1f}M parameters fp32; {torch.get_num_threads()} threads; "
          f"prompt {a.prompt}, decode {a.new} tokens, batch 1, median of {a.repeat}")
    print(f"memory bandwidth (streaming read): {bw / 1e9:.1f} GB/s; weights read per decode step "
          f"{wbytes / 1e6:.0f} MB -> roofline {roof:.1f} tokens/s")
    print(f"{'runtime':<32}{'prefill tok/s':>15}{'decode tok/s':>14}{'% roofline':>12}")
    for name, (p, dd, _, _) in results.items():  # quantized runners: roofline of their own (smaller) weights
        print(f"{name:<32}{p:>15.1f}{dd:>14.2f}{100 * dd * wbytes_of.get(name, wbytes) / bw:>11.1f}%")
    for name, (_, _, rp, rd) in results.items():
        if name != "transformers":
            print(f"{name} / transformers (median of per-round ratios): prefill x{rp:.2f}, decode x{rd:.2f}")


if __name__ == "__main__":
    main()
