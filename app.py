"""The OpenAI-compatible HTTP app: request validation, the routes, SSE streaming, Prometheus metrics.

Request path: JSON body → validated `CompletionRequest`/`ChatRequest` → token ids → `engine.Sequence`
→ engine thread (engine.py) → token ids back through an asyncio queue → `TextStream` (UTF-8 and
stop-string hold-back) → SSE chunks or one JSON body.

`create_app(load)` wires the app; the handlers below are plain functions that find what they share
on `request.app.state`: `runtime` (None until the background load has finished), `load_error`,
`metrics` and `api_key`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

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


async def on_api_error(request: Request, error: APIError):
    return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)


async def on_validation_error(request: Request, error: RequestValidationError):
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
    app.include_router(router)
    return app


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


def check_api_key(request: Request) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    if request.headers.get("authorization", "") != f"Bearer {api_key}":
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type="authentication_error", code="invalid_api_key")


def check_model(rt: Runtime, name: str) -> None:
    if name != rt.model_name:
        raise APIError(404, f"The model '{name}' does not exist (this server serves '{rt.model_name}')",
                       param="model", code="model_not_found")


# ====================================================================== routes

router = APIRouter()
protected = [Depends(check_api_key)]


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    if state.runtime is None or not state.runtime.engine.alive:
        return error_response(503, "loading" if state.load_error is None else "model failed to load",
                              type="server_error", code="not_ready")
    return {"status": "ok"}


@router.get("/v1/models", dependencies=protected)
async def list_models(request: Request):
    rt = loaded_runtime(request)
    return {"object": "list", "data": [{"id": rt.model_name, "object": "model", "created": 0,
                                        "owned_by": "dsv4-mini", "max_model_len": rt.max_seq_len}]}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    metrics, rt = request.app.state.metrics, request.app.state.runtime
    if rt is not None:
        metrics.snapshot = await asyncio.wrap_future(rt.engine.call(partial(engine_snapshot, rt)))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/completions", dependencies=protected)
async def completions(body: CompletionRequest, request: Request):
    rt = loaded_runtime(request)
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
    return await respond(request, rt, body, prompt_ids, params, stop, chat=False)


@router.post("/v1/chat/completions", dependencies=protected)
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
    prompt_ids = rt.tokenizer.encode(rt.tokenizer.render_chat(turns), add_bos=False)
    params, stop = sampling_params(body, len(prompt_ids), rt.max_seq_len, rt.vocab_size, None)
    return await respond(request, rt, body, prompt_ids, params, stop, chat=True)


@router.get("/eplb/state", dependencies=protected)
async def eplb_state(request: Request):
    rt = loaded_runtime(request)
    if rt.eplb is None:
        return {"enabled": False}
    return await asyncio.wrap_future(rt.engine.call(lambda: {"enabled": True, **rt.eplb.state(),
                                                             "ranks": rank_stats(rt)}))


@router.post("/eplb/rebalance", dependencies=protected)
async def eplb_rebalance(request: Request):
    rt = eplb_runtime(request)
    return await asyncio.wrap_future(rt.engine.call(partial(rt.eplb.rebalance, force=True)))


@router.post("/start_expert_distribution_record", dependencies=protected)
async def start_record(request: Request):
    rt = eplb_runtime(request)
    await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.start))
    return {"status": "recording"}


@router.post("/stop_expert_distribution_record", dependencies=protected)
async def stop_record(request: Request):
    rt = eplb_runtime(request)
    await asyncio.wrap_future(rt.engine.call(rt.eplb.recorder.stop))
    return {"status": "stopped"}


@router.post("/dump_expert_distribution_record", dependencies=protected)
async def dump_record(request: Request):
    rt = eplb_runtime(request)
    if rt.record_dir is None:
        raise APIError(400, "start the server with --record-dir DIR to dump records", code="no_record_dir")
    path = rt.record_dir / f"expert_distribution_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}.pt"
    record = await asyncio.wrap_future(rt.engine.call(
        lambda: rt.eplb.recorder.dump(path, rt.eplb.location.phy2log)))
    return {"path": str(path), "steps": int(record["logical_count"].shape[0])}


# ====================================================================== generation and streaming

async def respond(request: Request, rt: Runtime, body: SamplingFields, prompt_ids: list[int],
                  params: SamplingParams, stop: list[str], chat: bool):
    """One completion as an SSE stream or, without `stream`, one JSON body."""
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    events = generate(rt, request.app.state.metrics, prompt_ids, params, stop)
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


async def sse(head: dict, first, events, chat: bool, include_usage: bool):
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
