"""The OpenAI-compatible HTTP app: request validation, the routes, SSE streaming, Prometheus metrics.

Request path: JSON body → validated `CompletionRequest`/`ChatRequest` → token ids → `engine.Sequence`
→ engine thread (engine.py) → token ids back through an asyncio queue → `TextStream` (UTF-8 and
stop-string hold-back) → SSE chunks or one JSON body.

`create_app(load)` wires the app; the handlers below are plain functions that find what they share
on `request.app.state`: `runtime` (None until the background load has finished), `load_error`,
`metrics` and `api_key`.

Hostile input ends in a 4xx in OpenAI's error shape, never a 500: the API key is checked (in constant
time) before the body is read, the body size before it is parsed, text that is not Unicode (a lone
surrogate escape such as "\\ud800") before it reaches the tokenizer, and chat text never becomes a
control token (text.py).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

import dashboard
from engine import Engine, QueueFull, SamplingParams, Sequence
from text import TextStream, TextTokenizer

log = logging.getLogger("dsv4.serve")

# ====================================================================== errors and request schemas

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


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def escaped_surrogates(text: str | None) -> str | None:
    """`text` with any lone surrogate written as its escape ("\\ud800"), so UTF-8 can encode it."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate_at(body: Any) -> str | None:
    """Where in a parsed JSON body a string (or key) holds a lone UTF-16 surrogate, as "a.0.b";
    None if nowhere. JSON may spell one ("\\ud800"), but it is no character: UTF-8 cannot encode it."""
    pending = [((), body)]              # a loop, not recursion: JSON nests as deep as its parser allows
    while pending:
        path, value = pending.pop()
        if isinstance(value, str) and LONE_SURROGATE.search(value):
            return ".".join(map(str, path)) or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                if LONE_SURROGATE.search(key):
                    return ".".join(map(str, path + (escaped_surrogates(key),)))
                pending.append((path + (key,), item))
        elif isinstance(value, list):
            pending.extend((path + (i,), item) for i, item in enumerate(value))
    return None


class SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    @model_validator(mode="before")
    @classmethod
    def text_is_unicode(cls, body: Any) -> Any:
        where = lone_surrogate_at(body)
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "{param}: a lone surrogate escape (\\ud800-\\udfff) "
                                      "is not text", {"param": where})
        return body

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
    min_p: float = Field(0.0, description="extension (vLLM): 0 = off")
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    # Known OpenAI fields this server does not implement: accepted only at their no-op value,
    # anything else is a 400 that names the field.
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None      # the sampled token's logprob and the top `logprobs`
    echo: bool | None = False        # the prompt comes back in front of the text (with its logprobs)
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
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None


NO_OP_VALUES = {"logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None,), "tools": (None,),
                "tool_choice": (None, "none"), "functions": (None,), "function_call": (None, "none"),
                "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"})}
MAX_N = 16          # choices per request
MAX_LOGPROBS = 20   # top logprobs per token (OpenAI: 5 for completions, 20 for chat)


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
    if not 0.0 <= req.min_p <= 1.0:
        raise APIError(400, f"min_p must be in [0, 1], got {req.min_p}", "min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= (getattr(req, name) or 0.0) <= 2.0:
            raise APIError(400, f"{name} must be in [-2, 2], got {getattr(req, name)}", name)
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {req.n}", "n")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise APIError(400, "seed must fit in 64 bits", "seed")
    logprobs, prompt_logprobs = requested_logprobs(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
        raise APIError(400, "stop takes at most 4 non-empty strings of at most 256 characters", "stop")
    stop_ids = req.stop_token_ids or []
    if len(stop_ids) > 64 or any(not 0 <= t < vocab_size for t in stop_ids):
        raise APIError(400, f"stop_token_ids takes at most 64 ids in [0, {vocab_size})", "stop_token_ids")
    room = max_seq_len - prompt_len
    max_tokens = req.max_tokens if req.max_tokens is not None else (default_max_tokens or room)
    least = 0 if getattr(req, "echo", False) else 1  # with echo, 0 = the prompt only (e.g. its logprobs)
    if max_tokens < least:
        raise APIError(400, f"max_tokens must be at least {least}, got {max_tokens}", "max_tokens")
    if prompt_len + max_tokens > max_seq_len:
        raise APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                            f"{max_tokens} for the completion).", "max_tokens", "context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=max(req.top_k, 0), min_p=req.min_p, presence_penalty=req.presence_penalty or 0.0,
                            frequency_penalty=req.frequency_penalty or 0.0, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs, seed=req.seed, stop_token_ids=tuple(stop_ids),
                            ignore_eos=req.ignore_eos)
    return params, stop


def requested_logprobs(req: SamplingFields) -> tuple[int | None, int | None]:
    """-> (top logprobs per output token, per prompt token), None = not asked. Chat: `logprobs` true,
    with `top_logprobs` of them; completions: `logprobs` = how many, and with `echo` the prompt's too."""
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        k, name, prompt_k = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs", None
    else:
        k, name = req.logprobs, "logprobs"
        prompt_k = k if req.echo else None
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", name)
    return k, prompt_k


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
        yield CounterMetricFamily("dsv4_eplb_rebalance_checks", "Due or forced rebalance decisions taken",
                                  value=eplb["rebalance_checks_total"])
        skipped = CounterMetricFamily("dsv4_eplb_rebalances_skipped", "Rebalances decided against, by reason",
                                      labels=["reason"])
        for reason, count in eplb["rebalances_skipped_by_reason"].items():
            skipped.add_metric([reason], count)
        yield skipped
        for key, name, doc in [
                ("last_gain_predicted", "dsv4_eplb_last_gain_predicted", "Last decision: the plan's balancedness "
                 "gain on held-out steps"),
                ("last_gain_margin", "dsv4_eplb_last_gain_margin", "Last decision: the gain a move had to clear "
                 "(min gain + sigmas x noise)")]:
            if eplb[key] is not None:
                yield GaugeMetricFamily(name, doc, value=eplb[key])
        yield GaugeMetricFamily("dsv4_eplb_rebalance_layers_left", "Layers a started rebalance still has to move",
                                value=eplb["rebalance_layers_left"])
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


# ====================================================================== the app

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every non-2xx answer of this server."""
    error: ErrorDetail


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    # an error may quote the client's text, lone surrogates and all
    message, param = escaped_surrogates(message), escaped_surrogates(param)
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


# Polled by load balancers and Prometheus: open under --api-key (as in sglang), quiet in the access log.
PROBE_PATHS = ("/health", "/health_generate", "/metrics")


def needs_api_key(path: str) -> bool:
    """Probes and the dashboard page with its static files are open; the page asks for the key and
    sends it with every data request (/eplb/state, /dashboard/route, ...)."""
    return path not in PROBE_PATHS and not dashboard.is_page_path(path)


class APIKeyCheck:
    """ASGI middleware: under --api-key every path but PROBE_PATHS (the docs and schema too) needs
    'Authorization: Bearer KEY' (scheme in any case). Checked before the body is read, so without the
    key nothing is said about the body; the key is compared in constant time."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and needs_api_key(scope["path"]) \
                and not self.authorized(scope):
            response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      type="authentication_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def authorized(self, scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class BodySizeLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before any parsing, whether its size is
    declared (Content-Length) or it arrives chunked. The body is read here, at most `limit` bytes of
    it held, and handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return                  # the client left before its body was complete: no one to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def receive_body_then_rest():   # later reads report the client leaving (streaming)
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message
        await self.app(scope, receive_body_then_rest, send)

    async def too_large(self, scope, receive, send):
        response = error_response(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
        await response(scope, receive, send)


async def on_api_error(request: Request, error: APIError):
    return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)


async def on_validation_error(request: Request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "lone_surrogate":
        message, param = first["msg"], first["ctx"]["param"]
    elif first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        message, param = "request body is not valid JSON", None
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return error_response(400, message, param=param, code="invalid_request")


async def on_http_error(request: Request, error: StarletteHTTPException):
    return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))


async def on_unexpected(request: Request, error: Exception):
    log.exception("unhandled error")
    return error_response(500, "internal server error", type="server_error")


EXCEPTION_HANDLERS = {APIError: on_api_error, RequestValidationError: on_validation_error,
                      StarletteHTTPException: on_http_error, Exception: on_unexpected}


def load_in_background(app: FastAPI, load: Callable[[], Runtime]) -> None:
    try:
        runtime = load()
        runtime.engine.start()
        app.state.runtime = runtime
    except Exception as error:  # noqa: BLE001 - reported by /health, not a crash
        log.error("model load failed: %s", error)
        app.state.load_error = error


@asynccontextmanager
async def lifespan(app: FastAPI, load: Callable[[], Runtime]):
    threading.Thread(target=load_in_background, args=(app, load), name="load", daemon=True).start()
    yield
    if app.state.runtime is not None:
        await asyncio.to_thread(app.state.runtime.engine.drain, 0.0)


def create_app(load: Callable[[], Runtime], *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app starts at once and answers /health 503 until `load()` (run on a thread) returns."""
    app = FastAPI(title="dsv4-mini", lifespan=partial(lifespan, load=load), exception_handlers=EXCEPTION_HANDLERS)
    app.state.runtime = None         # set by the load thread once the engine runs
    app.state.load_error = None      # why the load failed (then /health stays 503)
    app.state.metrics = Metrics()
    app.state.api_key = api_key
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.state.metrics.registry.register(dashboard.EPLBMoveMetrics(app.state.metrics))
    app.add_middleware(APIKeyCheck, api_key=api_key)   # added last = runs first: no key, no body read
    app.include_router(router)
    app.include_router(dashboard.page_router)  # public (see needs_api_key): the page holds no data
    app.include_router(dashboard.api_router, responses=ERROR_RESPONSES)
    app.openapi = partial(openapi_schema, app)
    return app


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus what it cannot see: the API key that APIKeyCheck asks for."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        if app.state.api_key is not None:
            schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http",
                                                                                 "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if needs_api_key(path):
                        operation["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


# ====================================================================== what the handlers check

def loaded_runtime(request: Request) -> Runtime:
    state = request.app.state
    if state.runtime is None:
        raise APIError(503, "model is still loading" if state.load_error is None else
                       f"model failed to load: {state.load_error}", type="server_error",
                       code="not_ready", headers={"Retry-After": "1"})
    return state.runtime


def eplb_runtime(request: Request) -> Runtime:
    rt = loaded_runtime(request)
    if rt.eplb is None:
        raise APIError(400, "expert load tracking is off (start the server with --eplb)", code="eplb_disabled")
    return rt


def check_model(rt: Runtime, name: str) -> None:
    if name != rt.model_name:
        raise APIError(404, f"The model '{name}' does not exist (this server serves '{rt.model_name}')",
                       param="model", code="model_not_found")


def model_card(rt: Runtime) -> dict:
    return {"id": rt.model_name, "object": "model", "created": 0, "owned_by": "dsv4-mini",
            "max_model_len": rt.max_seq_len}


# ====================================================================== routes

# What the schema says about errors (FastAPI would otherwise promise 422s this server never sends).
ERROR_RESPONSES = {
    "4XX": {"model": ErrorBody, "description": "invalid request (400), missing API key (401), unknown "
                                               "model or path (404), body too large (413)"},
    "5XX": {"model": ErrorBody, "description": "still loading, busy or unhealthy (503, with Retry-After)"}}
SSE_OR_JSON = {200: {"description": "one JSON body, or with `stream` server-sent events",
                     "content": {"text/event-stream": {}}}}
PROMETHEUS_TEXT = {200: {"description": "Prometheus text format",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}}
HEALTH_GENERATE_TIMEOUT_S = 20.0   # as sglang's /health_generate

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    if state.runtime is None or not state.runtime.engine.alive:
        return error_response(503, "loading" if state.load_error is None else "model failed to load",
                              type="server_error", code="not_ready")
    return {"status": "ok"}


@router.get("/health_generate")
async def health_generate(request: Request):
    """sglang's deep health check: 200 once the engine has generated one token for a one-token
    prompt, 503 if it cannot within HEALTH_GENERATE_TIMEOUT_S. Not counted in the request metrics."""
    rt = loaded_runtime(request)
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    def on_token(token, reason):   # engine thread → event loop
        try:
            loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(token is not None))
        except RuntimeError:       # loop already closed at shutdown
            pass
    seq = Sequence([rt.tokenizer.bos_id or 0], SamplingParams(max_tokens=1, temperature=0.0), on_token)
    try:
        rt.engine.submit(seq)
        generated = await asyncio.wait_for(answered, HEALTH_GENERATE_TIMEOUT_S)
    except (QueueFull, asyncio.TimeoutError):
        generated = False
    finally:
        rt.engine.abort(seq)
    if not generated:
        log.warning("/health_generate: the engine did not generate a token")
        raise APIError(503, f"the engine did not generate a token (queue full, or none within "
                            f"{HEALTH_GENERATE_TIMEOUT_S:g} s)",
                       type="server_error", code="unhealthy", headers={"Retry-After": "1"})
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(loaded_runtime(request))]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request):
    rt = loaded_runtime(request)
    check_model(rt, model_id)
    return model_card(rt)


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
async def prometheus_metrics(request: Request):
    metrics, rt = request.app.state.metrics, request.app.state.runtime
    if rt is not None:
        metrics.snapshot = await asyncio.wrap_future(rt.engine.call(partial(engine_snapshot, rt)))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/completions", responses=SSE_OR_JSON)
async def completions(body: CompletionRequest, request: Request):
    rt = loaded_runtime(request)
    check_model(rt, body.model)
    reject_unsupported(body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported (use n for several choices)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = rt.tokenizer.encode(prompt)
    else:
        if not prompt or any(not 0 <= t < rt.vocab_size for t in prompt):
            raise APIError(400, f"token-id prompts need 1+ ids in [0, {rt.vocab_size})", "prompt")
        prompt_ids = list(prompt)
    params, stop = sampling_params(body, len(prompt_ids), rt.max_seq_len, rt.vocab_size, 16)
    echo = None
    if body.echo:
        echo = prompt if isinstance(prompt, str) else rt.tokenizer.decode(prompt_ids)
    return await respond(request, rt, body, prompt_ids, params, stop, chat=False, echo=echo)


@router.post("/v1/chat/completions", responses=SSE_OR_JSON)
async def chat_completions(body: ChatRequest, request: Request):
    rt = loaded_runtime(request)
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
    prompt_ids = rt.tokenizer.encode_chat(turns)
    params, stop = sampling_params(body, len(prompt_ids), rt.max_seq_len, rt.vocab_size, None)
    return await respond(request, rt, body, prompt_ids, params, stop, chat=True)


@router.get("/eplb/state")
async def eplb_state(request: Request):
    rt = loaded_runtime(request)
    if rt.eplb is None:
        return {"enabled": False}
    return await asyncio.wrap_future(rt.engine.call(lambda: {"enabled": True, **rt.eplb.state(),
                                                             "ranks": rank_stats(rt)}))


@router.post("/eplb/rebalance")
async def eplb_rebalance(request: Request):
    rt = eplb_runtime(request)
    return await asyncio.wrap_future(rt.engine.call(partial(rt.eplb.rebalance, force=True)))


@router.post("/start_expert_distribution_record")
@router.get("/start_expert_distribution_record")     # sglang takes GET and POST: scripts use both
async def start_record(request: Request):
    rt = eplb_runtime(request)
    await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.start))
    return {"status": "recording"}


@router.post("/stop_expert_distribution_record")
@router.get("/stop_expert_distribution_record")     # sglang takes GET and POST: scripts use both
async def stop_record(request: Request):
    rt = eplb_runtime(request)
    await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.stop))
    return {"status": "stopped"}


@router.post("/dump_expert_distribution_record")
@router.get("/dump_expert_distribution_record")     # sglang takes GET and POST: scripts use both
async def dump_record(request: Request):
    rt = eplb_runtime(request)
    if rt.record_dir is None:
        raise APIError(400, "start the server with --record-dir DIR to dump records", code="no_record_dir")
    path = rt.record_dir / f"expert_distribution_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}.pt"
    try:
        record = await asyncio.wrap_future(rt.engine.call(
            lambda: rt.eplb.recorder.dump(path, rt.eplb.location.phy2log)))
    except ValueError as error:  # the recorder refuses an empty dump
        raise APIError(400, str(error), code="nothing_recorded") from None
    return {"path": str(path), "steps": int(record["logical_count"].shape[0])}


# ====================================================================== generation and streaming

@dataclass
class Delta:
    """One step of one choice's stream: new text, the finish once known, and the logprobs asked for."""
    text: str
    finish: str | None
    usage: dict
    tokens: list = field(default_factory=list)  # [(token id, TokenLogprobs)] arrived since the last Delta
    prompt_logprobs: list | None = None  # echo: [(prompt id, TokenLogprobs | None)], in the first Delta


def token_text(tokenizer: TextTokenizer, token_id: int) -> str:
    """One token as text, special tokens included (a piece of a multi-byte character reads as U+FFFD)."""
    return tokenizer.tokenizer.decode([token_id], skip_special_tokens=False)


class Choice:
    """One of a request's `n` choices as OpenAI writes it: text (completions: echo first) and logprobs
    (completions: the legacy object with text offsets; chat: `logprobs.content` entries, with bytes)."""

    def __init__(self, index: int, tokenizer: TextTokenizer, chat: bool, logprobs: bool, echo: str | None):
        self.index, self.tokenizer, self.chat, self.logprobs, self.echo = index, tokenizer, chat, logprobs, echo
        self.finish: str | None = None
        self.completion_tokens = 0
        self.offset = 0  # completions: text offset of the next token

    def take(self, delta: Delta) -> tuple[str, list]:
        """A Delta -> (its text, its logprob entries), the echoed prompt in front of the first."""
        text, entries = delta.text, delta.tokens
        if self.echo is not None:
            text, self.echo = self.echo + text, None
        if delta.prompt_logprobs is not None:
            entries = delta.prompt_logprobs + entries
        self.finish = delta.finish or self.finish
        self.completion_tokens = delta.usage["completion_tokens"]
        return text, entries

    def chunk(self, delta: Delta) -> dict | None:
        """A streamed chunk's choice, or None when there is nothing to send."""
        text, entries = self.take(delta)
        if not (text or delta.finish or entries):
            return None
        logprobs = self.logprobs_json(entries)
        if self.chat:
            return {"index": self.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": delta.finish}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish}

    def whole(self, deltas: list[Delta]) -> dict:
        """The choice of a non-streamed response."""
        text, entries = "", []
        for delta in deltas:
            t, e = self.take(delta)
            text, entries = text + t, entries + e
        logprobs = self.logprobs_json(entries)
        if self.chat:
            return {"index": self.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": self.finish}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish}

    def logprobs_json(self, entries: list) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(token, lp) for token, lp in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in entries:
            text = token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            # OpenAI: the top `logprobs` tokens and always the chosen one
            top = None if lp is None else {**{token_text(self.tokenizer, t): v for t, v in lp.top}, text: lp.logprob}
            out["top_logprobs"].append(top)
        return out

    def _chat_entry(self, token: int, lp) -> dict:
        text = token_text(self.tokenizer, token)
        top = [(token_text(self.tokenizer, t), v) for t, v in lp.top]
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}


async def respond(request: Request, rt: Runtime, body: SamplingFields, prompt_ids: list[int],
                  params: SamplingParams, stop: list[str], chat: bool, echo: str | None = None):
    """`n` completions of one prompt as an SSE stream or, without `stream`, one JSON body. With a seed,
    choice i uses seed + i (each choice replays; choices differ)."""
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    n = body.n or 1
    streams = []
    try:
        for i in range(n):
            child = params if params.seed is None else replace(params, seed=params.seed + i)
            events = generate(rt, request.app.state.metrics, prompt_ids, child, stop)
            await anext(events)  # raises QueueFull → 503 before any byte is sent
            streams.append(events)
    except BaseException:
        for events in streams:
            await events.aclose()
        raise
    choices = [Choice(i, rt.tokenizer, chat, params.logprobs is not None, echo) for i in range(n)]
    head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": rt.model_name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(sse(head, streams, choices, len(prompt_ids), include_usage),
                                 media_type="text/event-stream")
    try:
        deltas = await asyncio.gather(*(collect(request, events) for events in streams))
    finally:
        for events in streams:
            await events.aclose()
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [c.whole(d) for c, d in zip(choices, deltas)], "usage": usage(len(prompt_ids), choices)}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def collect(request: Request, events) -> list[Delta]:
    """One choice's Deltas up to its finish (or the client going away)."""
    deltas = []
    async for delta in events:
        deltas.append(delta)
        if await request.is_disconnected():
            break
    return deltas


async def sse(head: dict, streams: list, choices: list[Choice], prompt_tokens: int, include_usage: bool):
    def chunk(choice: dict) -> str:
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    try:
        if choices[0].chat:
            for c in choices:
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        async for i, delta in merge(streams):
            piece = choices[i].chunk(delta)
            if piece is not None:
                yield chunk(piece)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for events in streams:
            await events.aclose()   # client gone mid-stream: aborts the requests in the engine


async def merge(streams: list):
    """(choice index, Delta) from every stream as they come (one stream: straight through)."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, events):
        try:
            async for delta in events:
                await queue.put((i, delta))
        finally:
            queue.put_nowait((i, None))  # this stream is done (or failed)
    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, delta = await queue.get()
            if delta is None:
                left -= 1
                if not tasks[i].cancelled() and tasks[i].exception() is not None:
                    raise tasks[i].exception()
                continue
            yield i, delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def generate(rt: Runtime, metrics: Metrics, prompt_ids: list[int], params: SamplingParams,
                   stop: list[str]):
    """Yields Deltas. The first comes at once (empty) so the caller learns about a full queue before
    it commits to a response; closing the generator early aborts the request in the engine. Logprobs
    are read from the Sequence, where the engine puts them before the token's callback."""
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
    tokens: list = []  # logprob entries not yet sent
    prompt_logprobs = params.prompt_logprobs is not None

    def usage():
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": num_generated,
                "total_tokens": len(prompt_ids) + num_generated}
    metrics.prompt_tokens.inc(len(prompt_ids))
    try:
        yield Delta("", None, usage())
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
                if params.logprobs is not None:
                    tokens.append((token, seq.logprobs[num_generated - 1]))
                delta = stream.push(token)
                if stream.stopped:
                    finish = "stop"
                    rt.engine.abort(seq)
            if finish is not None:
                delta += stream.finish()
            prompt = None
            if prompt_logprobs:  # the prompt is prefilled once the first token (or the finish) comes
                prompt, prompt_logprobs = list(zip(prompt_ids, seq.prompt_logprobs)), False
            if delta or finish or prompt is not None:
                yield Delta(delta, finish, usage(), tokens, prompt)
                tokens = []
    finally:
        if finish is None:
            rt.engine.abort(seq)
        metrics.requests.labels(finish or "abort").inc()
