"""llama.cpp as a benchmark peer, on exactly the weights of a transformers GLM checkpoint.

Benchmark-only: nothing in glm-runtime imports this module. It lets ``benchmarks/decode.py``
style benchmarks run llama.cpp (through the PyPI package ``llama-cpp-python``) next to
transformers and glm-runtime on the *same* random-weight ``GlmForCausalLM`` checkpoint, so
that the comparison is about the runtimes, not about the weights:

* :func:`write_gguf` turns the checkpoint directory (``config.json`` + ``*.safetensors``)
  into an f32 GGUF for llama.cpp's ``chatglm`` architecture, which is the architecture
  llama.cpp's own converter (``convert_hf_to_gguf.py``) registers for ``GlmForCausalLM``;
* :func:`quantize` makes q8_0 / q4_0 variants of it with llama.cpp's own quantizer;
* :class:`LlamaCppRunner` has the ``name`` / ``prefill(ids)`` / ``generate(ids, n)``
  interface of the runners in ``benchmarks/decode.py`` and drives llama.cpp through the
  low-level ctypes API (token ids in, greedy argmax out; no tokenizer is involved).

``python benchmarks/llama_cpp_peer.py --check`` builds a small random GLM, checks that
llama.cpp's f32 greedy continuation equals transformers' token for token (exit status 1
if not) and prints rough decode tokens/s for f32, q8_0 and q4_0.

Requires ``pip install gguf llama-cpp-python`` (the latter compiles llama.cpp); without
them :func:`unavailable_reason` says why and the rest of the benchmark can skip this peer.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import numpy as np
import torch

ARCH = "chatglm"  # llama.cpp's converter: ChatGLMModel handles "GlmForCausalLM"
QUANT_KINDS = ("q8_0", "q4_0")


def unavailable_reason() -> str | None:
    """None when this peer can run (``llama_cpp`` and ``gguf`` import), else a one-line reason."""
    missing = []
    for mod in ("llama_cpp", "gguf"):
        try:
            __import__(mod)
        except (ImportError, OSError, RuntimeError) as e:  # Runtime/OSError: libllama failed to load
            missing.append(f"{mod} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if missing:
        return "llama.cpp peer unavailable: cannot import " + ", ".join(missing) + \
            "; pip install gguf llama-cpp-python"
    return None


# ----------------------------------------------------------------------------------------
# transformers checkpoint -> GGUF
# ----------------------------------------------------------------------------------------

def _read_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s), as float32 torch tensors."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    state = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                state[k] = h.get_tensor(k).to(torch.float32)
    return state


def _rope_settings(cfg: dict) -> tuple[float, float]:
    """(rope theta, partial rotary factor) from a transformers 5 ``rope_parameters`` dict,
    falling back to the older top-level keys; only plain (unscaled) RoPE is supported,
    because the GGUF written here carries no rope-scaling metadata."""
    rp = cfg.get("rope_parameters") or {}
    kind = rp.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
    if kind != "default":
        raise NotImplementedError(f"rope_type {kind!r}: only 'default' RoPE is mapped to GGUF here")
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    return theta, partial


def write_gguf(hf_dir: Path, out: Path, fuse_qkv: bool = True) -> None:
    """Write ``hf_dir`` (a transformers ``GlmForCausalLM`` checkpoint) as an f32 GGUF at ``out``.

    Architecture ``chatglm``: llama.cpp's converter maps ``GlmForCausalLM`` to it, and its
    graph (``src/models/chatglm.cpp``) is GLM's: pre-RMSNorm blocks, Q/K/V with bias,
    NORM-style RoPE (rotating *adjacent* pairs, as transformers' GLM ``rotate_half`` does)
    on the first ``rope.dimension_count`` dims of each head, no output bias, and a SwiGLU
    FFN from one fused up tensor of 2*n_ff rows whose first half is the gate (silu'd) and
    second half the up projection -- the same order as transformers' ``gate_up_proj``.

    Tensors are written in transformers' ``[out, in]`` row-major layout unchanged: GGUF
    stores dimensions innermost-first, so that is ggml's ``{in, out}`` matrix llama.cpp
    expects; no transposes and no row permutations are needed. ``fuse_qkv`` (default)
    concatenates q/k/v rows (and biases) into ``attn_qkv``, which is what the converter
    writes with ``--fuse-qkv`` and lets llama.cpp do one matmul per layer; with
    ``fuse_qkv=False`` the converter's default separate ``attn_q/k/v`` are written.

    Metadata deliberately differs from the converter where the converter would not
    reproduce this checkpoint: for ``GlmForCausalLM`` it reads ``layernorm_epsilon``
    (absent -> 1e-5), hard-codes rope base 10000 and writes ``hidden_size`` as context
    length; here the real ``rms_norm_eps``, rope theta and ``max_position_embeddings`` are
    written. The tokenizer is ``none`` with ``chatglm.vocab_size`` set, which llama.cpp
    loads as a vocab-less model of that many dummy tokens: only token ids are fed.
    """
    import gguf

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    archs = cfg.get("architectures") or ["GlmForCausalLM"]
    if "GlmForCausalLM" not in archs:
        raise ValueError(f"{hf_dir}: architectures {archs}, expected GlmForCausalLM")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: llama.cpp's chatglm graph is SwiGLU (silu)")

    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or n_embd // n_head
    n_layer = cfg["num_hidden_layers"]
    n_ff = cfg["intermediate_size"]
    n_vocab = cfg["vocab_size"]
    if head_dim * n_head != n_embd:
        # chatglm's loader shapes attn_output as {n_embd, n_embd}
        raise ValueError(f"head_dim*heads = {head_dim * n_head} != hidden_size {n_embd}: "
                         "llama.cpp's chatglm architecture cannot load it")
    theta, partial = _rope_settings(cfg)

    st = _read_state(hf_dir)

    def take(name: str) -> np.ndarray:
        return st.pop(name).contiguous().numpy()

    w = gguf.GGUFWriter(str(out), ARCH)  # also writes general.architecture
    w.add_name(hf_dir.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(int(head_dim * partial))
    w.add_rope_freq_base(theta)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")
    w.add_add_bos_token(False)

    w.add_tensor("token_embd.weight", take("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", take("model.norm.weight"))
    if "lm_head.weight" in st:  # absent when tied: llama.cpp then reuses token_embd.weight
        w.add_tensor("output.weight", take("lm_head.weight"))
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", take(p + "input_layernorm.weight"))
        for kind in ("weight", "bias"):
            q, k, v = (p + f"self_attn.{x}_proj.{kind}" for x in "qkv")
            if q not in st:  # attention_bias=False
                continue
            if fuse_qkv:  # rows [q | k | v], as the converter's --fuse-qkv (torch.cat dim 0)
                w.add_tensor(b + f"attn_qkv.{kind}", np.concatenate([take(q), take(k), take(v)], axis=0))
            else:
                for x, name in zip("qkv", (q, k, v)):
                    w.add_tensor(b + f"attn_{x}.{kind}", take(name))
        w.add_tensor(b + "attn_output.weight", take(p + "self_attn.o_proj.weight"))
        w.add_tensor(b + "ffn_norm.weight", take(p + "post_attention_layernorm.weight"))
        w.add_tensor(b + "ffn_up.weight", take(p + "mlp.gate_up_proj.weight"))  # [gate; up] rows
        w.add_tensor(b + "ffn_down.weight", take(p + "mlp.down_proj.weight"))
    leftover = [k for k in st if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unmapped checkpoint tensors: {leftover[:5]}")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------

_log_callback = None  # kept referenced: llama.cpp holds a raw pointer to it


def _quiet() -> None:
    """Let only llama.cpp's errors through to stderr (it logs every model-load and
    quantize line otherwise). Our own callback rather than llama-cpp-python's
    ``set_verbose(False)``: that one maps ggml's log levels with an older numbering
    (WARN=3 taken as ERROR), so warnings would still print."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp as L

    error, cont = 4, 5  # GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT (ggml.h)
    last = [0]

    def cb(level, text, _user):
        level = last[0] if level == cont else level
        last[0] = level
        if level == error:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_callback = L.llama_log_callback(cb)
    L.llama_log_set(_log_callback, ctypes.c_void_p(0))


def quantize(src: Path, dst: Path, kind: str) -> None:
    """Quantize the GGUF ``src`` to ``dst`` with llama.cpp's ``llama_model_quantize``.

    ``kind`` is "q8_0" or "q4_0". Only the file type is set; everything else is
    ``llama_model_quantize_default_params()``, i.e. what ``llama-quantize src dst Q4_0``
    does. With those defaults llama.cpp quantizes every 2-D ``*.weight`` except norms to
    the chosen type, keeps 1-D tensors (norms, biases) f32, and treats two tensors
    specially: ``output.weight`` becomes Q6_K for q4_0 (it stays Q8_0 for q8_0; Q8_0 is
    used instead of Q6_K if its row length is not a multiple of 256), and
    ``token_embd.weight`` takes the plain file type (q4_0 / q8_0) -- unless there is no
    ``output.weight`` (tied embeddings), in which case it gets the output's treatment.
    """
    import llama_cpp as L

    ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}.get(kind)
    if ftype is None:
        raise ValueError(f"kind {kind!r}: expected one of {QUANT_KINDS}")
    _quiet()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {kind}) returned {rc}")


# ----------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------

_backend_ready = False


class LlamaCppRunner:
    """llama.cpp on one GGUF, with ``decode.py``'s runner interface (batch 1, greedy).

    The low-level API is used rather than ``llama_cpp.Llama``: the GGUF has no vocabulary,
    and the benchmark only needs ids in and the argmax of the last position's logits out.
    One context is kept for the runner's life; every ``prefill`` / ``generate`` starts by
    clearing its KV memory (``llama_memory_clear``), which gives each call the state of a
    fresh context without timing llama.cpp's context/compute-buffer allocation.

    * ``n_threads`` and ``n_threads_batch`` are both ``threads``;
    * ``n_ctx`` (default 1024) covers a 512-token prompt plus 64 new tokens; ``n_batch``
      (= ``n_ubatch``) is 512 and longer prompts are fed in 512-token chunks;
    * logits are requested only for the last prompt token and for each decoded token;
    * the model is loaded with ``use_extra_bufts=False``: on some VMs the CPU "extra"
      buffer types (AMX / weight-repacking buffers) crash inside ``llama_decode``. This
      also means q4_0/q8_0 weights are not repacked into llama.cpp's interleaved CPU
      layouts, so quantized speed here may be below what llama.cpp reaches with them;
    * the KV cache is f32 and flash attention off by default, so that f32 weights
      reproduce an f32 transformers run rather than approximate it: llama.cpp's CPU flash
      attention loses precision even with an f32 cache (measured on a model shaped like
      the check model: last-position logits off by ~1e-3 after 16 tokens and ~1e-2 after
      536, against ~1e-6 without it). ``kv_f16=True`` and
      ``flash_attn=None`` (llama.cpp's "auto", i.e. on for the CPU) give llama.cpp's
      usual defaults.
    """

    def __init__(self, gguf_path: Path, threads: int, name: str, n_ctx: int = 1024,
                 n_batch: int = 512, kv_f16: bool = False, flash_attn: bool | None = False):
        import llama_cpp as L

        global _backend_ready
        self.L, self.name, self.n_batch = L, name, n_batch
        _quiet()
        if not _backend_ready:
            L.llama_backend_init()
            _backend_ready = True

        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        cp.embeddings = False
        kv = L.GGML_TYPE_F16 if kv_f16 else L.GGML_TYPE_F32
        cp.type_k = cp.type_v = kv
        cp.flash_attn_type = {None: L.LLAMA_FLASH_ATTN_TYPE_AUTO, False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                              True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED}[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        """Free the batch, context and model (also done on garbage collection)."""
        L = self.L
        if getattr(self, "batch", None) is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
            self.close()

    def _decode(self, tokens: list[int], start: int) -> None:
        """Evaluate ``tokens`` at positions ``start``.. in sequence 0, in n_batch chunks,
        asking for logits of the very last token only."""
        L, b = self.L, self.batch
        for c in range(0, len(tokens), self.n_batch):
            chunk = tokens[c:c + self.n_batch]
            last = c + len(chunk) == len(tokens)
            for j, t in enumerate(chunk):
                b.token[j] = t
                b.pos[j] = start + c + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = int(last and j == len(chunk) - 1)
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self) -> int:
        """Greedy pick from the logits of the last evaluated token (first max on ties, as
        torch.argmax)."""
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _start(self, ids: torch.Tensor, n_new: int) -> list[int]:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"ids must be [1, T], got {tuple(ids.shape)}")
        toks = ids[0].tolist()
        if len(toks) + n_new > self.n_ctx:
            raise ValueError(f"{len(toks)} + {n_new} tokens exceed n_ctx {self.n_ctx}")
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        return toks

    def prefill(self, ids: torch.Tensor) -> None:
        """Evaluate the prompt once from an empty KV state (logits of its last token only)."""
        self._decode(self._start(ids, 0), 0)
        self._argmax()  # the first new token, as a prefill in decode.py yields it

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy: exactly ``n`` new tokens after ``ids`` (no stop tokens, no sampling),
        from an empty KV state; returns ``[1, T + n]``."""
        toks = self._start(ids, n)
        self._decode(toks, 0)
        out = list(toks)
        for i in range(n):
            out.append(self._argmax())
            if i == 0:
                t = time.perf_counter()  # the first new token is out
            if i < n - 1:
                self._decode(out[-1:], len(out) - 1)
        self.decode_seconds = time.perf_counter() - t  # the n - 1 single-token steps, to the last token
        return torch.tensor([out], dtype=torch.long)


# ----------------------------------------------------------------------------------------
# self-check
# ----------------------------------------------------------------------------------------

CHECK_CONFIG = {"vocab_size": 16384, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 2048,
                "max_position_embeddings": 4096, "attention_bias": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                "pad_token_id": 0, "eos_token_id": [1]}


def _decode_tps(r: LlamaCppRunner, ids: torch.Tensor, n: int, repeat: int) -> float:
    """Decode tokens/s: (n - 1) single-token steps over the time ``generate`` spent in them,
    median of ``repeat`` after a warm-up. Timed inside the runner rather than as
    generate - prefill, which on a noisy 2-core VM can even go negative."""
    r.generate(ids, 4)
    rates = []
    for _ in range(repeat):
        r.generate(ids, n)
        rates.append((n - 1) / r.decode_seconds)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="f32 greedy equality against transformers, then rough decode tokens/s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt length for the timing")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded in the timing")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    if not a.check:
        ap.print_help()
        return 0
    why = unavailable_reason()
    if why:
        print(why)
        return 2

    from transformers import GlmConfig, GlmForCausalLM

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        d, f32 = Path(tmp) / "glm-check", Path(tmp) / "glm-check-f32.gguf"
        torch.manual_seed(0)
        hf = GlmForCausalLM(GlmConfig(**CHECK_CONFIG)).eval()
        hf.save_pretrained(d)
        write_gguf(d, f32)

        ids = torch.randint(0, CHECK_CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=CHECK_CONFIG["pad_token_id"])
        r = LlamaCppRunner(f32, a.threads, "llama.cpp f32")
        got = r.generate(ids, 32)
        ok = torch.equal(got, ref)
        if ok:
            print("f32 check: llama.cpp greedy == transformers greedy (16-token prompt, 32 new tokens): PASS")
        else:
            diff = int((got[0, 16:] != ref[0, 16:]).nonzero()[0])
            print(f"f32 check: FAIL, first difference at new token {diff}")
            print("  transformers:", ref[0, 16:].tolist())
            print("  llama.cpp:   ", got[0, 16:].tolist())

        tp = torch.randint(0, CHECK_CONFIG["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(1))
        runners = [(r, f32)]
        for kind in QUANT_KINDS:
            q = Path(tmp) / f"glm-check-{kind}.gguf"
            quantize(f32, q, kind)
            runners.append((LlamaCppRunner(q, a.threads, f"llama.cpp {kind}"), q))
        print(f"rough decode tokens/s ({a.threads} threads, prompt {a.prompt}, {a.new} new, median of {a.repeat}):")
        for x, path in runners:
            tps = _decode_tps(x, tp, a.new, a.repeat)
            print(f"  {x.name:<16}{tps:>8.1f} tok/s   (GGUF {os.path.getsize(path) / 1e6:.0f} MB)")
            x.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
