"""GLM-130B's measures for stable training that live outside the optimiser.

* DeepNorm initialisation (GLM-130B paper, after DeepNet): Xavier-normal weights, scaled
  by ``beta = (2N)^(-1/2)`` (N = layers) for the FFN, the value projection and the
  attention output projection; biases zero, norms one. The post-LN residual scaling
  ``alpha = sqrt(2N)`` is part of the graph itself (GLMConfig.residual = "deepnorm").
* Embedding gradient shrink: the word embedding's output becomes
  ``e * a + e.detach() * (1 - a)``: the same value forward, ``a`` times the gradient
  backward (paper: a = 0.1). It is installed into the model's op table, so it applies to
  the input embedding only, not to the tied output projection.
"""
from __future__ import annotations

import math

import torch

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.model import parameter_shapes


def _xavier(shape, gain: float, g: torch.Generator) -> torch.Tensor:
    fan_out, fan_in = shape
    return torch.randn(shape, generator=g) * (gain * math.sqrt(2.0 / (fan_in + fan_out)))


def deepnorm_state(config: GLMConfig, seed: int = 0, embed_std: float = 0.02) -> dict[str, torch.Tensor]:
    """Initial weights of ``config`` (fp32). Non-DeepNorm configs get beta = 1 (plain Xavier)."""
    c = config
    n = c.deepnorm_layers or c.num_layers  # N as in alpha = sqrt(2N)
    beta = (2.0 * n) ** -0.5 if c.residual == "deepnorm" else 1.0
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, _) in sorted(parameter_shapes(c).items()):
        if k.endswith("norm.weight"):
            out[k] = torch.ones(shape)
        elif k.endswith(".bias"):
            out[k] = torch.zeros(shape)
        elif k in ("embed.weight", "lm_head.weight"):
            out[k] = torch.randn(shape, generator=g) * embed_std
        elif k.endswith("attn.qkv.weight"):
            out[k] = _qkv(c, beta, g)
        elif k.endswith(("attn.dense.weight", "mlp.fc1.weight", "mlp.fc2.weight")):
            out[k] = _xavier(shape, beta, g)
        else:
            raise KeyError(f"no initialisation rule for {k}")
    return out


def _qkv(c: GLMConfig, beta: float, g: torch.Generator) -> torch.Tensor:
    """Fused QKV: Q and K with gain 1, V with gain beta, each as its own [out, H] matrix,
    then laid out as the config's qkv_layout."""
    H = c.hidden_size
    q = _xavier((c.q_size, H), 1.0, g)
    k = _xavier((c.kv_size, H), 1.0, g)
    v = _xavier((c.kv_size, H), beta, g)
    if c.qkv_layout == "per_head":
        d = c.head_dim
        return torch.cat([q.view(c.num_heads, d, H), k.view(c.num_heads, d, H), v.view(c.num_heads, d, H)],
                         dim=1).reshape(-1, H)
    return torch.cat((q, k, v), 0)


def shrink_embedding_gradient(ops, alpha: float) -> None:
    """Wrap ``ops.embedding`` so the embedding's gradient is multiplied by ``alpha``."""
    if alpha == 1.0:
        return
    inner = ops.embedding

    def embedding(ids, weight):
        e = inner(ids, weight)
        return e * alpha + e.detach() * (1.0 - alpha)

    ops.embedding = embedding
