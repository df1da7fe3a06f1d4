"""GLM-130B SAT checkpoints (SwissArmyTransformer / DeepSpeed layout) <-> native.

A SAT directory holds ``latest`` (a text file naming the iteration) and
``<iteration>/mp_rank_XX_model_states.pt``, one torch pickle per tensor-parallel rank with
the rank's state dict under ``"module"``. The split of each key is GLM-130B's
``tools/convert_tp.py``, which is our own tensor-parallel layout
(:mod:`glm_runtime.core.sharding` does both):

=====================================  =============================================
word_embeddings.weight                 rows (vocab-parallel), V/T each
attention.query_key_value.{w,b}        rows, contiguous: nh/T whole heads each (the
                                       rows are per-head interleaved [q_h; k_h; v_h],
                                       so no Q/K/V reordering is needed)
attention.dense.weight                 columns (row-parallel); its bias replicated
mlp.dense_h_to_4h.{w,b}                GLU-aware rows: rank r holds the r-th slice of
                                       the first (value) half over the r-th slice of
                                       the second (gate) half; plain rows without GLU
mlp.dense_4h_to_h.weight               columns; its bias replicated
layernorms                             replicated
=====================================  =============================================

A SAT checkpoint carries no config: the model is described by the SAT command-line
arguments it was trained with (``--num-layers 70 --hidden-size 12288 ...``), which
:func:`config_from_sat_args` accepts verbatim, or by a preset name. The graph is
GLM-130B's; rotary frequencies are rounded to fp16 as in SAT 0.2.x, the version
GLM-130B pins.

Quantized SAT checkpoints (``--quantization-bit-width``) are quantized *after* the TP
split, so a row-parallel weight has one scale per rank slice: they load only at TP 1
(merging would need one scale per row) — re-quantize from fp16 instead.
Pickles are read with ``weights_only=True``: nothing in a file can run code.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
from pathlib import Path

import torch
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError, GLMError
from glm_runtime.core.model import parameter_shapes
from glm_runtime.core.presets import PRESETS, preset
from glm_runtime.core.schema import arg_type, integer, rule_of
from glm_runtime.core.sharding import shard, split_kind, unshard

from .native import atomic_dir
from .tensor_io import read_pickle

log = logging.getLogger("glm_runtime.converters.sat")
_RANK_RE = re.compile(r"^mp_rank_(\d\d)_model_states\.pt$")
QUANT_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def rank_file(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


# ------------------------------------------------------------------------- detection
def _iteration_dir(path: Path) -> Path | None:
    latest = path / "latest"
    if latest.is_file():
        it = latest.read_text().strip()
        return path / it
    return None


def is_sat(path: Path) -> bool:
    d = _iteration_dir(path)
    if d is not None:
        return True
    return any(_RANK_RE.match(f.name) for f in path.glob("*/mp_rank_*_model_states.pt"))


def rank_files(path: Path, expected: int | None = None) -> list[Path]:
    """The rank files of the checkpoint, 00..T-1 without gaps (else a CheckpointError
    naming the first missing file)."""
    d = _iteration_dir(path)
    if d is None:
        dirs = sorted({f.parent for f in path.glob("*/mp_rank_*_model_states.pt")})
        if len(dirs) != 1:
            raise CheckpointError("no 'latest' file and not exactly one iteration directory with rank files", path)
        d = dirs[0]
    if not d.is_dir():
        raise CheckpointError(f"'latest' names iteration {d.name!r}, but that directory does not exist", d)
    ranks = sorted(int(m.group(1)) for f in d.iterdir() if (m := _RANK_RE.match(f.name)))
    if not ranks:
        raise CheckpointError("no mp_rank_XX_model_states.pt files", d)
    total = max(max(ranks) + 1, expected or 0)
    missing = [r for r in range(total) if r not in ranks]
    if missing:
        raise CheckpointError(f"tensor-parallel rank file missing: {rank_file(missing[0])} "
                              f"(found {len(ranks)} of {total} ranks)", d / rank_file(missing[0]))
    return [d / rank_file(r) for r in range(total)]


# ---------------------------------------------------------------------------- config
def _sat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sat-args", add_help=False, exit_on_error=False)
    for name, field in (("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"),
                        ("--inner-hidden-size", "ffn_hidden_size"), ("--vocab-size", "vocab_size"),
                        ("--num-attention-heads", "num_heads"), ("--max-sequence-length", "max_position_embeddings"),
                        ("--hidden-size-per-attention-head", "head_dim"), ("--layernorm-epsilon", "norm_eps"),
                        ("--quantization-bit-width", "quantization_bits")):
        p.add_argument(name, type=arg_type(rule_of(GLMConfig, field)))  # checked as the field it becomes
    p.add_argument("--model-parallel-size", type=arg_type(integer(1, 4096)))
    p.add_argument("--layernorm-order", default="pre")
    p.add_argument("--position-encoding-2d", action="store_true")
    p.add_argument("--no-glu", action="store_true")
    p.add_argument("--from-quantized-checkpoint", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    return p


def config_from_sat_args(sat_args: str) -> tuple[GLMConfig, dict]:
    """(GLMConfig, extra) from SAT command-line arguments or a preset name.

    ``extra`` holds what is not architecture: the TP degree the arguments name, if any.
    Unknown arguments (``--load``, ``--tokenizer-type``, ``--skip-init`` ...) are ignored.
    """
    text = (sat_args or "").strip()
    if not text:
        raise GLMError("a SAT checkpoint carries no config: give its SAT model arguments (--sat-args "
                       "'--num-layers 70 --hidden-size 12288 ...') or a preset name")
    if text in PRESETS:
        c = preset(text)
        if c.qkv_layout != "per_head" or c.residual != "deepnorm":
            raise GLMError(f"preset {text!r} is not a GLM-130B-style model; SAT checkpoints are GLM-130B's")
        return c.replace(rope_fp16=True), {}
    try:
        args, unknown = _sat_parser().parse_known_args(shlex.split(text.replace("\\\n", " ")))
    except (argparse.ArgumentError, ValueError) as e:
        raise GLMError(f"bad SAT arguments: {e}") from None
    if unknown:
        log.info("ignoring SAT arguments that do not describe the model: %s", " ".join(unknown))
    need = [n for n in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads") if getattr(args, n) is None]
    if need:
        raise GLMError("SAT arguments lack " + ", ".join("--" + n.replace("_", "-") for n in need))
    if args.layernorm_order != "post":
        raise GLMError(f"--layernorm-order {args.layernorm_order} is not GLM-130B's (post); only the GLM-130B "
                       "SAT model is supported")
    if args.position_encoding_2d or args.no_glu:
        raise GLMError("--position-encoding-2d / --no-glu (SAT's ChatGLM-6B port) are not supported: its QKV row "
                       "order changed between SAT versions; convert ChatGLM-6B from the THUDM files instead")
    h, nh = args.hidden_size, args.num_attention_heads
    d = args.hidden_size_per_attention_head or h // nh
    c = preset("glm-130b", vocab_size=args.vocab_size, hidden_size=h, num_layers=args.num_layers, num_heads=nh,
               num_kv_heads=nh, head_dim=d, rope_dim=d, ffn_hidden_size=args.inner_hidden_size or 4 * h,
               max_position_embeddings=args.max_sequence_length or 2048,
               norm_eps=args.layernorm_epsilon or 1e-5, rope_fp16=True,
               torch_dtype="bfloat16" if args.bf16 else "float16",
               quantization_bits=args.quantization_bit_width if args.from_quantized_checkpoint else None)
    return c, {"tp": args.model_parallel_size}


def _sat_keys(c: GLMConfig) -> list[tuple[str, str]]:
    pairs = [("transformer.word_embeddings.weight", "embed.weight"),
             ("transformer.final_layernorm.weight", "final_norm.weight"),
             ("transformer.final_layernorm.bias", "final_norm.bias")]
    layer = [("input_layernorm", "input_norm"), ("attention.query_key_value", "attn.qkv"),
             ("attention.dense", "attn.dense"), ("post_attention_layernorm", "mlp_norm"),
             ("mlp.dense_h_to_4h", "mlp.fc1"), ("mlp.dense_4h_to_h", "mlp.fc2")]
    for i in range(c.num_layers):
        for a, b in layer:
            quant = c.quantization_bits and a in QUANT_LINEARS
            pairs.append((f"transformer.layers.{i}.{a}.weight", f"layers.{i}.{b}.{'qweight' if quant else 'weight'}"))
            if quant:
                pairs.append((f"transformer.layers.{i}.{a}.weight_scale", f"layers.{i}.{b}.scale"))
            pairs.append((f"transformer.layers.{i}.{a}.bias", f"layers.{i}.{b}.bias"))
    return pairs


def _check_config(c: GLMConfig):
    want = dict(norm="layernorm", residual="deepnorm", qkv_layout="per_head", activation="geglu", rope="neox",
                tie_word_embeddings=True, qkv_bias=True, dense_bias=True, mlp_bias=True, sandwich_norm=False)
    bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
    if bad:
        raise CheckpointError(f"a {c.family} model has no GLM-130B SAT layout ({', '.join(bad)})")


# ------------------------------------------------------------------------------ read
def read(path: str | os.PathLike, sat_args: str | None = None,
         progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    c, extra = config_from_sat_args(sat_args)
    files = rank_files(path, extra.get("tp"))
    tp = len(files)
    ranks = []
    for f in tqdm(files, desc="read SAT ranks", disable=not progress, unit="rank"):
        obj = read_pickle(f)
        module = obj.get("module") if isinstance(obj, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError("expected a dict with the rank's state dict under 'module'", f)
        ranks.append(module)
    for r, m in enumerate(ranks):
        for k in [k for k in m if k.endswith("rotary_emb.inv_freq")]:
            m.pop(k)  # recomputed, as SAT does on load
        if "transformer.layers.0.attention.query_key_value.weight" not in m:
            hint = " (these are ChatGLM2/3/GLM-4 weights)" if any(k.startswith("transformer.encoder.") for k in m) \
                else " (these are transformers weights)" if any(k.startswith("model.") for k in m) else ""
            raise CheckpointError(f"not a GLM-130B SAT rank: no transformer.layers.0.attention.query_key_value"
                                  f"{hint}", files[r])
    if c.quantization_bits and tp > 1:
        raise CheckpointError("quantized SAT checkpoints are tensor-parallel specific (row-parallel layers have one "
                              "scale per rank slice): only TP 1 can be read; re-quantize from fp16", path)
    shapes = parameter_shapes(c)
    out = {}
    for a, b in _sat_keys(c):
        parts = []
        for r, m in enumerate(ranks):
            if a not in m:
                raise CheckpointError(f"rank state lacks {a!r} (incomplete checkpoint, or sat-args describe another "
                                      f"model)", files[r])
            parts.append(m.pop(a))
            if b != "embed.weight":  # its row count is checked below, with what that count means
                want = tuple(shard(b, torch.empty(shapes[b][0], device="meta"), c, tp, r).shape)
                if tuple(parts[-1].shape) != want:
                    raise CheckpointError(f"{a} has shape {list(parts[-1].shape)}; the SAT arguments give "
                                          f"{list(want)} per rank", files[r])
        if split_kind(b)[0] == "replicated" and any(not torch.equal(p, parts[0]) for p in parts[1:]):
            raise CheckpointError(f"{a} should be replicated across ranks but differs", files[0].parent)
        rows = sum(p.shape[0] for p in parts)
        if b == "embed.weight" and rows != c.vocab_size:
            raise CheckpointError(f"the {tp} rank file(s) hold {rows} vocabulary rows, the SAT arguments say "
                                  f"--vocab-size {c.vocab_size}: a rank file is missing (give --model-parallel-size) "
                                  f"or the arguments are wrong", files[0].parent)
        t = unshard(b, parts, c, tp)
        if b.endswith(".scale"):
            t = t.to(torch.float16)
        out[b] = t
    for r, m in enumerate(ranks):
        if m:
            raise CheckpointError(f"unexpected key {sorted(m)[0]!r}{f' and {len(m) - 1} more' if len(m) > 1 else ''}"
                                  f" for the model the sat-args describe", files[r])
    return c, out


# ----------------------------------------------------------------------------- write
def shard_state(c: GLMConfig, state: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """Native state -> ``tp`` SAT rank state dicts."""
    _check_config(c)
    if c.quantization_bits and tp > 1:
        raise CheckpointError("a quantized model can only be written as SAT at TP 1 (GLM-130B quantizes after the "
                              "split); write the fp16 model and quantize per rank")
    for n, what in ((c.vocab_size, "vocab_size"), (c.num_heads, "num_heads"), (c.ffn_hidden_size, "ffn_hidden_size"),
                    (c.hidden_size, "hidden_size")):
        if n % tp:
            raise GLMError(f"--tp {tp} does not divide {what}={n}")
    return [{a: shard(b, state[b], c, tp, r) for a, b in _sat_keys(c)} for r in range(tp)]


def write(dst: str | os.PathLike, c: GLMConfig, state: dict[str, torch.Tensor], tp: int = 1,
          iteration: str = "1", overwrite: bool = False, progress: bool = False) -> Path:
    """Write ``latest`` + ``<iteration>/mp_rank_XX_model_states.pt`` for ``tp`` ranks."""
    ranks = shard_state(c, state, tp)
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "latest").write_text(f"{iteration}\n")
        (tmp / iteration).mkdir()
        for r, sd in enumerate(tqdm(ranks, desc="write SAT ranks", disable=not progress, unit="rank")):
            torch.save({"module": sd}, tmp / iteration / rank_file(r))
    return Path(dst)


def sat_args_for(c: GLMConfig, tp: int) -> str:
    """The SAT arguments that describe ``c`` (printed after a conversion: SAT files need them)."""
    s = (f"--model-parallel-size {tp} --num-layers {c.num_layers} --hidden-size {c.hidden_size} "
         f"--inner-hidden-size {c.ffn_hidden_size} --vocab-size {c.vocab_size} "
         f"--num-attention-heads {c.num_heads} --max-sequence-length {c.max_position_embeddings} "
         f"--layernorm-order post --layernorm-epsilon {c.norm_eps}")
    if c.head_dim * c.num_heads != c.hidden_size:
        s += f" --hidden-size-per-attention-head {c.head_dim}"
    if c.quantization_bits:
        s += f" --quantization-bit-width {c.quantization_bits} --from-quantized-checkpoint"
    return s
