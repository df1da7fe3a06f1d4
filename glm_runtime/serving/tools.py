"""Tools (function calling) in the GLM chat formats, and tool calls parsed back as data.

OpenAI's ``tools`` (``[{"type": "function", "function": {name, description, parameters}}]``)
go into the prompt the way each family's own code puts them (glm-spec section 8):

* ChatGLM3-6B: a system message whose content is followed by the JSON tool list
  (``json.dumps(tools, indent=4, ensure_ascii=False)``, tools as ``{name, description,
  parameters}``); the model answers a call with an assistant turn whose metadata is the
  tool name and whose content is a fenced python block ``tool_call(arg=value, ...)``.
* GLM-4: a system message that lists each tool under ``## name`` with its JSON and asks
  for the arguments in JSON; the model answers with the tool name as metadata and the
  arguments as a JSON object.

The model's output is text, never code: ChatGLM3's ``tool_call(...)`` is parsed with
:mod:`ast` and each argument read with ``ast.literal_eval`` (literals only: a call, a
name or an attribute is refused), GLM-4's arguments with ``json.loads``. A reply that
does not parse as a call of an offered tool is returned as text. Tool results come back
as ``tool`` messages, which become the ``observation`` role.
"""
from __future__ import annotations

import ast
import json

from glm_runtime.core.errors import GLMError

GLM4_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的"
               "问题和要求提供适当的答复和支持。")
CHATGLM3_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"


def functions(tools: list) -> list[dict]:
    """OpenAI ``tools`` -> their function descriptions (checked)."""
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise GLMError("each tool must be {\"type\": \"function\", \"function\": {...}}")
        f = t["function"]
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise GLMError("a tool function needs a name")
        out.append({"name": f["name"], "description": f.get("description", ""),
                    "parameters": f.get("parameters", {"type": "object", "properties": {}})})
    return out


def system_message(fmt: str, funcs: list[dict], system: str | None) -> dict:
    """The system message that offers ``funcs`` to a model of chat format ``fmt``."""
    if fmt == "chatglm3":
        text = (system or CHATGLM3_SYSTEM) + "\n" + json.dumps(funcs, indent=4, ensure_ascii=False)
        return {"role": "system", "content": text}
    if fmt == "glm-4":
        text = (system or GLM4_SYSTEM) + "\n\n# 可用工具"
        for f in funcs:
            text += f"\n\n## {f['name']}\n\n{json.dumps(f, indent=4, ensure_ascii=False)}\n" \
                    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
        return {"role": "system", "content": text}
    raise GLMError(f"the {fmt} chat format has no tools (ChatGLM3 and GLM-4 were trained for function calling)")


def call_message(fmt: str, name: str, arguments: str) -> dict:
    """An earlier assistant tool call (from the conversation) in the family's format."""
    args = json.loads(arguments) if arguments else {}
    if fmt == "chatglm3":
        kw = ", ".join(f"{k}={v!r}" for k, v in args.items())
        return {"role": "assistant", "metadata": name, "content": f"```python\ntool_call({kw})\n```"}
    return {"role": "assistant", "metadata": name, "content": json.dumps(args, ensure_ascii=False)}


def parse_call(fmt: str, reply: str, names: set[str]) -> tuple[str, str] | None:
    """(tool name, JSON arguments) when ``reply`` (the decoded assistant turn, metadata line
    first) calls one of ``names``; None when it is plain text."""
    meta, _, content = reply.partition("\n")
    name = meta.strip()
    if name not in names:
        return None
    content = content.strip()
    if fmt == "chatglm3":
        code = content.removeprefix("```python").removeprefix("```").removesuffix("```").strip()
        args = _tool_call_kwargs(code)
        return None if args is None else (name, json.dumps(args, ensure_ascii=False))
    try:
        args = json.loads(content) if content else {}
    except json.JSONDecodeError:
        return None
    return (name, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _tool_call_kwargs(code: str) -> dict | None:
    """The keyword arguments of ``tool_call(a=1, b="x")``, read as literals (no evaluation)."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call") \
            or call.args:
        return None
    out = {}
    for kw in call.keywords:
        if kw.arg is None:
            return None
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError):
            return None
    return out
