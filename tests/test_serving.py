"""The serving engine and the OpenAI-compatible server, driven by the official ``openai`` client.

Servers run in-process (uvicorn in a thread, a free port on 127.0.0.1) over: the bundled
glm-tiny model (a base model: completions, blank infilling), a tiny ChatGLM3 and a tiny
GLM-4 with a sentencepiece tokenizer. The GLM-4 one is *scripted*: its layers are zero
and its output projection makes every token of a chosen reply predict the next one, so
greedy decoding answers the chat prompt with exactly that reply (a tool call, or text):
the parsing of real replies is then tested through the whole stack.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import sentencepiece as spm
import torch
import uvicorn
from conftest import ROOT

from glm_runtime.api import GLM
from glm_runtime.core.build import build_model, random_state
from glm_runtime.core.chat import stop_ids
from glm_runtime.core.presets import preset
from glm_runtime.core.registry import get_backend
from glm_runtime.core.tokenizer import Tokenizer
from glm_runtime.serving import tools as toolfmt
from glm_runtime.serving.engine import Engine, Request, Sampling
from glm_runtime.serving.load import Served
from glm_runtime.serving.server import create_app

TINY = ROOT / "glm_core" / "assets" / "glm-tiny"
WEATHER = {"type": "function", "function": {"name": "now", "description": "the time",
                                            "parameters": {"type": "object", "properties": {}}}}


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, text) of a plain HTTP call (errors included, as the client sees them)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An app on a free port, in a thread of this process."""

    def __init__(self, make_served, api_key=None):
        self.port = free_port()
        self.app = create_app(make_served, api_key)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if http("GET", self.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("the server did not become healthy")

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        for line in http("GET", self.url + "/metrics")[2].splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_for(self, **want: float) -> None:
        """Poll /metrics until each named metric has its value (the engine runs in its own
        thread: a request answered with headers may not be admitted yet), or 10 s pass."""
        for _ in range(200):
            if all(self.metric(k) == v for k, v in want.items()):
                return
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def served_model(glm: GLM, tok, name, **engine):
    return Served(name, Engine(glm.model, glm.config, **engine), glm.config, tok)


@pytest.fixture(scope="module")
def tiny_server():
    from glm_runtime.api import load_model

    def make():
        m = load_model(TINY, backend="cpu")
        return served_model(m, Tokenizer(m.tokenizer_path, m.config), "glm-tiny", max_num_seqs=4)

    s = Server(make)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def byte_sp(tmp_path_factory):
    """A sentencepiece model with byte fallback and no whitespace normalisation: newlines
    and JSON braces encode and decode as they are."""
    d = tmp_path_factory.mktemp("sp-bytes")
    spm.SentencePieceTrainer.train(input=str(ROOT / "data" / "corpus" / "en_python_docs.txt"),
                                   model_prefix=str(d / "tok"), vocab_size=600, model_type="unigram",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, bos_id=-1, eos_id=2, unk_id=0,
                                   pad_id=1, minloglevel=2)
    return d / "tok.model"


def scripted_glm4(tok: Tokenizer, reply_ids: list[int], trigger: int, stop: int) -> GLM:
    """A tiny GLM-4 whose greedy continuation of any prompt ending in ``trigger`` is
    ``reply_ids`` then ``stop`` (module docstring); the reply's tokens must be distinct."""
    cfg = preset("tiny-glm-4", max_position_embeddings=2048)  # room for the tool prompt
    chain = [trigger, *reply_ids, stop]
    assert len(set(chain[:-1])) == len(chain) - 1, "the scripted reply repeats a token"
    st = {k: torch.zeros_like(v) if "layers." in k and "norm" not in k else v
          for k, v in random_state(cfg, seed=3).items()}
    g = torch.Generator().manual_seed(0)
    st["embed.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    for a, b in zip(chain, chain[1:]):
        e = st["embed.weight"][a]
        head[b] += 4.0 * e / e.pow(2).mean().sqrt()  # the final RMSNorm's output direction of token a
    st["lm_head.weight"] = head
    return GLM(build_model(cfg, st, get_backend("cpu")), get_backend("cpu"))


def distinct_reply(tok, texts):
    for t in texts:
        ids = tok.encode_text(t)
        if len(set(ids)) == len(ids) and 0 not in ids:
            return t, ids
    raise AssertionError("no candidate reply without repeated tokens")


@pytest.fixture(scope="module")
def glm4_servers(byte_sp):
    """Two scripted GLM-4 servers: one answers with a tool call, one with text (API key set)."""
    cfg = preset("tiny-glm-4")
    tok = Tokenizer(byte_sp, cfg)
    trigger, stop = tok.markers["<|assistant|>"], tok.markers["<|observation|>"]
    call_text, call_ids = distinct_reply(tok, ["now\n{}", "now\n{ }"])
    text, text_ids = distinct_reply(tok, ["\nHello there!", "\nHi!", "\nYes."])
    servers = {"call": Server(lambda: served_model(scripted_glm4(tok, call_ids, trigger, stop), tok, "glm4-call")),
               "text": Server(lambda: served_model(scripted_glm4(tok, text_ids, trigger, stop), tok, "glm4-text",
                                                   max_num_seqs=1, max_queue=1), api_key="sekrit")}
    servers["texts"] = (call_text, text.removeprefix("\n"))
    yield servers
    for s in ("call", "text"):
        servers[s].stop()


# ------------------------------------------------------------------------ engine
@pytest.mark.parametrize("name", ["tiny-glm-4", "tiny-glm-130b", "tiny-chatglm-6b"])
def test_batching_does_not_change_greedy_tokens(name):
    """16 requests of different lengths, arriving one per iteration while others decode,
    prompts prefilled in chunks of at most 16 tokens, give each the tokens it gets alone."""
    cfg = preset(name, vocab_size=512, eos_token_ids=[2], pad_token_id=0, mask_token_id=300, gmask_token_id=301,
                 smask_token_id=302, sop_token_id=303, eop_token_id=304)
    st = random_state(cfg, 1)
    st = {k: v * 10 if k.endswith("weight") and "norm" not in k else v for k, v in st.items()}  # peaked, no ties
    m = GLM(build_model(cfg, st, get_backend("cpu")), get_backend("cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(16):
        p = torch.randint(5, 290, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        prompts.append(p + [301, 303] if cfg.attention == "prefix" else p)
    lengths = [4 + i % 9 for i in range(16)]
    alone = [m.generate([p], max_new_tokens=n, stop_token_ids=[])[0, len(p):].tolist()
             for p, n in zip(prompts, lengths)]
    eng = Engine(m.model, cfg, max_num_seqs=6, max_tokens_per_step=16)
    outs = [[] for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        eng.submit(Request(p, Sampling(max_tokens=n, temperature=0),
                           on_event=lambda e, i=i: e.token is not None and outs[i].append(e.token)))
        eng.step()
    while eng.busy():
        eng.step()
    assert outs == alone
    assert eng.running == 0 and eng.kv_bytes_in_use() == 0


@pytest.mark.parametrize("name", ["tiny-glm-4", "tiny-chatglm-6b"])
def test_a_burst_is_prefilled_together_with_the_same_tokens(name):
    """8 prompts of one length arriving together are prefilled in batched calls (the
    engine's prefill groups), beside 2 of other lengths; each still gets its tokens alone."""
    cfg = preset(name, vocab_size=512, eos_token_ids=[2], pad_token_id=0, mask_token_id=300, gmask_token_id=301,
                 smask_token_id=302, sop_token_id=303, eop_token_id=304)
    st = random_state(cfg, 2)
    st = {k: v * 10 if k.endswith("weight") and "norm" not in k else v for k, v in st.items()}
    m = GLM(build_model(cfg, st, get_backend("cpu")), get_backend("cpu"))
    g = torch.Generator().manual_seed(1)
    tail = [301, 303] if cfg.attention == "prefix" else []
    prompts = [torch.randint(5, 290, (n,), generator=g).tolist() + tail for n in [12] * 8 + [5, 20]]
    alone = [m.generate([p], max_new_tokens=6, stop_token_ids=[])[0, len(p):].tolist() for p in prompts]
    eng = Engine(m.model, cfg, max_num_seqs=10, max_tokens_per_step=64)
    rows = []
    prefill = eng.batch.prefill
    eng.batch.prefill = lambda r, ids, *a, **k: rows.append(ids.shape[0]) or prefill(r, ids, *a, **k)
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(Request(p, Sampling(max_tokens=6, temperature=0),
                           on_event=lambda e, i=i: e.token is not None and outs[i].append(e.token)))
    while eng.busy():
        eng.step()
    assert outs == alone
    assert max(rows) > 1  # the burst did run as batched calls


def test_engine_limits_and_abort():
    cfg = preset("tiny-glm-4", vocab_size=512, eos_token_ids=[2], pad_token_id=0)
    m = GLM(build_model(cfg, None, get_backend("cpu")), get_backend("cpu"))
    eng = Engine(m.model, cfg, max_num_seqs=1, max_context=64, max_queue=1)
    with pytest.raises(Exception, match="context of 64"):
        eng.submit(Request([5] * 60, Sampling(max_tokens=8)))
    with pytest.raises(Exception, match="outside the vocabulary"):
        eng.submit(Request([5, 999], Sampling(max_tokens=8)))
    events = []
    r = eng.submit(Request([5, 6, 7], Sampling(max_tokens=50, temperature=0), on_event=events.append))
    with pytest.raises(Exception, match="waiting"):
        eng.submit(Request([5], Sampling(max_tokens=8)))
    eng.step()
    eng.step()
    eng.abort(r)
    eng.step()
    assert events[-1].finish_reason == "abort" and eng.running == 0


# ------------------------------------------------------------------------ base model
def test_completions_text_stream_and_stop(tiny_server):
    c = tiny_server.client()
    r = c.completions.create(model="glm-tiny", prompt="Beautiful is better than", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12 and text
    chunks = list(c.completions.create(model="glm-tiny", prompt="Beautiful is better than", max_tokens=12,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    stop = text[len(text) // 2:len(text) // 2 + 3]
    r = c.completions.create(model="glm-tiny", prompt="Beautiful is better than", max_tokens=12, temperature=0,
                             stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.index(stop)]


def test_completions_token_ids_and_logprobs(tiny_server):
    c = tiny_server.client()
    ids = [8001, 8003]  # [gMASK] <sop>
    r = c.completions.create(model="glm-tiny", prompt=ids, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert r.usage.prompt_tokens == 2


def test_blank_infilling_is_filled_in_place(tiny_server):
    r = tiny_server.client().completions.create(model="glm-tiny", prompt="The quick brown [MASK] jumps.",
                                                max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert text.startswith("The quick brown") and text.endswith("jumps.") and "[MASK]" not in text


# ------------------------------------------------------------------------ chat, tools
def test_tools_round_trip(glm4_servers):
    c = glm4_servers["call"].client()
    msgs = [{"role": "user", "content": "what time is it"}]
    r = c.chat.completions.create(model="glm4-call", messages=msgs, tools=[WEATHER], max_tokens=20, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "now" and json.loads(call.function.arguments) == {}
    # the call and its result go back; the scripted model answers the same way again
    msgs += [{"role": "assistant", "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    r2 = c.chat.completions.create(model="glm4-call", messages=msgs, tools=[WEATHER], max_tokens=20, temperature=0)
    assert r2.choices[0].message.tool_calls[0].function.name == "now"
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    chunks = list(c.chat.completions.create(model="glm4-call", messages=msgs[:1], tools=[WEATHER], max_tokens=20,
                                            temperature=0, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "now" and chunks[-1].choices[0].finish_reason == "tool_calls"
    # without tools the same reply is text
    r3 = c.chat.completions.create(model="glm4-call", messages=msgs[:1], max_tokens=20, temperature=0)
    assert r3.choices[0].message.content == glm4_servers["texts"][0] and r3.choices[0].finish_reason == "stop"


def test_chat_text_stream_and_api_key(glm4_servers):
    s = glm4_servers["text"]
    with pytest.raises(openai.AuthenticationError):
        s.client("wrong").chat.completions.create(model="glm4-text", messages=[{"role": "user", "content": "x"}])
    c = s.client("sekrit")
    want = glm4_servers["texts"][1]
    r = c.chat.completions.create(model="glm4-text", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="glm4-text", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [m.id for m in c.models.list().data] == ["glm4-text"]


def test_queue_full_is_429_and_a_dropped_stream_frees_its_slot(glm4_servers):
    s = glm4_servers["text"]
    c = s.client("sekrit")
    msgs = [{"role": "user", "content": "hi"}]
    streams = []
    for running, waiting in ((1, 0), (1, 1)):  # one decoding, one queued (max_num_seqs 1, max_queue 1)
        streams.append(c.chat.completions.create(model="glm4-text", messages=msgs, max_tokens=200, stream=True))
        s.wait_for(glm_requests_running=running, glm_requests_waiting=waiting)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(4):
            c.chat.completions.create(model="glm4-text", messages=msgs, max_tokens=5)
    assert e.value.response.headers.get("retry-after") == "1"
    for st in streams:
        st.close()  # the client goes away mid-stream
    s.wait_for(glm_requests_running=0, glm_requests_waiting=0)
    assert s.metric("glm_requests_running") == 0 and s.metric("glm_kv_cache_bytes_in_use") == 0
    assert s.metric('glm_requests_total{finish_reason="abort"}') == 2


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "glm4-text"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "unknown role"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n must be 1"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {}}, 400, "unsupported parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "context"),
])
def test_bad_chat_requests_get_openai_errors(glm4_servers, body, status, needle):
    s = glm4_servers["text"]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, _, text = http("POST", s.url + "/v1/chat/completions", content,
                         {"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
    assert code == status, text
    err = json.loads(text)["error"]
    assert needle in err["message"] and err["code"] == status


def test_bad_completion_prompt_ids(tiny_server):
    code, _, text = http("POST", tiny_server.url + "/v1/completions",
                         json.dumps({"prompt": [5, 10 ** 6], "max_tokens": 2}).encode())
    assert code == 400 and "outside the vocabulary" in json.loads(text)["error"]["message"]
    assert json.loads(http("GET", tiny_server.url + "/health")[2]) == {"status": "ok"}  # the server carries on


def test_tool_call_text_is_parsed_never_evaluated():
    names = {"f"}
    assert toolfmt.parse_call("chatglm3", "f\n```python\ntool_call(a=1, b='x', c=[1, 2])\n```", names) == \
        ("f", json.dumps({"a": 1, "b": "x", "c": [1, 2]}))
    for bad in ("tool_call(a=__import__('os').system('true'))", "tool_call(a=open('x'))", "tool_call(**x)",
                "os.system('x')"):
        assert toolfmt.parse_call("chatglm3", f"f\n```python\n{bad}\n```", names) is None
    assert toolfmt.parse_call("glm-4", 'f\n{"a": 1}', names) == ("f", '{"a": 1}')
    assert toolfmt.parse_call("glm-4", "g\n{}", names) is None  # not an offered tool: text
    assert toolfmt.parse_call("glm-4", "f\nnot json", names) is None


def test_chatglm3_chat_with_its_stop_tokens(sp_model):
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    cfg = preset("tiny-chatglm2", family="chatglm3-6b", vocab_size=n + 9, mask_token_id=n, gmask_token_id=n + 1,
                 smask_token_id=n + 2, sop_token_id=n + 3, eop_token_id=n + 4, eos_token_ids=[2])
    tok = Tokenizer(sp_model, cfg)
    m = GLM(build_model(cfg, None, get_backend("cpu")), get_backend("cpu"))
    s = Server(lambda: served_model(m, tok, "chatglm3-tiny"))
    try:
        r = s.client().chat.completions.create(model="chatglm3-tiny", temperature=0, max_tokens=6, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something"}])
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
        assert set(stop_ids(cfg, tok)) == {2, tok.markers["<|user|>"], tok.markers["<|observation|>"]}
    finally:
        s.stop()
