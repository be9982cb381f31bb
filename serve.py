"""OpenAI-compatible HTTP server for dsv4-mini: tokenizer, text streaming, request validation,
FastAPI app, Prometheus metrics and the CLI.

    python serve.py --eplb --ep-size 4 --ep-num-redundant-experts 4

Request path: JSON body → validated `CompletionRequest`/`ChatRequest` → token ids → `engine.Sequence`
→ engine thread (engine.py) → token ids back through an asyncio queue → `TextStream` (UTF-8 and
stop-string hold-back) → SSE chunks or one JSON body.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import Engine, QueueFull, SamplingParams, Sequence

log = logging.getLogger("dsv4.serve")

# ====================================================================== tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
THINK_END = "</think>"   # DSV4 non-thinking mode opens the answer with "</think>"

# The built-in tokenizer's training text. Any UTF-8 round-trips regardless (byte-level BPE);
# the corpus only decides which merges exist.
_BUILTIN_CORPUS = """\
The server reads a request, turns the text into token ids and hands them to the engine. The engine
keeps one cache slot per request, runs a batched forward step, samples one token for every running
request and sends it back. Long prompts are split into chunks so that other requests keep decoding.
Mixture-of-experts layers route every token to a few experts. Some experts are more popular than
others, so the ranks that hold them do more work. Expert-parallel load balancing counts how many
tokens each expert received, plans a new placement with replicas of the hot experts, and copies
the weights between forward steps. The outputs stay the same because replicas hold identical weights.
What is the capital of France? Paris is the capital of France. How are you today? I am fine, thanks.
Once upon a time there was a small model that wanted to learn how to balance its experts.
def forward(self, input_ids, positions, cache):
    hidden = self.embed(input_ids)
    for layer_idx, block in enumerate(self.layers):
        hidden = block(hidden, positions, cache, layer_idx)
    return self.head(self.norm(hidden))
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42 + - * / = ( ) [ ] { } < > , . ; : ! ? " ' ` ~ @ # $ % ^ & | \\
Größe, café, naïve, señor, 中文, 日本語, 한국어, русский, العربية, emoji 🙂🚀
"""


def builtin_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on the embedded corpus: deterministic, lossless, well under a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 8192), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, USER, ASSISTANT, THINK_END])
    tokenizer.train_from_iterator(_BUILTIN_CORPUS.splitlines(keepends=True), trainer)
    return tokenizer


class TextTokenizer:
    """tokenizers.Tokenizer plus what the server needs: BOS/EOS ids and the chat template."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id = tokenizer.token_to_id(BOS)
        eos_id = tokenizer.token_to_id(EOS)
        self.eos_ids = () if eos_id is None else (eos_id,)
        self.has_chat_tokens = tokenizer.token_to_id(USER) is not None and tokenizer.token_to_id(ASSISTANT) is not None
        self.has_think_end = tokenizer.token_to_id(THINK_END) is not None

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """DSV4 chat format: BOS, system text, <｜User｜>…<｜Assistant｜></think>…<｜end▁of▁sentence｜>,
        ending with an open assistant turn. Plain "Role: text" lines for tokenizers without those tokens."""
        if not self.has_chat_tokens:
            lines = [f"{role.capitalize()}: {content}" for role, content in messages]
            return "\n".join(lines + ["Assistant:"])
        opener = ASSISTANT + (THINK_END if self.has_think_end else "")
        parts = [BOS if self.bos_id is not None else ""]
        for role, content in messages:
            if role == "system":
                parts.append(content)
            elif role == "user":
                parts.append(USER + content)
            else:
                parts.append(opener + content + EOS)
        parts.append(opener)
        return "".join(parts)


class TextStream:
    """Token ids → text deltas for one request. Holds back (1) bytes of a character not yet complete
    and (2) a tail that could still grow into a stop string; cuts the text at the first stop string."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0     # decode from here so merges across the boundary render right
        self.read_offset = 0       # ids before this are already in self.text
        self.text = ""
        self.sent = 0              # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush held text (an unfinished character decodes as U+FFFD)."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string can only start in unreleased text: the held-back tail is the longest one
        # that could begin a stop string, so released text never holds a stop string's start.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
        else:
            end = len(self.text) - (0 if final else self._stop_prefix_len())
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _stop_prefix_len(self) -> int:
        tail = self.text[self.sent:]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0


# ====================================================================== request schemas

class APIError(Exception):
    """Rendered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


class StrictModel(BaseModel):
    # strict: "5" is not an int; forbid: an unknown field is an error, never silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(-1, description="extension: -1 or 0 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop_token_ids: list[int] | None = Field(None, description="extension (vLLM)")
    ignore_eos: bool = Field(False, description="extension (vLLM)")
    user: str | None = Field(None, description="accepted for OpenAI compatibility; not used")
    # Known OpenAI fields this server does not implement: accepted only at their no-op value,
    # anything else is a 400 that names the field.
    n: int | None = 1
    logprobs: Any = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None


NO_OP_VALUES = {"n": (1, None), "logprobs": (None, False), "presence_penalty": (0, None),
                "frequency_penalty": (0, None), "logit_bias": (None, {}), "echo": (False, None),
                "best_of": (None, 1), "suffix": (None,), "top_logprobs": (None,), "tools": (None,),
                "tool_choice": (None, "none"), "functions": (None,), "function_call": (None, "none"),
                "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"})}


def reject_unsupported(req: BaseModel) -> None:
    for name, allowed in NO_OP_VALUES.items():
        if name in type(req).model_fields and getattr(req, name) not in allowed:
            raise APIError(400, f"'{name}' is not supported by this server (allowed: "
                                f"{' or '.join(json.dumps(a) for a in allowed)})", param=name,
                           code="unsupported_parameter")


def sampling_params(req: SamplingFields, prompt_len: int, max_seq_len: int, vocab_size: int,
                    default_max_tokens: int | None) -> tuple[SamplingParams, list[str]]:
    """Range checks → SamplingParams + stop strings. Every failure is a 400 naming the field."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty: it must hold at least one token", "prompt")
    if prompt_len >= max_seq_len:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, the "
                            f"prompt alone has {prompt_len} tokens, leaving no room for a completion.",
                       "messages" if default_max_tokens is None else "prompt", "context_length_exceeded")
    if not 0.0 <= req.temperature <= 2.0:
        raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k < -1:
        raise APIError(400, f"top_k must be -1 (off) or >= 0, got {req.top_k}", "top_k")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise APIError(400, "seed must fit in 64 bits", "seed")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
        raise APIError(400, "stop takes at most 4 non-empty strings of at most 256 characters", "stop")
    stop_ids = req.stop_token_ids or []
    if len(stop_ids) > 64 or any(not 0 <= t < vocab_size for t in stop_ids):
        raise APIError(400, f"stop_token_ids takes at most 64 ids in [0, {vocab_size})", "stop_token_ids")
    room = max_seq_len - prompt_len
    max_tokens = req.max_tokens if req.max_tokens is not None else (default_max_tokens or room)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if prompt_len + max_tokens > max_seq_len:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                            f"{max_tokens} for the completion).", "max_tokens", "context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=max(req.top_k, 0), seed=req.seed, stop_token_ids=tuple(stop_ids),
                            ignore_eos=req.ignore_eos)
    return params, stop


# ====================================================================== runtime and metrics

@dataclass
class Runtime:
    """Everything the HTTP layer needs once the model is loaded."""
    engine: Engine
    tokenizer: TextTokenizer
    model_name: str
    max_seq_len: int
    vocab_size: int                  # model vocabulary: prompt ids must be below it
    eplb: Any = None                 # eplb.EPLBManager or None
    record_dir: Path | None = None
    peers: Any = None                # ep.LockstepModel under torchrun (per-rank MoE seconds)


class Metrics:
    """Per-app registry, so several apps can live in one process (tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv4_requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("dsv4_time_per_output_token_seconds", "Time between output tokens",
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.snapshot: dict = {}   # engine + EPLB numbers, refreshed right before each scrape
        r.register(self)

    def collect(self):
        s = self.snapshot
        for name, doc in [("requests_running", "Requests being prefilled or decoded"),
                          ("requests_waiting", "Requests queued for a cache slot"),
                          ("cache_slots_in_use", "KV cache slots in use"),
                          ("cache_slots_total", "KV cache slots")]:
            yield GaugeMetricFamily(f"dsv4_{name}", doc, value=s.get(name, 0))
        eplb = s.get("eplb")
        if not eplb:
            return
        yield GaugeMetricFamily("dsv4_eplb_balancedness", "Mean over layers of mean/max rank load",
                                value=eplb["balancedness"])
        per_layer = GaugeMetricFamily("dsv4_eplb_layer_balancedness", "Mean/max rank load", labels=["layer"])
        for layer, value in enumerate(eplb["balancedness_per_layer"]):
            per_layer.add_metric([str(layer)], value)
        yield per_layer
        yield CounterMetricFamily("dsv4_eplb_rebalances", "Rebalances done", value=eplb["rebalances_total"])
        yield CounterMetricFamily("dsv4_eplb_rebalance_seconds", "Time spent rebalancing",
                                  value=eplb["rebalance_seconds_total"])
        yield CounterMetricFamily("dsv4_eplb_bytes_moved", "Expert weight bytes copied",
                                  value=eplb["bytes_moved_total"])
        ranks = s.get("ranks", {})
        for key, name, doc, kind in [
                ("tokens_window", "dsv4_ep_rank_tokens_window", "Routed (token, expert) choices per EP rank "
                 "over the EPLB window", GaugeMetricFamily),
                ("moe_seconds_last_step", "dsv4_ep_rank_moe_seconds_last_step",
                 "Seconds each EP rank spent in its expert slots in the last step", GaugeMetricFamily),
                ("moe_seconds_total", "dsv4_ep_rank_moe_seconds", "Seconds each EP rank spent in its "
                 "expert slots", CounterMetricFamily)]:
            if key in ranks:
                family = kind(name, doc, labels=["rank"])
                for rank, value in enumerate(ranks[key]):
                    family.add_metric([str(rank)], value)
                yield family


# ====================================================================== app

def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: a declared body over `limit` bytes gets 413 before any parsing; a chunked
    body that grows past it is cut off (the app then sees a disconnect, never a huge body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return {"type": "http.disconnect"} if received > self.limit else message
        await self.app(scope, counting_receive, send)


def create_app(load: Callable[[], Runtime], *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app starts at once and answers /health 503 until `load()` (run on a thread) returns."""
    metrics = Metrics()
    holder: dict[str, Any] = {"runtime": None, "error": None}

    def load_in_background():
        try:
            runtime = load()
            runtime.engine.start()
            holder["runtime"] = runtime
        except Exception as error:  # noqa: BLE001 - reported by /health, not a crash
            log.error("model load failed: %s", error)
            holder["error"] = error

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="load", daemon=True).start()
        yield
        if holder["runtime"] is not None:
            await asyncio.to_thread(holder["runtime"].engine.drain, 0.0)

    app = FastAPI(title="dsv4-mini", lifespan=lifespan)
    app.state.metrics, app.state.holder = metrics, holder
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)

    def runtime() -> Runtime:
        rt = holder["runtime"]
        if rt is None:
            raise APIError(503, "model is still loading" if holder["error"] is None else
                           f"model failed to load: {holder['error']}", type="server_error",
                           code="not_ready", headers={"Retry-After": "1"})
        return rt

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    protected = [Depends(check_api_key)]

    @app.exception_handler(APIError)
    async def on_api_error(request, error: APIError):
        return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            message, param = "request body is not valid JSON", None
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), code=None, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request, error: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", type="server_error")

    @app.get("/health")
    async def health():
        if holder["runtime"] is None or not holder["runtime"].engine.alive:
            return error_response(503, "loading" if holder["error"] is None else "model failed to load",
                                  type="server_error", code="not_ready")
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=protected)
    async def list_models():
        rt = runtime()
        return {"object": "list", "data": [{"id": rt.model_name, "object": "model", "created": 0,
                                            "owned_by": "dsv4-mini", "max_model_len": rt.max_seq_len}]}

    @app.get("/metrics")
    async def prometheus_metrics():
        rt = holder["runtime"]
        if rt is not None:
            metrics.snapshot = await asyncio.wrap_future(rt.engine.call(lambda: engine_snapshot(rt)))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", dependencies=protected)
    async def completions(body: CompletionRequest, request: Request):
        rt = runtime()
        check_model(rt, body.model)
        reject_unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported (n=1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = rt.tokenizer.encode(prompt)
        else:
            if not prompt or any(not 0 <= t < rt.vocab_size for t in prompt):
                raise APIError(400, f"token-id prompts need 1+ ids in [0, {rt.vocab_size})", "prompt")
            prompt_ids = list(prompt)
        params, stop = sampling_params(body, len(prompt_ids), rt.max_seq_len, rt.vocab_size, 16)
        return await respond(rt, request, body, prompt_ids, params, stop, chat=False)

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(body: ChatRequest, request: Request):
        rt = runtime()
        check_model(rt, body.model)
        reject_unsupported(body)
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if body.max_completion_tokens is not None:
            if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens disagree", "max_completion_tokens")
            body.max_tokens = body.max_completion_tokens
        turns = []
        for m in body.messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
            turns.append(("system" if m.role == "developer" else m.role, text))
        prompt_ids = rt.tokenizer.encode(rt.tokenizer.render_chat(turns), add_bos=False)
        params, stop = sampling_params(body, len(prompt_ids), rt.max_seq_len, rt.vocab_size, None)
        return await respond(rt, request, body, prompt_ids, params, stop, chat=True)

    async def respond(rt, request, body, prompt_ids, params, stop, chat: bool):
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        events = generate(rt, metrics, prompt_ids, params, stop)
        first = await anext(events)          # raises QueueFull → 503 before any byte is sent
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": rt.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse(head, first, events, chat, include_usage),
                                     media_type="text/event-stream")
        text, finish, usage = "", None, first[2]
        async for delta, finish, usage in prepend(first, events):
            text += delta
            if await request.is_disconnected():
                await events.aclose()
                break
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice], "usage": usage}

    async def sse(head, first, events, chat, include_usage):
        def chunk(delta, finish):
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        usage = first[2]
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            async for delta, finish, usage in prepend(first, events):
                if delta or finish:
                    yield chunk(({"content": delta} if delta else {}) if chat else delta, finish)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()   # client gone mid-stream: aborts the request in the engine

    @app.get("/eplb/state", dependencies=protected)
    async def eplb_state():
        rt = runtime()
        if rt.eplb is None:
            return {"enabled": False}
        return await asyncio.wrap_future(rt.engine.call(lambda: {"enabled": True, **rt.eplb.state(),
                                                                 "ranks": rank_stats(rt)}))

    @app.post("/eplb/rebalance", dependencies=protected)
    async def eplb_rebalance():
        rt = require_eplb()
        return await asyncio.wrap_future(rt.engine.call(lambda: rt.eplb.rebalance(force=True)))

    @app.post("/start_expert_distribution_record", dependencies=protected)
    async def start_record():
        rt = require_eplb()
        await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.start))
        return {"status": "recording"}

    @app.post("/stop_expert_distribution_record", dependencies=protected)
    async def stop_record():
        rt = require_eplb()
        await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.stop))
        return {"status": "stopped"}

    @app.post("/dump_expert_distribution_record", dependencies=protected)
    async def dump_record():
        rt = require_eplb()
        if rt.record_dir is None:
            raise APIError(400, "start the server with --record-dir DIR to dump records", code="no_record_dir")
        path = rt.record_dir / f"expert_distribution_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}.pt"
        record = await asyncio.wrap_future(rt.engine.call(
            lambda: rt.eplb.recorder.dump(path, rt.eplb.location.phy2log)))
        return {"path": str(path), "steps": int(record["logical_count"].shape[0])}

    def require_eplb() -> Runtime:
        rt = runtime()
        if rt.eplb is None:
            raise APIError(400, "expert load tracking is off (start the server with --eplb)", code="eplb_disabled")
        return rt

    return app


def check_model(rt: Runtime, name: str) -> None:
    if name != rt.model_name:
        raise APIError(404, f"The model '{name}' does not exist (this server serves '{rt.model_name}')",
                       param="model", code="model_not_found")


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item


async def generate(rt: Runtime, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                   stop: list[str]):
    """Yields (text delta, finish_reason or None, usage). The first item comes at once (empty) so the
    caller learns about a full queue before it commits to a response; closing the generator early
    aborts the request in the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_token(token, reason):   # engine thread → event loop
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (token, reason))
        except RuntimeError:       # loop already closed at shutdown
            pass

    seq = Sequence(prompt_ids, params, on_token)
    try:
        rt.engine.submit(seq)
    except QueueFull:
        raise APIError(503, "server is busy: the request queue is full", type="server_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    start = last = time.monotonic()
    stream, num_generated, finish = TextStream(rt.tokenizer, stop), 0, None

    def usage():
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": num_generated,
                "total_tokens": len(prompt_ids) + num_generated}
    metrics.prompt_tokens.inc(len(prompt_ids))
    try:
        yield "", None, usage()
        while finish is None:
            token, finish = await queue.get()
            delta = ""
            if token is not None:
                now = time.monotonic()
                if num_generated == 0:
                    metrics.ttft.observe(now - start)
                else:
                    metrics.tpot.observe(now - last)
                last = now
                num_generated += 1
                metrics.generation_tokens.inc()
                delta = stream.push(token)
                if stream.stopped:
                    finish = "stop"
                    rt.engine.abort(seq)
            if finish is not None:
                delta += stream.finish()
            if delta or finish:
                yield delta, finish, usage()
    finally:
        if finish is None:
            rt.engine.abort(seq)
        metrics.requests.labels(finish or "abort").inc()


def rank_stats(rt: Runtime) -> dict:
    """Per EP rank: routed-token choices over the EPLB window (virtual or real ranks), and, under
    torchrun, the seconds each rank spent in its own expert slots (last step, and in total)."""
    stats = {}
    if rt.eplb is not None:
        stats["tokens_window"] = rt.eplb.state_rank_tokens()
    if rt.peers is not None:
        stats["moe_seconds_last_step"] = rt.peers.rank_moe_seconds.tolist()
        stats["moe_seconds_total"] = rt.peers.rank_moe_seconds_total.tolist()
    return stats


def engine_snapshot(rt: Runtime) -> dict:
    """Runs on the engine thread (between steps)."""
    s = rt.engine.stats
    snap = {"requests_running": s.running, "requests_waiting": s.waiting,
            "cache_slots_in_use": s.slots_in_use, "cache_slots_total": s.num_slots}
    if rt.eplb is not None:
        snap["eplb"] = rt.eplb.metrics()
    snap["ranks"] = rank_stats(rt)
    return snap


# ====================================================================== CLI

PRESETS = ("mini", "tiny", "flash")
MAX_EPLB_WINDOW = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serve.py", description="OpenAI-compatible server for DeepSeek-V4 MoE models with EPLB.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-path", metavar="DIR",
                   help="checkpoint directory (config.json, *.safetensors, tokenizer.json); default: the "
                        "built-in model of --preset with deterministic random weights and built-in tokenizer")
    m.add_argument("--preset", choices=PRESETS, default="mini",
                   help="built-in config when --model-path is not given (tiny: for tests)")
    m.add_argument("--num-layers", type=int, metavar="N",
                   help="keep only the first N layers (e.g. a released-width config truncated for a bench)")
    m.add_argument("--served-model-name", help="model id in the API (default: dsv4-<preset> or the directory name)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype; auto = float32 on CPU (exact, batch-stable greedy), bfloat16 on CUDA")
    m.add_argument("--seed", type=int, default=0, help="seed for built-in weights and for unseeded requests")
    m.add_argument("--init-device", choices=("cpu", "model"), default="cpu",
                   help="where the built-in random weights are drawn: cpu = the exact, machine-independent "
                        "init; model = on the model's device (fast for released widths, e.g. --preset flash: "
                        "on CUDA the weights differ from the cpu init, deterministic per GPU type)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1, EPLB and record endpoints")
    s.add_argument("--max-batch-size", type=int, default=64, help="KV cache slots = requests running at once")
    s.add_argument("--max-seq-len", type=int, default=1024, help="prompt + completion tokens per request")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill forward")
    s.add_argument("--prefill-tail", type=int, default=-1,
                   help="the last N prompt tokens of a request go through the batched one-token (CUDA-graph) "
                        "step instead of an eager prefill forward; -1 = auto (64 on CUDA, 0 on CPU)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--drain-seconds", type=float, default=6.0,
                   help="on SIGTERM, let in-flight requests finish this long, then end them")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    e = p.add_argument_group("expert-parallel load balancing")
    e.add_argument("--eplb", action="store_true", help="count expert load and rebalance periodically")
    e.add_argument("--ep-size", type=int, default=1,
                   help="expert-parallel ranks (virtual ranks in one process without torchrun)")
    e.add_argument("--ep-num-redundant-experts", type=int, default=0, help="extra physical slots R (P = E + R)")
    e.add_argument("--eplb-rebalance-num-iterations", type=int, default=100, help="forward steps between rebalances")
    e.add_argument("--eplb-window", type=int, default=100, help="recent steps whose load a rebalance uses")
    e.add_argument("--eplb-min-balancedness", type=float, default=1.0,
                   help="skip a due rebalance while balancedness is at least this (1.0 = always rebalance)")
    e.add_argument("--eplb-algorithm", choices=("global", "hierarchical"), default="global",
                   help="hierarchical: balance experts over --eplb-num-nodes first, replicate only inside a node")
    e.add_argument("--eplb-num-nodes", type=int, default=1,
                   help="nodes the --ep-size ranks span (hierarchical needs > 1 and a divisor of --ep-size)")
    e.add_argument("--eplb-layers-per-step", type=int, default=0,
                   help="layers moved per forward step (0 = all layers at once)")
    e.add_argument("--init-expert-location", metavar="FILE",
                   help="initial placement from a record dump (.pt with logical_count) or a location file")
    e.add_argument("--record-dir", metavar="DIR", help="where /dump_expert_distribution_record writes")
    e.add_argument("--eplb-canary", action="store_true",
                   help="after every cross-rank expert move, check that each slot holds its planned expert")
    e.add_argument("--ep-timeout", type=float, default=20.0,
                   help="seconds a collective may wait for a peer rank before the server gives up (torchrun)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """One clear line per bad value (argparse.error exits 2 with the usage line, no traceback)."""
    positive = ["max_batch_size", "max_seq_len", "max_queue", "prefill_chunk", "max_body_bytes", "ep_size",
                "eplb_rebalance_num_iterations", "eplb_window"]
    for name in positive:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 < a.port < 65536:
        p.error(f"--port must be in 1..65535, got {a.port}")
    if a.ep_num_redundant_experts < 0 or a.eplb_layers_per_step < 0 or a.drain_seconds < 0:
        p.error("--ep-num-redundant-experts, --eplb-layers-per-step and --drain-seconds must be >= 0")
    if a.num_layers is not None and a.num_layers < 1:
        p.error(f"--num-layers must be >= 1, got {a.num_layers}")
    if not 0.0 <= a.eplb_min_balancedness <= 1.0:
        p.error(f"--eplb-min-balancedness must be in [0, 1], got {a.eplb_min_balancedness}")
    if a.model_path is not None and not (Path(a.model_path) / "config.json").is_file():
        p.error(f"--model-path {a.model_path}: no config.json there")
    if a.init_expert_location is not None and not Path(a.init_expert_location).is_file():
        p.error(f"--init-expert-location {a.init_expert_location}: no such file")
    if a.record_dir is not None and Path(a.record_dir).exists() and not Path(a.record_dir).is_dir():
        p.error(f"--record-dir {a.record_dir}: not a directory")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available")
    if a.model_path is None:
        import dsv4_mini
        num_experts = getattr(dsv4_mini.ModelConfig, a.preset)().n_routed_experts
    else:
        try:
            num_experts = int(json.loads((Path(a.model_path) / "config.json").read_text())["n_routed_experts"])
        except (ValueError, KeyError, TypeError) as error:
            p.error(f"--model-path {a.model_path}: config.json has no usable n_routed_experts ({error})")
    if (num_experts + a.ep_num_redundant_experts) % a.ep_size:
        p.error(f"experts ({num_experts}) + --ep-num-redundant-experts ({a.ep_num_redundant_experts}) "
                f"must be a multiple of --ep-size ({a.ep_size})")
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1
    if world > 1 and a.ep_size != world:
        p.error(f"--ep-size ({a.ep_size}) must equal the number of torchrun processes ({world})")
    if a.eplb_algorithm == "hierarchical" and not (a.eplb_num_nodes > 1 and a.ep_size % a.eplb_num_nodes == 0):
        p.error(f"--eplb-algorithm hierarchical needs --eplb-num-nodes > 1 dividing --ep-size ({a.ep_size}), "
                f"got {a.eplb_num_nodes}")
    if a.eplb_window > MAX_EPLB_WINDOW:
        p.error(f"--eplb-window must be <= {MAX_EPLB_WINDOW} steps (the ring is preallocated), got {a.eplb_window}")
    if a.ep_timeout <= 0:
        p.error(f"--ep-timeout must be > 0, got {a.ep_timeout}")
    if a.record_dir is not None and not a.eplb:
        p.error("--record-dir needs --eplb (expert load is only counted with --eplb)")
    if a.init_device != "cpu" and a.model_path is not None:
        p.error("--init-device only applies to the built-in random weights, not to --model-path")


def pick_device(args: argparse.Namespace):
    import torch
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per rank
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device != "cpu" else torch.float32}[args.dtype]
    return device, dtype


def build_model_for_rank(args: argparse.Namespace, device, dtype, ep_rank: int = 0, ep_size: int = 1):
    """The model with this rank's expert slots (all of them without torchrun): (model, config)."""
    import torch
    import dsv4_mini
    import weights
    config = (dsv4_mini.ModelConfig.from_pretrained(args.model_path) if args.model_path
              else getattr(dsv4_mini.ModelConfig, args.preset)())
    if args.num_layers is not None:
        config = config.truncated(min(args.num_layers, config.num_hidden_layers))
    num_physical = config.n_routed_experts + args.ep_num_redundant_experts
    if num_physical % args.ep_size:
        raise ValueError(f"experts + redundant ({num_physical}) must be a multiple of --ep-size {args.ep_size}")
    torch.manual_seed(args.seed)
    if args.model_path:
        model = weights.load_model(args.model_path, device=device, dtype=dtype, num_layers=args.num_layers,
                                     num_physical_experts=num_physical, ep_rank=ep_rank, ep_size=ep_size)
    else:
        model = weights.build_model(config, seed=args.seed, device=device, dtype=dtype,
                                      num_physical_experts=num_physical, ep_rank=ep_rank, ep_size=ep_size,
                                      init_device=device if args.init_device == "model" else None)
    return model, config


def build_runtime(args: argparse.Namespace) -> Runtime:
    """Model + tokenizer + engine (+ EPLB) from the CLI flags. Runs on the load thread.

    Under torchrun this is rank 0: it joins the process group, holds only its own P/G expert slots,
    and hands the engine an `ep.LockstepModel`, so every forward, cache reset and expert move is
    first announced to the other ranks (which run `worker_main`).
    """
    import torch
    import dsv4_mini
    import weights
    import ep
    device, dtype = pick_device(args)
    peers = mover = None
    if ep.launched_by_torchrun():
        rank, world = ep.init_expert_parallel(torch.device(device))
        model, config = build_model_for_rank(args, device, dtype, rank, world)
        group = ep.serving_group(args.ep_timeout)
        model.ep_group, model.moe_timer = group, dsv4_mini.MoETimer()
        channel = ep.StepChannel(group, device)
        peers = ep.LockstepModel(model, channel, group)
        mover = ep.LockstepMover(model, channel, ep.DistributedMover(rank, world, group), canary=args.eplb_canary)
    else:
        model, config = build_model_for_rank(args, device, dtype)
    if args.model_path:
        tokenizer_file = Path(args.model_path) / "tokenizer.json"
        tokenizer = (TextTokenizer.from_file(tokenizer_file) if tokenizer_file.is_file()
                     else TextTokenizer(builtin_tokenizer(config.vocab_size)))
        name = args.served_model_name or Path(args.model_path).resolve().name
    else:
        tokenizer = TextTokenizer(builtin_tokenizer(config.vocab_size))
        name = args.served_model_name or f"dsv4-{args.preset}"
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}")
    eplb_manager = make_eplb(args, model, mover) if args.eplb else None
    record_dir = None
    if args.record_dir:
        record_dir = Path(args.record_dir).resolve()
        record_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(peers or model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    max_queue=args.max_queue, eos_token_ids=tokenizer.eos_ids, prefill_chunk=args.prefill_chunk,
                    seed=args.seed, eplb=eplb_manager, peers=peers,
                    decode_graphs=peers is None, num_token_ids=tokenizer.vocab_size,
                    prefill_tail=args.prefill_tail if args.prefill_tail >= 0 else
                    (64 if device != "cpu" and peers is None else 0))
    return Runtime(engine=engine, tokenizer=tokenizer, model_name=name, max_seq_len=args.max_seq_len,
                   vocab_size=config.vocab_size, eplb=eplb_manager, record_dir=record_dir, peers=peers)


def worker_main(args: argparse.Namespace) -> int:
    """Ranks 1..G-1 under torchrun: hold this rank's expert slots and follow rank 0's steps."""
    import torch
    import dsv4_mini
    import weights
    import ep
    # SIGTERM/SIGINT reach every rank when torchrun is stopped: rank 0 drains the requests in flight,
    # which needs the other ranks' experts, and then tells them to stop. A worker that outlives rank 0
    # ends by the collective timeout.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device, dtype = pick_device(args)
    rank, world = ep.init_expert_parallel(torch.device(device))
    model, _ = build_model_for_rank(args, device, dtype, rank, world)
    group = ep.serving_group(args.ep_timeout)
    model.ep_group, model.moe_timer = group, dsv4_mini.MoETimer()
    log.info("rank %d/%d: experts slots %d..%d, following rank 0", rank, world,
             rank * model.slots_per_rank, (rank + 1) * model.slots_per_rank - 1)
    ep.run_worker(model, ep.StepChannel(group, device), ep.DistributedMover(rank, world, group),
                  canary=args.eplb_canary)
    return 0


def make_eplb(args: argparse.Namespace, model, mover=None):
    import eplb
    config = eplb.EPLBConfig(num_ranks=args.ep_size, rebalance_num_iterations=args.eplb_rebalance_num_iterations,
                             window=args.eplb_window, algorithm=args.eplb_algorithm,
                             num_nodes=args.eplb_num_nodes,
                             layers_per_step=args.eplb_layers_per_step or None,
                             min_balancedness=args.eplb_min_balancedness,
                             init_expert_location=args.init_expert_location)
    return eplb.EPLBManager(model, config, mover=mover)


def watch_engine(app: FastAPI, poll_s: float = 0.2, grace_s: float = 1.0) -> None:
    """A dead engine thread (under torchrun: a lost rank) must not leave a server that accepts
    requests it can never answer. /health reports 503 at once; after a short grace, exit 1."""
    holder = app.state.holder
    while True:
        time.sleep(poll_s)
        runtime = holder["runtime"]
        engine = runtime.engine if runtime is not None else None
        if engine is not None and engine.crashed:
            log.error("engine died: %s; exiting", engine.last_error)
            time.sleep(grace_s)
            logging.shutdown()
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", 0)) > 0:
        return worker_main(args)
    import uvicorn
    started = time.monotonic()

    failed: list[str] = []

    def load() -> Runtime:
        try:
            runtime = build_runtime(args)
        except Exception as error:  # bad checkpoint / location file: one line, exit 1
            failed.append(f"serve.py: error: {error}")
            server.should_exit = True
            raise
        log.info("ready in %.1f s: %s on %s, %d slots", time.monotonic() - started, runtime.model_name,
                 runtime.engine.device, args.max_batch_size)
        return runtime

    app = create_app(load, api_key=args.api_key, max_body_bytes=args.max_body_bytes)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: stop admitting, let the engine finish (or end) in-flight requests, then exit."""

        def handle_exit(self, sig, frame):
            runtime = app.state.holder["runtime"]
            if runtime is not None and not self.should_exit:
                threading.Thread(target=runtime.engine.drain, args=(args.drain_seconds,), daemon=True).start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutdown (exit status -15); a drained shutdown is exit 0.
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_seconds + 2)
    server = DrainingServer(config)
    threading.Thread(target=watch_engine, args=(app,), name="watchdog", daemon=True).start()
    server.run()
    if failed:
        print(failed[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
