"""Chat prompt formats of the GLM chat models, as token ids, with their stop tokens.

* ChatGLM-6B: text ``[Round 0]\\n问：{q0}\\n答：{r0}\\n[Round 1]\\n问：{q}\\n答：`` (0-based rounds,
  single newlines; no history: just the query), then ``[gMASK] <sop>``; stops at ``<eop>``.
* ChatGLM2-6B: ``[gMASK] sop`` then ``[Round 1]\\n\\n问：{q1}\\n\\n答：{r1}\\n\\n[Round 2]\\n\\n问：{q}\\n\\n答：``
  (1-based rounds, double newlines, the header even without history); stops at eos.
* ChatGLM3-6B: ``[gMASK] sop``, per message ``<|role|>`` + encode(metadata + "\\n") +
  encode(content) (two separate sentencepiece calls, as its tokenizer does), then
  ``<|assistant|>``; stops at eos, ``<|user|>``, ``<|observation|>``.
* GLM-4: ``[gMASK]<sop>`` then ``<|role|>{metadata}\\n{content}`` per message, then
  ``<|assistant|>``; stops at ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``.

Messages are ``{"role": "system"|"user"|"assistant"|"observation", "content": str,
"metadata": str (optional)}``.
"""
from __future__ import annotations

from .config import GLMConfig
from .errors import GLMError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "observation")


def chat_format(config: GLMConfig) -> str:
    f = config.family
    for name in ("chatglm-6b", "chatglm2", "chatglm3", "glm-4"):
        if f.startswith(name):
            return name
    raise GLMError(f"{f} has no chat format (a base model: use generate with a plain or [MASK] prompt)")


def _check(messages: list[dict]):
    if not messages or messages[-1].get("role") != "user" and messages[-1].get("role") != "observation":
        raise GLMError("the last chat message must be from the user (or a tool observation)")
    for m in messages:
        if m.get("role") not in ROLES:
            raise GLMError(f"unknown chat role {m.get('role')!r}; expected one of {', '.join(ROLES)}")


def _rounds(messages: list[dict]) -> tuple[list[tuple[str, str]], str]:
    """(history of (query, response), query) for the round-based formats (no system role)."""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    if any(m["role"] in ("system", "observation") for m in messages):
        raise GLMError("ChatGLM-6B/ChatGLM2-6B prompts have no system or observation role")
    hist = []
    for i in range(0, len(turns) - 1, 2):
        if turns[i]["role"] != "user" or turns[i + 1]["role"] != "assistant":
            raise GLMError("ChatGLM-6B/ChatGLM2-6B history must alternate user and assistant")
        hist.append((turns[i]["content"], turns[i + 1]["content"]))
    return hist, turns[-1]["content"]


def build_chat_ids(config: GLMConfig, tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for ``messages`` in the model family's format (the assistant's turn next)."""
    _check(messages)
    fmt = chat_format(config)
    gmask, sop = tok.special["gmask"], tok.special["sop"]
    if fmt == "chatglm-6b":
        hist, q = _rounds(messages)
        if not hist:
            text = q
        else:
            text = "".join(f"[Round {i}]\n问：{a}\n答：{b}\n" for i, (a, b) in enumerate(hist))
            text += f"[Round {len(hist)}]\n问：{q}\n答："
        return tok.encode_text(text) + [gmask, sop]
    if fmt == "chatglm2":
        hist, q = _rounds(messages)
        text = "".join(f"[Round {i}]\n\n问：{a}\n\n答：{b}\n\n" for i, (a, b) in enumerate(hist, 1))
        text += f"[Round {len(hist) + 1}]\n\n问：{q}\n\n答："
        return [gmask, sop] + tok.encode_text(text)
    ids = [gmask, sop]
    for m in messages:
        role = tok.markers[f"<|{m['role']}|>"]
        meta = m.get("metadata", "")
        if fmt == "chatglm3":
            ids += [role] + tok.encode_text(f"{meta}\n") + tok.encode_text(m["content"])
        else:  # glm-4: one string per message
            ids += [role] + tok.encode_text(f"{meta}\n{m['content']}")
    return ids + [tok.markers["<|assistant|>"]]


def stop_ids(config: GLMConfig, tok: Tokenizer) -> list[int]:
    fmt = chat_format(config)
    if fmt == "chatglm-6b":
        return [tok.special["eop"]]
    if fmt == "chatglm2":
        return [tok.eos_id if tok.eos_id is not None else 2]
    end = tok.markers.get("<|endoftext|>", tok.eos_id)
    return [end, tok.markers["<|user|>"], tok.markers["<|observation|>"]]
