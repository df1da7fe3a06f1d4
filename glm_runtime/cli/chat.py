"""``glmrt chat``: an interactive chat in the terminal, on the serving engine.

Each turn is one engine request with the whole conversation as the prompt (the family's
chat format), streamed as it decodes. ``/reset`` starts a new conversation, ``/exit`` (or
end of input) leaves.
"""
from __future__ import annotations

import queue
import sys

from glm_runtime.core.chat import build_chat_ids, stop_ids
from glm_runtime.core.errors import GLMError
from glm_runtime.core.schema import arg_type, number
from glm_runtime.serving.engine import Request, Sampling
from glm_runtime.serving.load import EngineOptions, open_model, served

from .common import add_backend_args
from .generate import MAX_NEW_TOKENS, SEED, TOP_P

NAME = "chat"
HELP = "chat with a chat model in the terminal (streaming; /reset, /exit)"
EXAMPLE = "glmrt chat ./glm-4-9b-chat --system 'You are concise.'"
TEMPERATURE = arg_type(number(0, 2))  # 0: greedy


def add_arguments(p):
    p.add_argument("model", help="checkpoint directory of a chat model (ChatGLM-6B, ChatGLM2/3, GLM-4)")
    p.add_argument("--system", help="a system prompt (ChatGLM3, GLM-4)")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS, default=512)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=TOP_P, default=0.8)
    p.add_argument("--seed", type=SEED, default=None)
    add_backend_args(p)


def run(args) -> int:
    s = served(open_model(args.model, args.backend, strict_ops=args.strict_ops), None,
               EngineOptions(max_num_seqs=1))
    if s.chat is None or s.tokenizer is None:
        raise GLMError("a base model without a chat format or tokenizer: use glmrt generate", args.model)
    s.engine.start()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    sampling = Sampling(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, stop_ids=frozenset(stop_ids(s.config, s.tokenizer)))
    print(f"chatting with {s.name} ({s.chat} format); /reset starts over, /exit leaves", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                print("(new conversation)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = turn(s, build_chat_ids(s.config, s.tokenizer, history), sampling)
            history.append({"role": "assistant", "content": reply})
    finally:
        s.engine.stop()
    return 0


def turn(s, prompt: list[int], sampling: Sampling) -> str:
    """One reply, printed as it decodes; returns its text."""
    events: queue.Queue = queue.Queue()
    s.engine.submit(Request(prompt, sampling, on_event=events.put))
    ids: list[int] = []
    shown = ""
    sys.stdout.write("glm> ")
    while True:
        e = events.get()
        if e.token is not None:
            ids.append(e.token)
            text = s.tokenizer.decode(ids).removeprefix("\n")  # ChatGLM3/GLM-4: the empty metadata line
            sys.stdout.write(text[len(shown):] if text.startswith(shown) else text)
            sys.stdout.flush()
            shown = text
        if e.finish_reason is not None:
            if e.error:
                raise GLMError(f"generation failed: {e.error}")
            break
    sys.stdout.write("\n")
    return shown
