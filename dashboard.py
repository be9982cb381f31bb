"""The EPLB dashboard: `GET /dashboard`, one self-contained page that shows EPLB working, live.

The page (static/dashboard.html, .css, .js) is served by the app itself, under a Content-Security-Policy
that allows nothing but this server (no CDN, no inline script or style), so it works offline. Its
JavaScript polls `GET /eplb/state` about once a second and draws the heatmaps on canvas, which stays
fast at released sizes (43 layers x 256 experts x 32+ ranks).

Two routers, so that app.py decides who may call what:
* `page_router`: the page and its static files. Public: they hold no data. With --api-key the page
  asks for the key once and sends it with every data request.
* `api_router`: `POST /dashboard/route` ("follow one token"), included behind the API key.

Two Prometheus series the dashboard's questions need (`EPLBMoveMetrics`, registered by app.py):
`dsv4_eplb_rebalance_in_progress` and the histogram `dsv4_eplb_move_step_seconds` (each forward-step
gap spent moving expert weights: the stall a rebalance costs the requests in flight).

Follow one token: `RouteRecorder` runs a short greedy generation on the engine thread, one forward per
`Engine.call`, so normal requests keep stepping in between. It borrows a free KV-cache slot of the
engine and records, for every token fed through the model, each layer's route: router kind (hash or
score), the top-k logical experts with their weights, the physical slot (replica) each pick went to,
and that slot's rank. The recording is forward pre-hooks on the MoE modules, installed only for the
recorder's own forwards: normal requests run exactly the code they ran before, at the same speed.
It counts no load (load=None), so following a token never moves EPLB's numbers.
"""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
# The only files the page needs; anything else under /dashboard/ is a 404 (no directory serving).
ASSETS = {"dashboard.js": "text/javascript", "dashboard_lib.js": "text/javascript",
          "dashboard_draw.js": "text/javascript", "dashboard.css": "text/css"}
# Only this server: no other host, no inline script or style, no plugins, no framing, no form posts.
CONTENT_SECURITY_POLICY = ("default-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'; object-src 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

ROUTE_MAX_PROMPT_TOKENS = 256   # one prefill forward; the engine's other requests wait for it
ROUTE_MAX_NEW_TOKENS = 32

page_router = APIRouter()
api_router = APIRouter()


# ====================================================================== the page

def is_page_path(path: str) -> bool:
    """The page and its static files: public under --api-key (they hold no data)."""
    return path == "/dashboard" or (path.startswith("/dashboard/") and path[len("/dashboard/"):] in ASSETS)


@page_router.get("/dashboard", include_in_schema=False)
async def dashboard_page():
    return FileResponse(STATIC_DIR / PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@page_router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str):
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=f"{ASSETS[name]}; charset=utf-8", headers=PAGE_HEADERS)


# ====================================================================== Prometheus

class EPLBMoveMetrics:
    """A collector on app.py's per-app registry. It reads `Metrics.snapshot`, which the /metrics
    handler refreshes on the engine thread right before each scrape (EPLBManager.metrics())."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        eplb = self.metrics.snapshot.get("eplb")
        if not eplb or "move_step_seconds" not in eplb:
            return
        yield GaugeMetricFamily("dsv4_eplb_rebalance_in_progress", "1 while a rebalance is moving expert weights",
                                value=eplb["rebalance_in_progress"])
        histogram = eplb["move_step_seconds"]
        buckets = [(bound if bound == "+Inf" else floatToGoString(bound), count) for bound, count in histogram["buckets"]]
        yield HistogramMetricFamily("dsv4_eplb_move_step_seconds", "Seconds of each forward-step gap spent moving "
                                    "expert weights (requests in flight wait that long)", buckets=buckets,
                                    sum_value=histogram["sum"])


# ====================================================================== follow one token

class RouteRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str = Field(min_length=1, max_length=4096)
    max_tokens: int = Field(8, ge=1, le=ROUTE_MAX_NEW_TOKENS)


class RouteRecorder:
    """Greedy generation through the engine's model that records every token's route.

    Each method runs on the engine thread (hand it to `Engine.call`); between them the engine runs its
    normal steps. `begin` borrows a free cache slot, `release` gives it back (call it in all cases).
    `tokens` holds one entry per token fed to the model: the prompt's, then each generated one.
    """

    def __init__(self, engine, prompt_ids: list[int], max_new_tokens: int, num_ranks: int):
        self.engine, self.model = engine, engine.model   # under torchrun: ep.LockstepModel (same calls)
        self.prompt_ids, self.max_new_tokens = list(prompt_ids), max_new_tokens
        self.num_physical = int(self.model.phy2log.shape[1])
        self.slots_per_rank = self.num_physical // num_ranks
        self.device = next(self.model.parameters()).device
        self.slot: int | None = None
        self.position = 0            # tokens already in the borrowed slot's cache
        self.next_token: int | None = None
        self.generated: list[int] = []
        self.tokens: list[dict] = []
        self._layer_routes: list[dict] = []

    # -- engine thread ---------------------------------------------------------------------------

    def begin(self) -> bool:
        """Borrow a free cache slot; False when every slot is serving a request."""
        if not self.engine.free_slots:
            return False
        self.engine.runner.drop_ahead()   # a queued run-ahead step must not outlive this change
        self.slot = self.engine.free_slots.pop()
        self.engine.cache.reset(self.slot)
        return True

    def prefill(self) -> None:
        self._forward(self.prompt_ids, generated=False)

    def decode(self) -> bool:
        """Feed the last generated token (recording its route); False when generation is over."""
        token = self.next_token
        self.generated.append(token)
        done = len(self.generated) >= self.max_new_tokens or token in self.engine.eos_token_ids
        self._forward([token], generated=True)
        return not done

    def release(self) -> None:
        if self.slot is not None:
            self.engine.free_slots.append(self.slot)   # the engine resets a slot when it hands it out
            self.slot = None

    # -- recording -------------------------------------------------------------------------------

    def _forward(self, token_ids: list[int], generated: bool) -> None:
        input_ids = torch.tensor([token_ids], device=self.device)
        start_pos = torch.tensor([self.position], device=self.device)
        slot_ids = torch.tensor([self.slot], device=self.device)
        self._layer_routes = []
        with self._recording():
            logits = self.model.forward(input_ids, start_pos, self.engine.cache, slot_ids, load=None, last_only=True)
        num_token_ids = self.engine.runner.num_token_ids   # like the engine: only ids the tokenizer can produce
        self.next_token = int(logits[0, :num_token_ids].argmax())
        routes_by_token = self._routes_by_token(len(token_ids))
        for offset, token in enumerate(token_ids):
            self.tokens.append({"position": self.position + offset, "token_id": token, "generated": generated,
                                "layers": routes_by_token[offset]})
        self.position += len(token_ids)

    @contextmanager
    def _recording(self):
        """Forward pre-hooks on every MoE module, for this forward only."""
        handles = [layer.ffn.register_forward_pre_hook(self._record_layer) for layer in self.model.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _record_layer(self, moe, args) -> None:
        """Pre-hook of MoE.forward(x, ctx, layer_idx): replays the layer's own routing (`MoE.route`,
        no load counted) on its input and keeps the result."""
        x, ctx, layer_idx = args
        weights, slots = moe.route(x.reshape(-1, x.shape[-1]), ctx, layer_idx, None)
        experts = self.model.phy2log[layer_idx][slots.long()]   # the logical expert each slot holds
        self._layer_routes.append({"layer": layer_idx, "router": "hash" if moe.is_hash else "score",
                                   "weights": weights.cpu(), "slots": slots.cpu(), "experts": experts.cpu()})

    def _routes_by_token(self, num_tokens: int) -> list[list[dict]]:
        per_token = [[] for _ in range(num_tokens)]
        for route in self._layer_routes:
            for t in range(num_tokens):
                picks = [{"expert": int(e), "weight": round(float(w), 6), "slot": int(s),
                          "rank": int(s) // self.slots_per_rank}
                         for e, w, s in zip(route["experts"][t], route["weights"][t], route["slots"][t])]
                per_token[t].append({"layer": route["layer"], "router": route["router"], "picks": picks})
        return per_token


async def run_on_engine(engine, fn):
    return await asyncio.wrap_future(engine.call(fn))


def loaded_runtime(request: Request):
    runtime = request.app.state.runtime
    if runtime is None:
        raise HTTPException(503, "model is still loading", headers={"Retry-After": "1"})
    return runtime


def route_ranks(runtime) -> int:
    """EP ranks the slots are split over: EPLB's (virtual) ranks, else the torchrun world (or 1)."""
    if runtime.eplb is not None:
        return runtime.eplb.location.num_ranks
    return int(getattr(runtime.engine.model, "ep_size", 1))


@api_router.post("/dashboard/route")
async def follow_tokens(body: RouteRequest, request: Request):
    """Greedy generation of up to max_tokens tokens; every token's route through every layer."""
    runtime = loaded_runtime(request)
    prompt_ids = runtime.tokenizer.encode(body.prompt)
    room = min(ROUTE_MAX_PROMPT_TOKENS, runtime.max_seq_len - body.max_tokens - 1)
    if len(prompt_ids) > room:
        raise HTTPException(400, f"the prompt has {len(prompt_ids)} tokens; following routes takes at most {room}")
    engine = runtime.engine
    recorder = RouteRecorder(engine, prompt_ids, body.max_tokens, route_ranks(runtime))
    try:
        if not await run_on_engine(engine, recorder.begin):
            raise HTTPException(503, "every cache slot is busy; try again in a moment", headers={"Retry-After": "1"})
        await run_on_engine(engine, recorder.prefill)
        while await run_on_engine(engine, recorder.decode):
            pass
    finally:
        # Not awaited: queued behind `begin`, it runs even when the client is gone and this task cancelled.
        engine.call(recorder.release)
    for token in recorder.tokens:
        # text: what the token adds to the output ("" for a special token or a partial UTF-8 byte);
        # piece: the vocabulary entry itself, so such tokens are still visible
        token["text"] = runtime.tokenizer.decode([token["token_id"]])
        token["piece"] = runtime.tokenizer.tokenizer.id_to_token(token["token_id"])
    return {"model": runtime.model_name, "num_ranks": route_ranks(runtime), "num_physical": recorder.num_physical,
            "completion": runtime.tokenizer.decode(recorder.generated), "tokens": recorder.tokens}
