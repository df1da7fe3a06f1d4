"""The whole GPU check of the cuda backend (issue 14) in one run: conformance, parity, speed
against transformers, kernels against torch's own, and decode steps recorded as CUDA graphs.

    python benchmarks/gpu_check.py --out DIR             # one NVIDIA GPU, at most 8 minutes
    python benchmarks/gpu_check.py --out DIR --dry-run   # anywhere, on the CPU, tiny shapes
    ... [--only speed,graphs]                            # re-measure some sections

Why one script: time on a GPU is rare and short, so everything that can be prepared is
prepared on the CPU, and the GPU runs this once. Why a dry run: the script must not rot
between GPU runs, so CI runs every section of it on the CPU (tests/test_gpu_check.py).

Writes ``DIR/results.json`` (rewritten after every section, so an interrupted run keeps
what it measured) and ``DIR/check.log`` (a progress line per measurement).

Sections, each in a process of its own with a time budget of its own (a crash, a hung
kernel or a poisoned device context in one cannot take the others down; the process is
killed at its budget, and what it had measured is kept):

* ``conformance``: the conformance kit (``pytest --glm-backend cuda --glm-strict``) in fp16,
  bf16 and fp32, one pytest process per dtype, side by side: counts and failures.
* ``parity``: a tiny model of each family on cuda against the cpu backend (same weights,
  rounded to the dtype), fp16 and bf16: the largest logit error relative to the range of
  the logits, and 32 greedy tokens, with the reference's margins where they part.
* ``speed``: a ``glm-4-9b``-shaped model with random weights made on the GPU, bf16 and fp16,
  against transformers' ``GlmForCausalLM`` of the same shape on the same GPU: prefill of a
  2048-token prompt, decode at batch 1 and 32 (plain steps and recorded steps), batch-1
  decode as a fraction of the roofline (bytes of the weights a step reads / the device's
  copy bandwidth, measured here); INT8 and INT4 weight-only models at batch 1.
* ``kernels``: the Triton kernels alone: INT8/INT4 weight-only matmul against fp16 cuBLAS
  (``torch.matmul``) at M = 1, 16, 2048 on the model's linear shapes; attention against
  ``scaled_dot_product_attention`` (flash) at prefill 2K and 8K and decode over an 8K
  cache; norms, rotary and activations against torch eager.
* ``graphs``: fixed-shape decode steps recorded through ``Backend.capture`` (a CUDA graph on
  the cuda backend) against the same steps unrecorded: tokens/s, and whether the tokens
  are identical (to the unrecorded steps, and to ``generate``'s own steps).

Timing is backend-neutral: ``time.perf_counter`` around the work, fenced by the backend's
``synchronize()``, after warm-up calls; medians are reported.

Dry run: tiny shapes (a tiny glm-4-shaped config instead of 9B), the Triton kernels under
Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, the cpu backend in place of
cuda for whole models, transformers on the CPU; the device graph itself is replaced by the
eager reference capture (``eager_capture``) so the replay path still runs. Every figure of
a dry run is a CPU figure and says so (``"dry_run": true``).

On the GPU machine glm-runtime must be installed (a wheel built elsewhere installs without
network: ``pip install --no-deps glm_runtime-*.whl``); transformers is needed for the speed
peer and is recorded as missing otherwise.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

DRY = "--dry-run" in sys.argv[1:]
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
if DRY:  # before any Triton kernel is defined: interpreter mode is fixed at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import glm_runtime.core  # noqa: E402, F401 - the installed package (entry points: backends, the kit's plugin)
except ImportError as e:
    sys.exit(f"gpu_check: glm-runtime is not installed in this Python ({e}); install it first "
             "(pip install --no-deps ., or a wheel of it where there is no network)")

from glm_runtime.api import GLM  # noqa: E402
from glm_runtime.backends.cpu.plugin import CPUBackend  # noqa: E402
from glm_runtime.backends.cuda.plugin import CUDABackend  # noqa: E402
from glm_runtime.cli.bench_ops import median_time  # noqa: E402
from glm_runtime.conformance.model_check import SMALL_TOKENS, kit_config, kit_prompt, kit_state  # noqa: E402
from glm_runtime.conformance.target import DeviceView  # noqa: E402
from glm_runtime.converters.hf import config_to_hf  # noqa: E402
from glm_runtime.converters.quantize import quantize_state  # noqa: E402
from glm_runtime.core.build import build_model, materialize, op_table  # noqa: E402
from glm_runtime.core.generation import DecodeBatch  # noqa: E402
from glm_runtime.core.masks import prefill_inputs  # noqa: E402
from glm_runtime.core.model import parameter_shapes  # noqa: E402
from glm_runtime.core.ops import reference  # noqa: E402
from glm_runtime.core.ops.contract import tolerance  # noqa: E402
from glm_runtime.core.presets import preset  # noqa: E402
from glm_runtime.core.quant import keeps_stored_dtype, quantize  # noqa: E402
from glm_runtime.core.registry import kernels_for  # noqa: E402
from glm_runtime.core.registry.capture import eager_capture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
# seconds per section on the GPU; their sum (455) leaves the 8-minute run 25 s for start-up
BUDGETS = {"conformance": 120, "parity": 60, "speed": 150, "kernels": 75, "graphs": 50}
FAMILIES = ("tiny-glm-130b", "tiny-chatglm-6b", "tiny-chatglm2", "tiny-glm-4", "tiny-glm-4-0414")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
DRY_NOTE = ("DRY RUN on the CPU: tiny shapes, Triton kernels under the interpreter, the cpu backend in place of "
            "cuda for whole models; no figure here is a GPU figure")


@dataclass(frozen=True)
class Plan:
    """Every size the check uses: the GPU's, or the dry run's tiny ones."""

    model: str                   # "glm-4-9b" or "tiny": the speed/graphs/kernels model
    prefill_tokens: int          # the prompt whose prefill is timed
    decode_prompt: int           # the prompt before timed decode steps
    decode_steps: int            # timed decode steps (after the warm-up steps)
    decode_warmup: int
    batches: tuple[int, ...]     # decode batch sizes
    parity_tokens: int           # greedy tokens compared per family
    kernel_rows: tuple[int, ...]  # M of the weight-only matmuls
    attn_prefill: tuple[int, ...]
    attn_decode_cache: int
    elementwise_rows: int        # rows of the norm/rotary/activation benchmarks
    copy_bytes: int              # buffer of the bandwidth measurement
    warmup: int
    iters: int
    reserve_s: float             # a measurement starts only with this much of the budget left


GPU_PLAN = Plan("glm-4-9b", 2048, 128, 32, 3, (1, 32), 32, (1, 16, 2048), (2048, 8192), 8192, 2048, 2 << 30,
                2, 10, 8.0)
# the dry run keeps one case of each code path: M = 1 and 64 take the decode and the prefill tiles
DRY_PLAN = Plan("tiny", 64, 16, 4, 1, (1, 4), 32, (1, 64), (64,), 128, 16, 32 << 20, 0, 2, 0.0)


def tiny_glm4():
    """glm-4-9b's architecture (every flag) at test size, special ids inside a 1024 vocabulary."""
    return preset("glm-4-9b", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  ffn_hidden_size=256, vocab_size=1024, max_position_embeddings=512, **SMALL_TOKENS)


def model_config(plan: Plan):
    return preset("glm-4-9b") if plan.model == "glm-4-9b" else tiny_glm4()


def one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:300]}"


# --------------------------------------------------------------------------- a section's state
class Ctx:
    """What a section process holds: its plan, its backend, its clock, its partial results."""

    def __init__(self, name: str, out: Path, budget: float, dry: bool):
        self.name, self.out, self.dry = name, out, dry
        self.plan = DRY_PLAN if dry else GPU_PLAN
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget * 0.9  # its own stop, before the parent's kill at the budget
        self.results: dict = {}
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.status, self.reason = "running", None
        if dry:  # tiny shapes whose times mean nothing: one thread, no contention with the other processes
            torch.set_num_threads(1)
        cuda = CUDABackend()
        probe = cuda.probe()
        self.cuda = cuda
        if probe.available:
            self.backend, self.device = cuda, cuda.device(0)
        elif dry:  # whole models on the cpu backend; kernels: the cuda backend's, on host tensors
            self.backend, self.device = CPUBackend(), torch.device("cpu")
        else:
            raise RuntimeError(f"the cuda backend is unavailable: {probe.reason}")

    # time and log
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def can(self, what: str) -> bool:
        """Whether a measurement may start; if not, it is recorded as skipped."""
        if self.left() > self.plan.reserve_s:
            return True
        self.skip(what, f"the section's budget is spent ({self.left():.0f} s left)")
        return False

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {self.name}: {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.out / "check.log", "a") as f:
            f.write(line + "\n")

    def attempt(self, what: str, fn):
        """One measurement: None when the budget is spent (recorded as skipped); an exception
        is recorded as its result, ``{"error": one line}``, and the section goes on."""
        if not self.can(what):
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a failed measurement is a finding, not the end of the run
            self.log(f"{what}: error: {one_line(e)}")
            return {"error": one_line(e)}

    def working(self, label: str, rec: dict) -> None:
        """Show ``rec`` under ``in_progress`` while it fills (a kill keeps what it holds)."""
        self.results.setdefault("in_progress", {})[label] = rec

    def finished(self, label: str) -> None:
        pending = self.results.get("in_progress", {})
        pending.pop(label, None)
        if not pending:
            self.results.pop("in_progress", None)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: skipped: {why}")
        self.log(f"{what}: skipped: {why}")

    def save(self) -> None:
        """The section's results so far (the parent keeps them even if this process is killed)."""
        rec = dict(status=self.status, reason=self.reason, skipped=self.skipped, notes=self.notes,
                   results=self.results)
        path = self.out / "sections" / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(path)

    # device helpers
    def sync(self) -> None:
        self.backend.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype whole models compute in: ``dtype`` on the GPU, the cpu backend's in a dry run."""
        return self.backend.compute_dtype(dtype)

    def recorder(self):
        """The backend whose capture records decode steps: the cuda backend on the GPU; in a
        dry run the cpu backend with the eager reference capture (there is no device graph)."""
        if self.backend is self.cuda:
            return self.backend
        return EagerRecordCPU()


class EagerRecordCPU(CPUBackend):
    """Dry run: the cpu backend, capturing with the reference semantics of a record."""

    def capture(self, fn, example_inputs):
        return eager_capture(fn, example_inputs, warmup=CUDABackend.capture_warmup)


def randn(shape, dtype, device, gen, std=1.0):
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)


# --------------------------------------------------------------------------- models
def random_model(config, backend, dtype, device, seed: int = 0, bits: int | None = None):
    """The GLM graph on ``backend`` with normal(0, 0.02) weights drawn on ``device`` itself
    (nothing is made on the host, nothing downloaded); ``bits`` quantizes the layers'
    linears weight-only, per output row (the authors' scheme), on the device too."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for k, (shape, _) in sorted(parameter_shapes(config).items()):
        if k.endswith("norm.weight"):
            state[k] = torch.ones(shape, dtype=dtype, device=device)
        elif k.endswith(".bias"):
            state[k] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            state[k] = randn(shape, dtype, device, gen, 0.02)
    if bits:
        config, state = quantize_state(config, state, bits)
    ops = op_table(backend, config, dtype, strict=True)
    return materialize(config, state, ops, dtype, device, backend.prepare_parameter).eval().requires_grad_(False)


def step_bytes(model) -> int:
    """Bytes a decode step reads at least: every weight once, but of the embedding table
    only the fed rows (negligible), unless the head reads it too (tied)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if not model.config.tie_word_embeddings:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def hf_model(config, dtype, device):
    """transformers' GlmForCausalLM (Glm4ForCausalLM for sandwich norms) of the same shape,
    random weights made on ``device`` by its own initialiser. Returns (model, facts)."""
    import transformers
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    transformers.logging.set_verbosity_error()
    d = config_to_hf(config)
    kind = d.pop("model_type")
    d.pop("architectures")
    d["dtype"] = str(dtype).replace("torch.", "")
    cfg_cls, model_cls = (Glm4Config, Glm4ForCausalLM) if kind == "glm4" else (GlmConfig, GlmForCausalLM)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = model_cls(cfg_cls(**d))
    finally:
        torch.set_default_dtype(previous)
    m.eval().requires_grad_(False)
    rotated = 2 * m.model.rotary_emb.inv_freq.numel()
    facts = {"class": model_cls.__name__, "transformers": transformers.__version__,
             "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
             "attn_implementation": getattr(m.config, "_attn_implementation", None),
             "rotary_dim": rotated, "rotary_dim_matches": rotated == config.rope_dim,
             "parameters": sum(p.numel() for p in m.parameters())}
    return m, facts


# --------------------------------------------------------------------------- decode and prefill
def ours_prefill(ctx: Ctx, model, tokens: int) -> dict:
    """A prompt of ``tokens`` through the cache-writing prefill (generate's first call)."""
    cfg = model.config
    gen = torch.Generator(device=ctx.device).manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, tokens), device=ctx.device, generator=gen)
    batch = DecodeBatch(model, 1, tokens)
    pos, mask, _ = prefill_inputs(cfg, ids, None)
    last = torch.tensor([tokens - 1], device=ctx.device)
    sec = median_time(lambda: batch.prefill(slice(0, 1), ids, pos, mask, logits_index=last), ctx.sync,
                      ctx.plan.warmup, max(3, ctx.plan.iters // 2))
    return {"tokens": tokens, "ms": sec * 1e3, "tokens_per_s": tokens / sec}


def ours_decode(ctx: Ctx, model, rows: int, mode: str, recorder=None) -> dict:
    """Greedy decode of ``rows`` prompts, one step timed at a time (argmax included).

    mode ``generate``: the steps ``generate`` takes (attention over the written positions
    only, shapes growing by one each step); ``fixed``: fixed-shape steps (the whole cache
    width, what a record needs), unrecorded; ``recorded``: fixed-shape steps recorded
    through ``recorder.capture`` at the first step (that step's time includes recording).
    """
    p, cfg = ctx.plan, model.config
    gen = torch.Generator(device=ctx.device).manual_seed(2)
    ids = torch.randint(3, cfg.vocab_size, (rows, p.decode_prompt), device=ctx.device, generator=gen)
    batch = DecodeBatch(model, rows, p.decode_prompt + p.decode_warmup + p.decode_steps + 1)
    pos, mask, state = prefill_inputs(cfg, ids, None)
    last = torch.tensor([p.decode_prompt - 1], device=ctx.device)
    logits = batch.prefill(slice(0, rows), ids, pos, mask, real=state.real, logits_index=last)[:, -1]
    batch.begin_decode(slice(0, rows), state)
    if mode == "generate":
        batch.aligned, batch.unpadded = True, state.all_real
    elif mode == "recorded":
        batch.capture_with(recorder)
    fixed = mode != "generate"
    tok = logits.argmax(-1)
    toks, times = [], []
    ctx.sync()
    for _ in range(p.decode_warmup + p.decode_steps):
        t = time.perf_counter()
        tok = batch.step(rows, tok, fixed_shape=fixed).argmax(-1)
        ctx.sync()
        times.append(time.perf_counter() - t)
        toks.append(tok)
    step = statistics.median(times[p.decode_warmup:])
    return {"rows": rows, "mode": mode, "step_ms": step * 1e3, "tokens_per_s": rows / step,
            "first_step_ms": times[0] * 1e3, "recorded_rows": batch.recorded_rows,
            "tokens": torch.stack(toks, 1).cpu()}


def hf_prefill(ctx: Ctx, m, vocab: int, tokens: int) -> dict:
    gen = torch.Generator(device=ctx.device).manual_seed(1)
    ids = torch.randint(3, vocab, (1, tokens), device=ctx.device, generator=gen)
    sec = median_time(lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1), ctx.sync, ctx.plan.warmup,
                      max(3, ctx.plan.iters // 2))
    return {"tokens": tokens, "ms": sec * 1e3, "tokens_per_s": tokens / sec}


def hf_decode(ctx: Ctx, m, vocab: int, rows: int) -> dict:
    """transformers' own decode loop as ``generate`` runs it: its cache object, one token per row."""
    p = ctx.plan
    gen = torch.Generator(device=ctx.device).manual_seed(2)
    ids = torch.randint(3, vocab, (rows, p.decode_prompt), device=ctx.device, generator=gen)
    out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
    times = []
    ctx.sync()
    for _ in range(p.decode_warmup + p.decode_steps):
        t = time.perf_counter()
        out = m(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
        ctx.sync()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[p.decode_warmup:])
    return {"rows": rows, "step_ms": step * 1e3, "tokens_per_s": rows / step}


def copy_bandwidth(ctx: Ctx) -> float:
    """Bytes/s a device-to-device copy moves (read + write), the roofline's denominator."""
    n = ctx.plan.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    sec = median_time(lambda: dst.copy_(src), ctx.sync, 3, 10)
    del src, dst
    ctx.free()
    return 2 * n / sec


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "tokens"}


# --------------------------------------------------------------------------- a: conformance
DTYPE_TOKENS = {"float16", "bfloat16", "float32"}
KIT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DRY_KIT_CASES = "(test_op and (rms_norm-24 or attention-decode-pad or int8-decode)) or test_declares"


def junit_summary(path: Path, dtype: str) -> dict:
    """Counts and failures of one dtype's run (cases parametrized for other dtypes, which
    ``--glm-dtypes`` skips, are left out)."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "")
        tokens = set(re.split(r"[\[\]\-]", name))
        if tokens & DTYPE_TOKENS and dtype not in tokens:
            continue
        kids = {c.tag: c for c in tc}
        for tag, key in (("failure", "failed"), ("error", "errors")):
            if tag in kids:
                out[key] += 1
                out["failures"].append(f"{name}: {(kids[tag].get('message') or '').splitlines()[0][:300]}"
                                       if kids[tag].get("message") else name)
                break
        else:
            if "skipped" in kids:
                out["skipped"] += 1
                why = (kids["skipped"].get("message") or "").strip()[:200]
                out["skip_reasons"][why] = out["skip_reasons"].get(why, 0) + 1
            else:
                out["passed"] += 1
    return out


def section_conformance(ctx: Ctx) -> None:
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", "--glm-backend", "cuda",
            "--glm-strict"]
    if ctx.dry:
        args += ["--glm-host", "-k", DRY_KIT_CASES]
        ctx.skip("the rest of the kit", "dry run: three op cases per dtype under the Triton interpreter (CI runs "
                 "the whole kit under it: tests/test_triton_interpret.py)")
    else:
        n = torch.cuda.device_count()
        if n < 2:
            args += ["-k", "not test_two_process"]
            ctx.skip("two-process tensor-parallel check", f"{n} GPU here; NCCL wants one device per rank")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    if ctx.dry:  # three interpreters side by side on a small host
        env["OMP_NUM_THREADS"] = "1"
    procs = {}
    for label, dt in KIT_DTYPES.items():
        xml = ctx.out / "sections" / f"conformance-{label}.xml"
        xml.unlink(missing_ok=True)
        logf = open(ctx.out / "sections" / f"conformance-{label}.out", "w")
        procs[label] = (subprocess.Popen(args + ["--glm-dtypes", label, f"--junitxml={xml}"], cwd=ROOT, env=env,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True), xml, logf)
        ctx.log(f"kit started for {label}")
    for label, (proc, xml, logf) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, ctx.left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = None
        logf.close()
        rec = {"returncode": rc}
        if rc is None:
            rec["reason"] = "killed: the section's budget ran out"
        if xml.is_file():
            rec.update(junit_summary(xml, KIT_DTYPES[label]))
        else:
            tail = (ctx.out / "sections" / f"conformance-{label}.out").read_text().strip().splitlines()[-3:]
            rec["reason"] = rec.get("reason") or f"no report: {' | '.join(tail)}"
        ctx.results[label] = rec
        ctx.log(f"{label}: {rec.get('passed', 0)} passed, {rec.get('failed', 0)} failed, "
                f"{rec.get('errors', 0)} errors, {rec.get('skipped', 0)} skipped (exit {rc})")
        ctx.save()


# --------------------------------------------------------------------------- b: parity
def parity_one(ctx: Ctx, family: str, dtype: torch.dtype) -> dict:
    """One family at one dtype: teacher-forced logits on the reference's 32 greedy tokens,
    then the target's own greedy tokens through its KV cache."""
    config = kit_config(family)
    state = {k: v if keeps_stored_dtype(k, v) else v.to(dtype) for k, v in kit_state(config).items()}
    cpu = CPUBackend()
    ref = GLM(build_model(config, {k: v.clone() for k, v in state.items()}, cpu, strict_ops=True), cpu)
    compute = ctx.model_dtype(dtype)
    view = DeviceView(ctx.backend, ctx.device, compute, kernels_for(ctx.backend))
    target = GLM(build_model(config, state, view, strict_ops=True), view)
    n = ctx.plan.parity_tokens
    ids, am = kit_prompt(config)
    T0 = ids.shape[1]
    ref_out = ref.generate(ids, attention_mask=am, max_new_tokens=n, stop_token_ids=[])
    full = torch.cat((am, torch.ones(ids.shape[0], ref_out.shape[1] - T0, dtype=am.dtype)), 1)
    want = ref(ref_out, full)
    got = target(ref_out, full).cpu()
    real = full.bool()
    err = (got - want).abs()[real]
    span = float(want[real].max() - want[real].min())
    atol, rtol = tolerance(dtype)
    n_ops = 9 * config.num_layers + 3  # the contract's per-op bound, ops in series (model_check)
    bound = n_ops * (atol + rtol * want.abs())[real]

    def near_tie(margin: float, logit: float) -> bool:  # the bound on both logits: a tie at this precision
        return margin <= 2 * n_ops * (atol + rtol * abs(logit))

    rec = {"compute_dtype": str(compute).replace("torch.", ""), "max_abs_error": float(err.max()),
           "logit_range": span, "max_error_over_range": float(err.max()) / span,
           "within_contract_bound": bool((err <= bound).all()), "bound_atol": n_ops * atol, "bound_rtol": n_ops * rtol}
    forced = []  # teacher-forced steps where the target's argmax is not the reference's token
    for b in range(ids.shape[0]):
        for t in range(T0 - 1, ref_out.shape[1] - 1):
            w, g = int(ref_out[b, t + 1]), int(got[b, t].argmax())
            if w != g:
                margin = float(want[b, t, w] - want[b, t, g])
                forced.append({"row": b, "step": t - T0 + 1, "ref": w, "target": g, "ref_margin": margin,
                               "ref_top1_top2": top2_margin(want[b, t]),
                               "near_tie": near_tie(margin, float(want[b, t, w]))})
    rec["teacher_forced_disagreements"] = forced
    out = target.generate(ids, attention_mask=am, max_new_tokens=n, stop_token_ids=[]).cpu()
    rows = []
    for b in range(ids.shape[0]):
        same = (out[b, T0:] == ref_out[b, T0:]).tolist()
        agree = same.index(False) if False in same else len(same)
        row = {"row": b, "agreeing_tokens": agree, "of": len(same)}
        if agree < len(same):  # where they part: how close the reference's own choice was
            t = T0 + agree - 1
            w, g = int(ref_out[b, t + 1]), int(out[b, t + 1])
            margin = float(want[b, t, w] - want[b, t, g])
            row.update(ref=w, target=g, ref_margin=margin, ref_margin_over_range=margin / span,
                       ref_top1_top2=top2_margin(want[b, t]), target_top1_top2=top2_margin(got[b, t]),
                       near_tie=near_tie(margin, float(want[b, t, w])))
        rows.append(row)
    rec["greedy"] = rows
    rec["greedy_all_agree"] = all(r["agreeing_tokens"] == r["of"] for r in rows)
    rec["ok"] = rec["within_contract_bound"] and all(r.get("near_tie", True) for r in rows + forced)
    return rec


def top2_margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def section_parity(ctx: Ctx) -> None:
    if ctx.backend is not ctx.cuda:
        ctx.notes.append("dry run: the cpu backend stands in for cuda (compute fp32), so the errors are zero by "
                         "construction; the Triton kernels' model parity runs in CI under the interpreter")
    for label, dtype in HALF.items():
        for family in FAMILIES:
            key = f"{family}/{label}"
            if not ctx.can(key):
                continue
            try:
                rec = parity_one(ctx, family, dtype)
            except Exception as e:  # noqa: BLE001 - one family's failure is a finding, not the end
                rec = {"error": one_line(e)}
            ctx.results[key] = rec
            if "error" in rec:
                ctx.log(f"{key}: {rec['error']}")
            else:
                agree = ", ".join(f"{r['agreeing_tokens']}/{r['of']}" for r in rec["greedy"])
                ctx.log(f"{key}: max error {rec['max_abs_error']:.3g} = {rec['max_error_over_range']:.2e} of the "
                        f"logit range; greedy agreement {agree}")
            ctx.save()


# --------------------------------------------------------------------------- c: speed
def section_speed(ctx: Ctx) -> None:
    p = ctx.plan
    config = model_config(p)
    bw = copy_bandwidth(ctx)
    ctx.results["copy_bandwidth_gb_s"] = bw / 1e9
    ctx.results["model"] = {"preset": "glm-4-9b" if p.model == "glm-4-9b" else "tiny glm-4-shaped (dry run)",
                            "layers": config.num_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}
    ctx.results["plan"] = {"prefill_tokens": p.prefill_tokens, "decode_prompt": p.decode_prompt,
                           "decode_steps": p.decode_steps, "decode_warmup": p.decode_warmup, "batches": p.batches}
    ctx.log(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    ctx.save()
    recorder = ctx.recorder()
    if recorder is not ctx.backend:
        ctx.skip("CUDA graph capture", "dry run on the CPU: the recorded steps ran through the eager reference "
                 "capture instead (same code path, no device graph)")
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        compute = ctx.model_dtype(dtype)
        rec = ctx.results.setdefault(label, {"compute_dtype": str(compute).replace("torch.", "")})
        rec["ours"] = ctx.attempt(f"ours {label}", lambda: speed_ours(ctx, config, compute, bw, recorder, label)) or {}
        if label == "bf16":
            for bits in (8, 4):
                q = ctx.attempt(f"ours INT{bits}", lambda: speed_ours(ctx, config, compute, bw, recorder,
                                                                      f"INT{bits}", bits))
                if q is not None:
                    rec[f"ours_int{bits}"] = q
                    ctx.save()
        peer = ctx.attempt(f"transformers {label}", lambda: speed_transformers(ctx, config, compute, label))
        if peer is not None:
            rec["transformers"] = peer
        rec["ratios_ours_over_transformers"] = speed_ratios(rec)
        ctx.save()


def speed_ours(ctx: Ctx, config, dtype, bw: float, recorder, label: str, bits: int | None = None) -> dict:
    """Our model at ``dtype`` (layers weight-only at ``bits``): prefill (not for the
    quantized ones), then decode per batch size, plain and recorded."""
    p = ctx.plan
    model = random_model(config, ctx.backend, dtype, ctx.device, bits=bits)
    rec = {"step_bytes": step_bytes(model), "op_report": model.ops.format_report().splitlines()}
    if bits:
        rec["scheme"] = f"INT{bits} weight-only, per-row scales (GLM-130B), lm_head in {dtype}"
    rec["roofline_tokens_per_s_batch1"] = bw / rec["step_bytes"]
    ctx.working(label, rec)
    if not bits:
        r = ctx.attempt(f"ours {label} prefill", lambda: ours_prefill(ctx, model, p.prefill_tokens))
        if r is not None:
            rec["prefill"] = r
            if "error" not in r:
                ctx.log(f"ours {label} prefill {p.prefill_tokens}: {r['tokens_per_s']:.0f} tok/s")
            ctx.save()
    for rows in p.batches[:1] if bits else p.batches:
        for mode in ("generate", "recorded"):
            r = ctx.attempt(f"ours {label} decode batch {rows} {mode}",
                            lambda: public(ours_decode(ctx, model, rows, mode, recorder)))
            if r is None:
                continue
            if rows == 1 and "error" not in r:
                r["roofline_fraction"] = r["tokens_per_s"] / rec["roofline_tokens_per_s_batch1"]
            rec[f"decode_b{rows}_{mode}"] = r
            if "error" not in r:
                ctx.log(f"ours {label} decode batch {rows} {mode}: {r['tokens_per_s']:.1f} tok/s"
                        + (f" ({r['roofline_fraction']:.1%} of the roofline)" if rows == 1 else ""))
            ctx.save()
    del model
    ctx.finished(label)
    ctx.free()
    return rec


def speed_transformers(ctx: Ctx, config, dtype, label: str) -> dict:
    """The peer: transformers' model of the same shape and dtype, prefill and decode."""
    m, facts = hf_model(config, dtype, ctx.device)
    rec = {"facts": facts}
    ctx.working(f"transformers {label}", rec)
    r = ctx.attempt(f"transformers {label} prefill",
                    lambda: hf_prefill(ctx, m, config.vocab_size, ctx.plan.prefill_tokens))
    if r is not None:
        rec["prefill"] = r
        if "error" not in r:
            ctx.log(f"transformers {label} prefill: {r['tokens_per_s']:.0f} tok/s")
        ctx.save()
    for rows in ctx.plan.batches:
        r = ctx.attempt(f"transformers {label} decode batch {rows}", lambda: hf_decode(ctx, m, config.vocab_size, rows))
        if r is not None:
            rec[f"decode_b{rows}"] = r
            if "error" not in r:
                ctx.log(f"transformers {label} decode batch {rows}: {r['tokens_per_s']:.1f} tok/s")
            ctx.save()
    del m
    ctx.finished(f"transformers {label}")
    ctx.free()
    return rec


def speed_ratios(rec: dict) -> dict:
    """Our tokens/s over transformers' for every measurement both sides have."""
    ours, peer, out = rec.get("ours", {}), rec.get("transformers", {}), {}

    def rate(r):
        return r.get("tokens_per_s") if isinstance(r, dict) else None

    if rate(ours.get("prefill")) and rate(peer.get("prefill")):
        out["prefill"] = rate(ours["prefill"]) / rate(peer["prefill"])
    for key, r in ours.items():
        m = re.fullmatch(r"decode_b(\d+)_(\w+)", key)
        if m and rate(r) and rate(peer.get(f"decode_b{m[1]}")):
            out[key] = rate(r) / rate(peer[f"decode_b{m[1]}"])
    return out


# --------------------------------------------------------------------------- d: kernels
def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(N out, K in) of the model's linears."""
    c = config
    return {"qkv": (c.q_size + 2 * c.kv_size, c.hidden_size), "dense": (c.hidden_size, c.q_size),
            "fc1": (2 * c.ffn_hidden_size, c.hidden_size), "fc2": (c.hidden_size, c.ffn_hidden_size),
            "lm_head": (c.vocab_size, c.hidden_size)}


def section_kernels(ctx: Ctx) -> None:
    p, dev = ctx.plan, ctx.device if ctx.backend is ctx.cuda else torch.device("cpu")
    ks = kernels_for(ctx.cuda)
    config = model_config(p)
    sync = ctx.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(3)
    if ctx.dry:
        ctx.notes.append("dry run: Triton kernels under the interpreter on CPU tensors; times are not kernel speeds")

    def timed(fn):
        return median_time(fn, sync, p.warmup, p.iters)

    mm = ctx.results["weight_only_matmul"] = {}
    for name, (N, K) in linear_shapes(config).items():
        rows = ctx.attempt(f"matmul {name}", lambda: matmul_bench(ctx, ks, name, N, K, dev, gen, timed))
        if rows is not None:
            mm.update(rows if "error" not in rows else {name: rows})
            ctx.save()
    ctx.results["attention"] = attention_bench(ctx, ks, config, dev, gen, timed)
    ctx.save()
    ctx.results["elementwise"] = elementwise_bench(ctx, ks, config, dev, gen, timed)
    ctx.save()


def matmul_bench(ctx: Ctx, ks, name: str, N: int, K: int, dev, gen, timed) -> dict:
    """The INT8 and INT4 weight-only kernels against fp16 cuBLAS on one [N, K] weight, per M."""
    dt, fn, out = torch.float16, ks["quantized_linear"].fn, {}
    w = randn((N, K), dt, dev, gen, 0.02)
    quant = {bits: quantize(w, bits) for bits in (8, 4)}
    for M in ctx.plan.kernel_rows:
        x = randn((M, K), dt, dev, gen)
        t_ref = timed(lambda: torch.matmul(x, w.t()))
        row = {"N": N, "K": K, "M": M, "fp16_matmul_us": t_ref * 1e6}
        for bits, (qw, sc) in quant.items():
            t = timed(lambda: fn(x, qw, sc, None, bits))
            row[f"int{bits}_us"] = t * 1e6
            row[f"int{bits}_speedup_vs_fp16"] = t_ref / t
            row[f"int{bits}_weight_gb_s"] = qw.numel() / t / 1e9
            if M == ctx.plan.kernel_rows[0]:  # a sanity check of the result, once per shape
                y = fn(x, qw, sc, None, bits).float()
                ref = reference.quantized_linear(x, qw, sc, None, bits).float()
                row[f"int{bits}_max_rel_error"] = float((y - ref).abs().max() / ref.abs().max())
        out[f"{name}/M{M}"] = row
        ctx.log(f"matmul {name} M={M} [{N}x{K}]: fp16 {t_ref * 1e6:.1f} us, INT8 x{row['int8_speedup_vs_fp16']:.2f}, "
                f"INT4 x{row['int4_speedup_vs_fp16']:.2f}")
    return out


def sdpa(q, k, v, causal: bool):
    """torch's SDPA on the flash kernel when it takes the inputs: GQA natively, else with the
    KV heads expanded (done once, outside the timing). Returns (call, variant)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rep = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    tries = [("flash, enable_gqa", SDPBackend.FLASH_ATTENTION, k, v, {"enable_gqa": True}),
             ("flash, KV heads expanded", SDPBackend.FLASH_ATTENTION, ke, ve, {}),
             ("default backend, KV heads expanded", None, ke, ve, {})]
    for variant, backend, kk, vv, kw in tries:
        def call(kk=kk, vv=vv, kw=kw, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
        try:
            call()
            return call, variant
        except (RuntimeError, TypeError):
            continue
    raise RuntimeError("scaled_dot_product_attention ran in none of its variants")


def attention_bench(ctx: Ctx, ks, config, dev, gen, timed) -> dict:
    p, c = ctx.plan, config
    fn = ks["attention"].fn
    cases = [(f"prefill {T}", 1, T, T, True) for T in p.attn_prefill]
    cases += [(f"decode cache {p.attn_decode_cache} batch {b}", b, 1, p.attn_decode_cache, False) for b in p.batches]
    out = {}
    for label, B, Tq, Tk, causal in cases:
        r = ctx.attempt(f"attention {label}", lambda: attention_case(ctx, fn, c, B, Tq, Tk, causal, dev, gen, timed))
        if r is not None:
            out[label] = r
            if "error" not in r:
                ctx.log(f"attention {label}: Triton {r['triton_us']:.0f} us, SDPA ({r['sdpa_variant']}) "
                        f"{r['sdpa_us']:.0f} us, x{r['triton_speed_vs_sdpa']:.2f}")
    return out


def attention_case(ctx: Ctx, fn, c, B: int, Tq: int, Tk: int, causal: bool, dev, gen, timed) -> dict:
    dt = torch.float16
    scale = 1 / math.sqrt(c.head_dim)
    q = randn((B, c.num_heads, Tq, c.head_dim), dt, dev, gen)
    k = randn((B, c.num_kv_heads, Tk, c.head_dim), dt, dev, gen)
    v = randn((B, c.num_kv_heads, Tk, c.head_dim), dt, dev, gen)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=dev).tril()[None, None] if causal else None
    ref, variant = sdpa(q, k, v, causal)
    t_ours = timed(lambda: fn(q, k, v, mask, scale, None, 1.0))
    t_ref = timed(ref)
    err = float((fn(q, k, v, mask, scale, None, 1.0).float() - ref().float()).abs().max())
    flops = 4 * B * c.num_heads * Tq * Tk * c.head_dim / (2 if causal else 1)
    return {"B": B, "Tq": Tq, "Tk": Tk, "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "triton_us": t_ours * 1e6, "sdpa_us": t_ref * 1e6, "sdpa_variant": variant,
            "triton_speed_vs_sdpa": t_ref / t_ours, "triton_tflop_s": flops / t_ours / 1e12,
            "max_abs_difference": err}


def elementwise_bench(ctx: Ctx, ks, config, dev, gen, timed) -> dict:
    """Norms, rotary and activations against torch eager (torch's own functional op where
    one exists, else the contract's reference in plain torch ops)."""
    c, n, dt = config, ctx.plan.elementwise_rows, torch.float16
    x = randn((n, c.hidden_size), dt, dev, gen)
    wgt, bias = randn((c.hidden_size,), dt, dev, gen, 0.1) + 1, randn((c.hidden_size,), dt, dev, gen, 0.1)
    u = randn((n, 2 * c.ffn_hidden_size), dt, dev, gen)
    h = randn((n, c.ffn_hidden_size), dt, dev, gen)
    q = randn((1, n, c.num_heads, c.head_dim), dt, dev, gen).transpose(1, 2)  # the graph's transposed view
    ang = torch.arange(n, device=dev).float()[:, None] / (10000 ** (torch.arange(c.rope_dim // 2, device=dev) /
                                                                   (c.rope_dim // 2)))
    cos, sin = ang.cos()[None].to(dt), ang.sin()[None].to(dt)
    eps = 1e-5
    cases = {
        "rms_norm": (lambda: ks["rms_norm"].fn(x, wgt, eps), lambda: F.rms_norm(x, (c.hidden_size,), wgt, eps),
                     "F.rms_norm", 2 * x.numel()),
        "layer_norm": (lambda: ks["layer_norm"].fn(x, wgt, bias, eps),
                       lambda: F.layer_norm(x, (c.hidden_size,), wgt, bias, eps), "F.layer_norm", 2 * x.numel()),
        "rotary interleaved": (lambda: ks["rotary"].fn(q, cos, sin, "interleaved"),
                               lambda: reference.rotary(q, cos, sin, "interleaved"), "reference (torch ops)",
                               2 * q.numel()),
        "glu swiglu": (lambda: ks["glu"].fn(u, "swiglu"), lambda: F.silu(u[:, :c.ffn_hidden_size]) *
                       u[:, c.ffn_hidden_size:], "F.silu(a) * b", 1.5 * u.numel()),
        "gelu_tanh": (lambda: ks["gelu_tanh"].fn(h), lambda: F.gelu(h, approximate="tanh"), "F.gelu(tanh)",
                      2 * h.numel()),
    }
    out = {}
    for name, (ours, eager, what, elems) in cases.items():
        def measure(ours=ours, eager=eager, what=what, elems=elems):
            t_ours, t_eager = timed(ours), timed(eager)
            err = float((ours().float() - eager().float()).abs().max())
            return {"rows": n, "triton_us": t_ours * 1e6, "eager_us": t_eager * 1e6, "eager": what,
                    "triton_speed_vs_eager": t_eager / t_ours, "triton_gb_s": elems * 2 / t_ours / 1e9,
                    "max_abs_difference": err}
        r = ctx.attempt(name, measure)
        if r is not None:
            out[name] = r
            if "error" not in r:
                ctx.log(f"{name} [{n} rows]: Triton {r['triton_us']:.1f} us, eager {r['eager_us']:.1f} us, "
                        f"x{r['triton_speed_vs_eager']:.2f}")
    return out


# --------------------------------------------------------------------------- e: graphs
def section_graphs(ctx: Ctx) -> None:
    p = ctx.plan
    config = model_config(p)
    dtype = ctx.model_dtype(torch.bfloat16)
    recorder = ctx.recorder()
    if recorder is not ctx.backend:
        ctx.skip("CUDA graph capture", "dry run on the CPU: the steps were recorded by the eager reference capture "
                 "(inputs copied into static buffers, warm-up runs, outputs reused), not by a device graph")
    ctx.results["dtype"] = str(dtype).replace("torch.", "")
    model = random_model(config, ctx.backend, dtype, ctx.device)
    for rows in p.batches:
        rec = ctx.attempt(f"batch {rows}", lambda: graphs_batch(ctx, model, rows, recorder))
        if rec is not None:
            ctx.results[f"batch {rows}"] = rec
            ctx.save()


def graphs_batch(ctx: Ctx, model, rows: int, recorder) -> dict:
    """The same greedy decode three ways: recorded fixed-shape steps, plain fixed-shape
    steps, and generate's own steps."""
    runs = {}
    for mode in ("fixed", "recorded", "generate"):
        runs[mode] = ours_decode(ctx, model, rows, mode, recorder)
    rec = {mode: public(r) for mode, r in runs.items()}
    rec["recording_happened"] = runs["recorded"]["recorded_rows"] == [rows]
    rec["tokens_identical_recorded_vs_fixed"] = torch.equal(runs["recorded"]["tokens"], runs["fixed"]["tokens"])
    rec["tokens_identical_fixed_vs_generate"] = torch.equal(runs["fixed"]["tokens"], runs["generate"]["tokens"])
    rec["speedup_recorded_over_fixed"] = runs["recorded"]["tokens_per_s"] / runs["fixed"]["tokens_per_s"]
    rec["speedup_recorded_over_generate"] = runs["recorded"]["tokens_per_s"] / runs["generate"]["tokens_per_s"]
    ctx.log(f"batch {rows}: recorded {runs['recorded']['tokens_per_s']:.1f} tok/s, fixed "
            f"{runs['fixed']['tokens_per_s']:.1f}, generate {runs['generate']['tokens_per_s']:.1f}; tokens "
            f"identical: {rec['tokens_identical_recorded_vs_fixed']}")
    return rec


SECTIONS = {"conformance": section_conformance, "parity": section_parity, "speed": section_speed,
            "kernels": section_kernels, "graphs": section_graphs}


# --------------------------------------------------------------------------- the run
def environment(dry: bool) -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = CUDABackend()
    probe = cuda.probe()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": version("triton"), "transformers": version("transformers"),
           "glm_runtime": version("glm-runtime"), "commit": git_commit(),
           # False: the glm-runtime installed here is a copy (a wheel), and the figures are that copy's
           "glm_runtime_is_this_tree": Path(sys.modules["glm_runtime.core"].__file__).resolve().is_relative_to(ROOT),
           "cuda_backend": {"available": probe.available, "reason": probe.reason},
           "target": "cuda" if probe.available else "cpu standing in for cuda (dry run)",
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    env["driver"] = [c.detail for c in cuda.driver_checks()]
    if probe.available:
        try:
            env["devices"] = cuda.capabilities().extra["devices"]
        except Exception as e:  # noqa: BLE001 - the sections will say more
            env["devices"] = one_line(e)
    return env


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_section(name: str, out: Path, budget: float, dry: bool) -> dict:
    """One section in a process of its own, killed at its budget; its saved results are kept."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out), "--budget",
           str(budget)] + (["--dry-run"] if dry else [])
    path = out / "sections" / f"{name}.json"
    path.unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(out / "sections" / f"{name}.out", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    rec = json.loads(path.read_text()) if path.is_file() else {"results": {}, "skipped": [], "notes": []}
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["budget_s"] = budget
    if rc is None:
        rec["status"], rec["reason"] = "timeout", f"killed at its budget of {budget:.0f} s (results so far kept)"
    elif rec.get("status") in (None, "running"):
        tail = (out / "sections" / f"{name}.out").read_text().strip().splitlines()[-1:] or ["no output"]
        rec["status"], rec["reason"] = "crashed", f"exit {rc}: {tail[0][:300]}"
    return rec


def goals(sections: dict, dry: bool) -> dict:
    """The issue's goals against this run's figures (None: not measured)."""
    def get(*keys):
        node = sections
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def goal(target, measured, met):
        return {"target": target, "measured": measured, "met": None if measured is None else met(measured)}

    kit = get("conformance", "results") or {}
    fails = [sum(r.get(k, 0) for k in ("failed", "errors")) for r in kit.values()] if kit else None
    parity = get("parity", "results") or {}
    roof = get("speed", "results", "bf16", "ours", "decode_b1_recorded", "roofline_fraction")
    vs_hf = get("speed", "results", "bf16", "ratios_ours_over_transformers", "decode_b1_recorded")
    int4 = get("speed", "results", "bf16", "ours_int4", "decode_b1_recorded", "tokens_per_s")
    bf16 = get("speed", "results", "bf16", "ours", "decode_b1_recorded", "tokens_per_s")
    attn = get("kernels", "results", "attention") or {}
    prefill_attn = [r["triton_speed_vs_sdpa"] for k, r in attn.items() if k.startswith("prefill")]
    out = {
        "conformance_all_pass": goal("every op within the contract, every dtype",
                                     None if not kit else sum(fails), lambda n: n == 0 and len(kit) == 3),
        "parity_all_families": goal("logits within the bound, greedy tokens agree but at near-ties",
                                    None if not parity else sum(bool(r.get("ok")) for r in parity.values()),
                                    lambda n: n == len(FAMILIES) * len(HALF)),
        "decode_b1_bf16_roofline": goal(">= 0.70 of the roofline with recorded steps", roof, lambda v: v >= 0.70),
        "decode_b1_bf16_vs_transformers": goal(">= 1.5x transformers", vs_hf, lambda v: v >= 1.5),
        "int4_decode_faster_than_bf16": goal("INT4 batch-1 decode faster than bf16",
                                             None if int4 is None or bf16 is None else int4 / bf16, lambda v: v > 1.0),
        "attention_prefill_vs_sdpa": goal(">= 0.8x SDPA flash at prefill",
                                          min(prefill_attn) if prefill_attn else None, lambda v: v >= 0.8),
    }
    if dry:
        out["note"] = "dry run: CPU figures, the goals' verdicts mean nothing here"
    return out


def orchestrate(args) -> int:
    out = Path(args.out)
    (out / "sections").mkdir(parents=True, exist_ok=True)
    (out / "check.log").write_text("")
    names = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    if not args.dry_run and not env["cuda_backend"]["available"]:
        print(f"the cuda backend is unavailable here ({env['cuda_backend']['reason']}); "
              f"run with --dry-run for the CPU dry run", file=sys.stderr)
        return 2
    started = time.monotonic()
    doc = {"check": "issue 14: the cuda backend on an NVIDIA GPU", "schema": SCHEMA, "dry_run": args.dry_run,
           "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": env,
           "plan": asdict(DRY_PLAN if args.dry_run else GPU_PLAN), "budgets_s": {n: BUDGETS[n] for n in names},
           "sections": {}}
    if args.dry_run:
        doc["dry_run_note"] = DRY_NOTE
    with open(out / "check.log", "a") as f:
        f.write(f"gpu check{' (DRY RUN)' if args.dry_run else ''}: target {env['target']}, sections "
                f"{', '.join(names)}\n")
    for name in names:
        rec = run_section(name, out, BUDGETS[name], args.dry_run)
        doc["sections"][name] = rec
        doc["wall_s"] = round(time.monotonic() - started, 1)
        doc["goals"] = goals(doc["sections"], args.dry_run)
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        line = f"{name}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['reason']})" if rec.get("reason") else "")
        print(line, flush=True)
        with open(out / "check.log", "a") as f:
            f.write(line + "\n")
    bad = [n for n, r in doc["sections"].items() if r["status"] != "ok"]
    print(f"results: {out / 'results.json'}; {len(names) - len(bad)}/{len(names)} sections ran"
          + (f"; not ok: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


def section_main(args) -> int:
    out = Path(args.out)
    ctx = None
    try:
        ctx = Ctx(args.section, out, args.budget, args.dry_run)
        ctx.save()
        ctx.log("started" + (" (dry run)" if args.dry_run else ""))
        with torch.inference_mode():
            SECTIONS[args.section](ctx)
        ctx.status = "ok"
    except Exception as e:  # noqa: BLE001 - recorded with its one-line reason; the run goes on
        if ctx is None:
            ctx = Ctx.__new__(Ctx)
            ctx.name, ctx.out, ctx.t0 = args.section, out, time.monotonic()
            ctx.results, ctx.skipped, ctx.notes = {}, [], []
        ctx.status, ctx.reason = "error", one_line(e)
        traceback.print_exc()
        ctx.log(f"error: {ctx.reason}")
    ctx.save()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json and check.log")
    ap.add_argument("--dry-run", action="store_true", help="the CPU dry run: tiny shapes, interpreter, cpu backend")
    ap.add_argument("--only", help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    ap.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)  # one section's process
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return section_main(args) if args.section else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
