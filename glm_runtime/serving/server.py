"""An OpenAI-compatible HTTP server over the engine (FastAPI/Starlette, uvicorn, SSE).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET
/v1/models``, ``GET /health`` (503 while the model loads, 200 when it serves) and ``GET
/metrics`` (Prometheus). With an API key configured every ``/v1`` call needs ``Authorization:
Bearer <key>`` (401 otherwise). Errors are OpenAI's JSON (``{"error": {"message", "type",
"param", "code"}}``) with the status that fits: 400 malformed or unsupported input, 401,
404 unknown model, 429 queue full (with ``Retry-After``), 500 a failure inside the engine
(which ends that request alone). docs/serving.md lists every option and limit.

The model's text goes through the tokenizer; a stop string ends a sequence when it
appears in the decoded text (the text is held back while it could still be the start of
one), so tokens that decode to nothing (ChatGLM3's id 2) do not hide it. A client that
disconnects from a stream aborts its request: its slot is freed at the next iteration.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse

from glm_runtime.core.chat import build_chat_ids, stop_ids
from glm_runtime.core.errors import GLMError
from glm_runtime.core.infilling import infill_prompt
from glm_runtime.core.tokenizer import Tokenizer

from . import tools as toolfmt
from .engine import Engine, Event, QueueFull, Sampling
from .engine import Request as EngineRequest
from .load import Served

log = logging.getLogger("glm_runtime.serving")

COMPLETION_PARAMS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                     "logprobs", "n", "user", "stream_options", "presence_penalty", "frequency_penalty", "ignore_eos"}
CHAT_PARAMS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stream", "logprobs", "top_logprobs", "n", "user", "tools", "tool_choice", "stream_options",
               "presence_penalty", "frequency_penalty", "parallel_tool_calls", "ignore_eos"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class Metrics:
    """Prometheus metrics of one server (its own registry: several servers may share a process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("glm_requests_running", "sequences decoding now", registry=r)
        self.waiting = Gauge("glm_requests_waiting", "requests in the queue", registry=r)
        self.kv_used = Gauge("glm_kv_cache_bytes_in_use", "KV cache bytes holding live sequences", registry=r)
        self.kv_total = Gauge("glm_kv_cache_bytes_total", "KV cache bytes allocated", registry=r)
        self.prompt_tokens = Counter("glm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("glm_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("glm_requests", "requests finished, by reason", ["finish_reason"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
        self.ttft = Histogram("glm_time_to_first_token_seconds", "time to first token", buckets=buckets, registry=r)
        self.itl = Histogram("glm_inter_token_latency_seconds", "time between tokens of a stream", buckets=buckets,
                             registry=r)
        self.e2e = Histogram("glm_request_latency_seconds", "time from arrival to the last token", buckets=buckets,
                             registry=r)

    def observe(self, name: str, value: float) -> None:
        {"ttft": self.ttft.observe, "itl": self.itl.observe, "e2e": self.e2e.observe,
         "generated": self.generation_tokens.inc}[name](value)

    def refresh(self, engine: Engine) -> None:
        self.running.set(engine.running)
        self.waiting.set(len(engine.waiting))
        self.kv_used.set(engine.kv_bytes_in_use())
        self.kv_total.set(engine.kv_bytes_total())


def error_body(e: APIError) -> dict:
    """OpenAI's error object (a response body, or the last event of a failed stream)."""
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------ request parsing
def _number(body: dict, key: str, default, lo=None, hi=None, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or v != v:
        raise APIError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def sampling_of(body: dict, served: Served, max_key: str = "max_tokens", stop_ids_=()) -> tuple[Sampling, list[str]]:
    """The sampling parameters and stop strings of a request body (checked)."""
    ctx = served.engine.max_context
    max_tokens = _number(body, max_key, None, 1, ctx, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 16 if max_key == "max_tokens" else 256, 1, ctx, integer=True)
    if _number(body, "n", 1, 1, None, integer=True) != 1:
        raise APIError(400, "n must be 1 (one choice per request)", "n")
    for k in ("presence_penalty", "frequency_penalty"):
        if _number(body, k, 0, 0, 0) != 0:
            raise APIError(400, f"{k} is not supported (it must be 0)", k)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 8:
        raise APIError(400, "stop must be a non-empty string or a list of at most 8 of them", "stop")
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {json.dumps(ignore_eos)[:40]}", "ignore_eos")
    s = Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
                 top_p=_number(body, "top_p", 1.0, 1e-6, 1), top_k=_number(body, "top_k", 0, 0, None, integer=True),
                 seed=None if seed is None else seed % 2 ** 63,
                 stop_ids=frozenset() if ignore_eos else frozenset(stop_ids_))
    return s, stops


def _check_params(body: dict, allowed: set, endpoint: str) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise APIError(400, f"unsupported parameter(s) for {endpoint}: {', '.join(extra)}", extra[0])


# ------------------------------------------------------------------ one generation
class Generation:
    """One engine request seen from asyncio: its events, its text so far, stop strings."""

    def __init__(self, served: Served, prompt: list[int], sampling: Sampling, stops: list[str], metrics: Metrics):
        self.served, self.stops, self.metrics = served, stops, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.ids: list[int] = []
        self.logprobs: list[tuple[int, float, list]] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.req = EngineRequest(prompt, sampling, on_event=lambda e: self.loop.call_soon_threadsafe(
            self.queue.put_nowait, e))
        try:
            served.engine.submit(self.req)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except GLMError as e:
            raise APIError(400, str(e), "prompt" if "token id" in str(e) else "max_tokens") from None
        metrics.prompt_tokens.inc(len(prompt))

    def abort(self) -> None:
        if self.finish_reason is None:  # the client went away before the end
            self.served.engine.abort(self.req)
            self.finish_reason = "abort"
            self.metrics.requests.labels("abort").inc()

    async def deltas(self):
        """Yield (text delta, logprob records) until the sequence ends."""
        hold = max((len(s) for s in self.stops), default=1) - 1
        while self.finish_reason is None:
            e = await self.queue.get()
            new_lp = []
            if e.token is not None:
                self.ids.append(e.token)
                if e.logprob is not None:
                    new_lp.append((e.token, e.logprob, e.top or []))
                self.text = self.served.tokenizer.decode(self.ids) if self.served.tokenizer else ""
                cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"
                    self.served.engine.abort(self.req)
            if e.finish_reason is not None and self.finish_reason is None:
                if e.finish_reason == "error":
                    self.finish_reason = "error"
                    self.metrics.requests.labels("error").inc()
                    raise APIError(500, f"generation failed: {e.error}", kind="server_error")
                self.finish_reason = e.finish_reason
            self.logprobs += new_lp
            end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - hold)
            delta, self.sent = self.text[self.sent:end], end
            if delta or new_lp or self.finish_reason:
                yield delta, new_lp
        self.metrics.requests.labels(self.finish_reason).inc()


# ------------------------------------------------------------------ the app
def create_app(load: Callable[[], Served], api_key: str | None = None) -> FastAPI:
    """The server, loading its model with ``load`` in the background (``/health`` answers
    503 until it is done)."""
    app = FastAPI(title="glm-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    state: dict = {"served": None, "error": None}

    def loader():
        try:
            served = load()
            served.engine.observe = metrics.observe
            served.engine.start()
            state["served"] = served
            log.info("serving %s", served.name)
        except Exception as e:  # noqa: BLE001 - reported by /health and every call
            state["error"] = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", state["error"])

    threading.Thread(target=loader, name="glm-load", daemon=True).start()

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    def served() -> Served:
        if state["served"] is None:
            raise APIError(503, f"the model failed to load: {state['error']}" if state["error"] else
                           "the model is loading", kind="server_error", headers={"Retry-After": "5"})
        return state["served"]

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", kind="authentication_error")

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def accept(request: Request, allowed: set, endpoint: str) -> tuple[dict, Served]:
        """What every generation endpoint checks first: the key, a JSON object body with
        only the endpoint's parameters, and the model's name; the body and what is served."""
        authorize(request)
        body = await body_of(request)
        s = served()
        _check_params(body, allowed, endpoint)
        name = body.get("model")
        if name is not None and name != s.name:
            raise APIError(404, f"model {name!r} does not exist (this server serves {s.name!r})", "model",
                           kind="not_found_error")
        return body, s

    @app.get("/health")
    async def health():
        if state["served"] is None:
            return JSONResponse({"status": "error" if state["error"] else "loading", "detail": state["error"]},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        if state["served"] is not None:
            metrics.refresh(state["served"].engine)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        s = served()
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                            "owned_by": "glm-runtime"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, s = await accept(request, COMPLETION_PARAMS, "/v1/completions")
        sampling, stops = sampling_of(body, s, stop_ids_=s.config.eos_token_ids)
        n_lp = _number(body, "logprobs", None, 0, 5, integer=True)
        if n_lp is not None:
            sampling.logprobs, sampling.top_logprobs = True, n_lp
        prompt = completion_prompt(body.get("prompt"), s)
        return await respond(s, "text_completion", prompt, sampling, stops, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, s = await accept(request, CHAT_PARAMS, "/v1/chat/completions")
        if s.chat is None:
            raise APIError(400, f"{s.name} is a base model without a chat format: use /v1/completions", "model")
        ids, funcs = chat_prompt(body, s)
        sampling, stops = sampling_of(body, s, "max_completion_tokens", stop_ids(s.config, s.tokenizer))
        if body.get("logprobs"):
            sampling.logprobs = True
            sampling.top_logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
        return await respond(s, "chat.completion", Prompt(ids), sampling, stops, body, chat=True, funcs=funcs)

    async def respond(s: Served, kind: str, prompt: "Prompt", sampling, stops, body, chat, funcs=None):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", "stream")
        g = prompt.start(s, sampling, stops, metrics)  # fails before a stream opens (429, 400)
        if stream:
            return EventSourceResponse(stream_chunks(s, rid, created, prompt, g, sampling, chat, funcs, body), ping=15)
        try:
            async for _ in g.deltas():
                pass
        finally:
            g.abort()
        usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": len(g.ids),
                 "total_tokens": len(prompt.ids) + len(g.ids)}
        if not chat:
            choice = {"index": 0, "text": g.text, "finish_reason": g.finish_reason,
                      "logprobs": completion_logprobs(s, g.logprobs) if sampling.logprobs else None}
        else:
            message, reason = chat_message(s, g.text, g.finish_reason, funcs)
            choice = {"index": 0, "message": message, "finish_reason": reason,
                      "logprobs": chat_logprobs(s, g.logprobs) if sampling.logprobs else None}
        return {"id": rid, "object": kind, "created": created, "model": s.name, "choices": [choice], "usage": usage}

    async def stream_chunks(s, rid, created, prompt, g, sampling, chat, funcs, body):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta, reason=None, lp=None):
            c = {"index": 0, "delta" if chat else "text": delta, "finish_reason": reason, "logprobs": lp}
            return json.dumps({"id": rid, "object": kind, "created": created, "model": s.name, "choices": [c]},
                              ensure_ascii=False)

        # ChatGLM3/GLM-4 replies start with their metadata line, empty for text
        strip_newline = chat and s.chat in ("chatglm3", "glm-4")
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            # a chat reply offered tools is held until it is known to be a call or text
            async for delta, lp in g.deltas():
                if chat and funcs:
                    continue
                if strip_newline and delta:
                    delta, strip_newline = delta.removeprefix("\n"), False
                lpj = (chat_logprobs(s, lp) if chat else completion_logprobs(s, lp)) if lp else None
                if delta or lpj:
                    yield chunk({"content": delta} if chat else delta, None, lpj)
            reason = g.finish_reason
            if chat and funcs:
                message, reason = chat_message(s, g.text, reason, funcs)
                delta = {k: v for k, v in message.items() if k in ("content", "tool_calls") and v is not None}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(delta["tool_calls"])]
                yield chunk(delta)
            yield chunk({} if chat else "", reason)
            if isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage"):
                usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": len(g.ids),
                         "total_tokens": len(prompt.ids) + len(g.ids)}
                yield json.dumps({"id": rid, "object": kind, "created": created, "model": s.name, "choices": [],
                                  "usage": usage})
            yield "[DONE]"
        except APIError as e:
            yield json.dumps(error_body(e))
        finally:
            g.abort()  # a client that went away (the generator is cancelled) frees its slot

    return app


# ------------------------------------------------------------------ prompts
class Prompt:
    """An engine request's prompt ids; its generation's text is the continuation."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def start(self, s: Served, sampling: Sampling, stops: list[str], metrics: Metrics) -> Generation:
        return Generation(s, self.ids, sampling, stops, metrics)


def completion_prompt(prompt, s: Served) -> Prompt:
    """A completion prompt: text (tokenized; a base model's ``[MASK]``/``[sMASK]`` blanks
    filled as ``glmrt generate`` fills them), or token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Prompt(list(prompt))
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
    tok = s.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: send token ids as the prompt", "prompt")
    if s.config.attention != "prefix":
        return Prompt(tok.encode(prompt))
    try:
        ids, kind = infill_prompt(s.config, tok, prompt)
    except GLMError as e:
        raise APIError(400, str(e), "prompt") from None
    if kind == s.config.gmask_token_id and ids.count(kind) == 1:
        return Prompt(ids + [s.config.sop_token_id])  # a continuation: the completion is the new text
    return BlankFill(ids, kind, tok)


class BlankFill(Prompt):
    """A base model's prompt with ``[MASK]``/``[sMASK]`` blanks: they are filled left to
    right, each seeing the spans filled before it (:mod:`glm_runtime.core.infilling`); the
    completion is the whole text with the blanks filled."""

    def __init__(self, ids: list[int], kind: int, tok: Tokenizer):
        super().__init__(ids)
        self.kind, self.tok = kind, tok

    def start(self, s: Served, sampling: Sampling, stops: list[str], metrics: Metrics) -> "BlankGeneration":
        return BlankGeneration(self, s, sampling, stops, metrics)


class BlankGeneration:
    """The generations of a :class:`BlankFill`, one per blank, seen as one: its text is the
    filled text, handed out as it grows."""

    def __init__(self, fill: BlankFill, s: Served, sampling: Sampling, stops: list[str], metrics: Metrics):
        self.fill, self.s, self.sampling, self.stops, self.metrics = fill, s, sampling, stops, metrics
        self.template = list(fill.ids)
        self.ids, self.logprobs, self.text, self.finish_reason = [], [], "", None
        self.cur = self._start()

    def _start(self) -> Generation:
        return Generation(self.s, self.template + [self.s.config.sop_token_id], self.sampling, self.stops,
                          self.metrics)

    def abort(self) -> None:
        self.cur.abort()

    async def deltas(self):
        decode, eop = self.fill.tok.decode, self.s.config.eop_token_id
        while True:
            where = self.template.index(self.fill.kind)
            before = decode(self.template[:where])
            yield before[len(self.text):], []
            self.text = before
            async for delta, lp in self.cur.deltas():
                self.logprobs += lp
                self.text += delta
                yield delta, lp
            span = [t for t in self.cur.ids if t != eop]
            self.ids += self.cur.ids
            self.template = self.template[:where] + span + self.template[where + 1:]
            if self.fill.kind not in self.template:
                full = decode(self.template)
                tail = full[len(self.text):] if full.startswith(self.text) else ""
                self.text, self.finish_reason = full, self.cur.finish_reason
                yield tail, []
                return
            self.text = decode(self.template[:where + len(span)])
            self.cur = self._start()


def chat_prompt(body: dict, s: Served) -> tuple[list[int], list[dict] | None]:
    """The prompt ids of a chat request (OpenAI messages -> the family's format) and the
    tools it offers (None without tools or with ``tool_choice`` "none")."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    fmt = s.chat
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    funcs = None
    if tools:
        if not isinstance(tools, list):
            raise APIError(400, "tools must be a list", "tools")
        if choice not in ("auto", "none"):
            raise APIError(400, "tool_choice must be \"auto\" or \"none\" (forcing a tool is not supported)",
                           "tool_choice")
        try:
            funcs = toolfmt.functions(tools)
        except GLMError as e:
            raise APIError(400, str(e), "tools") from None
        if choice == "none":
            funcs = None
    out, system = [], None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, f"messages[{i}] must be an object with a role", "messages")
        role, content = m["role"], m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", "messages")
            content = "".join(p.get("text", "") for p in content)
        if content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        if role == "system" and i == 0 and funcs:
            system = content
            continue
        if role == "assistant" and m.get("tool_calls"):
            for tc in m["tool_calls"]:
                f = tc.get("function", {}) if isinstance(tc, dict) else {}
                try:
                    out.append(toolfmt.call_message(fmt, f.get("name", ""), f.get("arguments", "")))
                except (json.JSONDecodeError, GLMError) as e:
                    raise APIError(400, f"messages[{i}].tool_calls: {e}", "messages") from None
            continue
        if role == "tool":
            out.append({"role": "observation", "content": content or ""})
            continue
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: unknown role {role!r} (system, user, assistant, tool)", "messages")
        out.append({"role": role, "content": content or ""})
    if funcs:
        try:
            out.insert(0, toolfmt.system_message(fmt, funcs, system))
        except GLMError as e:
            raise APIError(400, str(e), "tools") from None
    try:
        return build_chat_ids(s.config, s.tokenizer, out), funcs
    except GLMError as e:
        raise APIError(400, str(e), "messages") from None


def chat_message(s: Served, text: str, reason: str | None, funcs) -> tuple[dict, str | None]:
    """The assistant message of a reply: plain text (its leading metadata newline dropped),
    or a tool call when the reply calls an offered tool."""
    if funcs and s.chat in ("chatglm3", "glm-4"):
        call = toolfmt.parse_call(s.chat, text, {f["name"] for f in funcs})
        if call is not None:
            name, args = call
            tc = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                  "function": {"name": name, "arguments": args}}
            return {"role": "assistant", "content": None, "tool_calls": [tc]}, "tool_calls"
    if s.chat in ("chatglm3", "glm-4"):
        text = text.removeprefix("\n")  # the empty metadata line of a plain answer
    return {"role": "assistant", "content": text}, reason


def _piece(s: Served, t: int) -> str:
    return s.tokenizer.decode([t], keep_special=True) if s.tokenizer else str(t)


def completion_logprobs(s: Served, records) -> dict:
    return {"tokens": [_piece(s, t) for t, _, _ in records], "token_logprobs": [lp for _, lp, _ in records],
            "top_logprobs": [{_piece(s, i): v for i, v in top} for _, _, top in records], "text_offset": []}


def chat_logprobs(s: Served, records) -> dict:
    return {"content": [{"token": _piece(s, t), "logprob": lp, "bytes": None,
                         "top_logprobs": [{"token": _piece(s, i), "logprob": v, "bytes": None} for i, v in top]}
                        for t, lp, top in records]}
