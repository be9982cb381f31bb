"""The dashboard's server side (dashboard.py): the page is self-contained under its CSP, and "follow one
token" records the routes the model really took, checked against the routing functions run directly
on the MoE inputs of the same forwards. The page in a real browser: tests/test_dashboard_browser.py."""
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
import torch.nn.functional as F
from fastapi.testclient import TestClient

import dashboard
import dsv4_mini
import kernels
import serve
import weights
from app import create_app
from engine import Engine
from eplb import EPLBConfig, EPLBManager, ExpertLocation, SecondsHistogram
from system_tools import ToolUnavailable, in_ci, node_path

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "static"
KEY = "dash-key"
NUM_RANKS, NUM_REDUNDANT = 4, 4


def no_model():
    raise RuntimeError("no model in this test")


@pytest.fixture(scope="module")
def bare_client():
    """An app whose model never loads: the page must not need one."""
    with TestClient(create_app(no_model)) as client:
        yield client


# ---------------------------------------------------------------- the page and its files

def test_dashboard_is_html_under_a_self_only_csp(bare_client):
    page = bare_client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    for name, kind in dashboard.ASSETS.items():
        asset = bare_client.get(f"/dashboard/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert asset.headers["content-security-policy"] == csp
    assert bare_client.get("/dashboard/../app.py").status_code == 404
    assert bare_client.get("/dashboard/serve.py").status_code == 404


def page_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(STATIC.iterdir()) if p.suffix in (".html", ".js", ".css")}


def test_page_references_no_other_host_and_nothing_inline():
    files = page_files()
    assert set(files) == {dashboard.PAGE, *dashboard.ASSETS}
    for name, text in files.items():
        # any absolute or protocol-relative URL would be another host (and break offline use)
        assert not re.findall(r"(?i)\b(?:https?|wss?|ftp):|[\"'(]//\w", text), name
        assert "@import" not in text and "fetch('http" not in text, name
    html = files[dashboard.PAGE]
    for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S):
        assert 'src="/dashboard/' in attrs and not body.strip()     # CSP: no inline script
    assert "<style" not in html and " style=" not in html             # CSP: no inline style
    assert not re.findall(r"\son[a-z]+=", html)                        # CSP: no inline handlers
    assert re.findall(r'href="/dashboard/dashboard.css"', html)


def test_page_js_unit_tests_pass_under_node():
    """static/dashboard_lib.js (scales, colours, normalisation) under node's built-in test runner."""
    try:
        node = node_path()
    except ToolUnavailable as error:
        if in_ci():
            pytest.fail(f"CI must run the page's unit tests: {error}")
        pytest.skip(str(error))
    done = subprocess.run([node, "--test", str(ROOT / "tests" / "js")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# pass 0" not in done.stdout


# ---------------------------------------------------------------- follow one token

@pytest.fixture(scope="module")
def model():
    """The tiny model on a non-trivial placement (replicas in other slots than the trivial map)."""
    config = dsv4_mini.ModelConfig.tiny()
    E = config.n_routed_experts
    model = weights.build_model(config, seed=3, num_physical_experts=E + NUM_REDUNDANT)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.cat([torch.randperm(E, generator=generator), torch.randint(0, E, (NUM_REDUNDANT,), generator=generator)])
            for _ in range(config.num_hidden_layers)]
    placement = ExpertLocation.from_phy2log(torch.stack(rows), E, NUM_RANKS, model.log2phy.shape[2])
    location = ExpertLocation.of_model(model, NUM_RANKS)
    for layer in range(config.num_hidden_layers):
        location.copy_layer_(layer, placement)
    return model


class CapturedMoEInputs:
    """The test's own forward hooks: every MoE module's (x, ctx, layer) of each forward."""

    def __init__(self, model):
        self.calls = []
        self.handles = [layer.ffn.register_forward_pre_hook(self.keep) for layer in model.layers]

    def keep(self, moe, args):
        x, ctx, layer_idx = args
        self.calls.append((moe, x.reshape(-1, x.shape[-1]).clone(), ctx, layer_idx))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def expected_routes(model, moe, x, ctx, layer_idx):
    """The routing functions themselves, on the captured hidden states: (weights, slots, logical experts)."""
    logits = F.linear(x.float(), moe.gate.weight.float())
    maps = (ctx.log2phy[layer_idx], ctx.logcnt[layer_idx], torch.zeros(model.num_physical_experts, dtype=torch.int32))
    if moe.is_hash:
        weights_, slots = kernels.hash_topk_torch(logits, ctx.input_ids.reshape(-1), moe.gate.tid2eid, moe.scale, *maps)
        _, logical = kernels.hash_topk_torch(logits, ctx.input_ids.reshape(-1), moe.gate.tid2eid, moe.scale)
    else:
        weights_, slots = kernels.score_topk_torch(logits, moe.gate.bias, moe.top_k, moe.scale, *maps)
        _, logical = kernels.score_topk_torch(logits, moe.gate.bias, moe.top_k, moe.scale)
    return weights_, slots.long(), logical.long()


def record(model, prompt_ids, max_new_tokens):
    """RouteRecorder's engine-thread steps, run here directly (the engine thread is not started)."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64, max_queue=4)
    recorder = dashboard.RouteRecorder(engine, prompt_ids, max_new_tokens, NUM_RANKS)
    assert recorder.begin()
    recorder.prefill()
    while recorder.decode():
        pass
    recorder.release()
    assert sorted(engine.free_slots) == [0, 1]
    return recorder


def test_recorded_routes_are_the_routing_functions_on_the_same_hidden_states(model):
    prompt = [5, 17, 99, 3, 250, 17, 42]
    captured = CapturedMoEInputs(model)
    try:
        recorder = record(model, prompt, max_new_tokens=5)
    finally:
        captured.remove()
    L, slots_per_rank = model.config.num_hidden_layers, model.num_physical_experts // NUM_RANKS
    assert len(captured.calls) == L * 6                      # one prefill + five one-token forwards
    tokens_by_forward = [recorder.tokens[:len(prompt)]] + [[t] for t in recorder.tokens[len(prompt):]]
    for forward, tokens in enumerate(tokens_by_forward):
        for moe, x, ctx, layer in captured.calls[forward * L:(forward + 1) * L]:
            weights_, slots, logical = expected_routes(model, moe, x, ctx, layer)
            for t, token in enumerate(tokens):
                route = token["layers"][layer]
                assert route["router"] == ("hash" if layer < model.config.num_hash_layers else "score")
                picks = route["picks"]
                assert [p["slot"] for p in picks] == slots[t].tolist()
                assert [p["expert"] for p in picks] == logical[t].tolist()
                assert [p["expert"] for p in picks] == model.phy2log[layer, slots[t]].tolist()
                assert [p["rank"] for p in picks] == (slots[t] // slots_per_rank).tolist()
                assert [p["weight"] for p in picks] == pytest.approx(weights_[t].tolist(), abs=1e-5)


def test_route_recording_is_greedy_generation_and_leaves_no_hooks(model):
    prompt = [7, 8, 9, 10]
    recorder = record(model, prompt, max_new_tokens=6)
    expected = dsv4_mini.generate(model, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
    assert recorder.generated == expected
    assert [t["token_id"] for t in recorder.tokens] == prompt + expected
    assert [t["position"] for t in recorder.tokens] == list(range(len(prompt) + 6))
    assert all(not layer.ffn._forward_pre_hooks for layer in model.layers)


# ---------------------------------------------------------------- the endpoint on a real runtime

@pytest.fixture(scope="module")
def eplb_client():
    args = serve.parse_args(["--preset", "tiny", "--eplb", "--ep-size", str(NUM_RANKS), "--ep-num-redundant-experts",
                             str(NUM_REDUNDANT), "--max-seq-len", "128", "--max-batch-size", "4"])
    with TestClient(create_app(lambda: serve.build_runtime(args), api_key=KEY)) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the tiny model did not load"
            time.sleep(0.1)
        yield client


def test_route_endpoint_needs_the_key_and_answers_per_token_routes(eplb_client):
    body = {"prompt": "Hello there", "max_tokens": 4}
    assert eplb_client.post("/dashboard/route", json=body).status_code == 401
    assert eplb_client.get("/dashboard").status_code == 200                    # the page itself is public
    auth = {"Authorization": f"Bearer {KEY}"}
    before = eplb_client.get("/eplb/state", headers=auth).json()
    answer = eplb_client.post("/dashboard/route", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    routes = answer.json()
    assert routes["num_ranks"] == NUM_RANKS and routes["num_physical"] == 16 + NUM_REDUNDANT
    generated = [t for t in routes["tokens"] if t["generated"]]
    assert len(generated) == 4 and routes["completion"] == "".join(t["text"] for t in generated)
    for token in routes["tokens"]:
        assert [layer["router"] for layer in token["layers"]] == ["hash", "hash", "score", "score"]
        for layer in token["layers"]:
            assert len(layer["picks"]) == 2
            for pick in layer["picks"]:
                assert before["phy2log"][layer["layer"]][pick["slot"]] == pick["expert"]
                assert pick["rank"] == pick["slot"] // (routes["num_physical"] // NUM_RANKS)
    after = eplb_client.get("/eplb/state", headers=auth).json()
    assert after["step"] == before["step"]            # no engine step ran for it: EPLB counted nothing


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)
ROUTE_BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=60)}, optional={"max_tokens": st.integers(-3, 40)}),
    st.dictionaries(st.sampled_from(["prompt", "max_tokens", "model", "stream"]), JSON_VALUES, max_size=3),
    JSON_VALUES)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=ROUTE_BODIES)
def test_route_endpoint_answers_hostile_bodies_without_5xx(eplb_client, body):
    # json.dumps writes NaN and Infinity too (a hostile client may; httpx's json= refuses to)
    answer = eplb_client.post("/dashboard/route", content=json.dumps(body),
                              headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 400:
        assert answer.json()["error"]["message"]


@pytest.mark.parametrize("body", [{"prompt": "", "max_tokens": 2}, {"prompt": "x", "max_tokens": 33},
                                  {"prompt": "x", "max_tokens": "2"}, {"prompt": "x", "temperature": 1},
                                  {"prompt": "x" * 300, "max_tokens": 2}])
def test_route_endpoint_rejects_bad_bodies(eplb_client, body):
    answer = eplb_client.post("/dashboard/route", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 400 and answer.json()["error"]["message"]


def test_metrics_show_the_move_in_progress_gauge_and_the_move_step_histogram(eplb_client):
    auth = {"Authorization": f"Bearer {KEY}"}
    done = eplb_client.post("/v1/completions", headers=auth, json={"model": "dsv4-tiny", "prompt": "warm up the load",
                                                                   "max_tokens": 4, "ignore_eos": True})
    assert done.status_code == 200
    assert eplb_client.post("/eplb/rebalance", headers=auth).json()["status"] == "started"
    deadline = time.monotonic() + 60  # a layer per step (the default): the idle engine finishes the move
    while "dsv4_eplb_rebalance_in_progress 0.0" not in (lines := eplb_client.get("/metrics").text.splitlines()):
        assert "dsv4_eplb_rebalance_in_progress 1.0" in lines and time.monotonic() < deadline
        time.sleep(0.05)
    count = next(float(line.split()[1]) for line in lines if line.startswith("dsv4_eplb_move_step_seconds_count"))
    assert count >= 1 and any(line.startswith('dsv4_eplb_move_step_seconds_bucket{le="+Inf"}') for line in lines)
    state = eplb_client.get("/eplb/state", headers=auth).json()
    changed = sum(len(slots) for slots in state["changed_slots"])
    assert changed == state["rebalances"][-1]["slots_changed"]


def test_balancedness_histories_are_bounded(model):
    manager = EPLBManager(model, EPLBConfig(num_ranks=NUM_RANKS, rebalance_num_iterations=10_000, window=10, history=5))
    for step in range(40):
        manager.load[:, step % model.num_physical_experts] += 1   # some load, so the numbers move
        manager.after_step()
    state = manager.state()
    assert len(state["balancedness_history"]) == len(state["layer_balancedness_history"]) == 5
    assert [step for step, _ in state["layer_balancedness_history"]] == [36, 37, 38, 39, 40]
    for (step, mean), (_, per_layer) in zip(state["balancedness_history"], state["layer_balancedness_history"]):
        assert len(per_layer) == model.config.num_hidden_layers and mean == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-4)


def test_move_step_histogram_counts_into_cumulative_buckets():
    histogram = SecondsHistogram((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        histogram.observe(seconds)
    assert histogram.snapshot() == {"buckets": [[0.01, 2], [0.1, 3], ["+Inf", 4]], "sum": pytest.approx(3.065), "count": 4}


def test_start_up_log_line_links_the_dashboard():
    assert serve.dashboard_url(serve.parse_args(["--port", "9000"])) == "http://127.0.0.1:9000/dashboard"
    assert serve.dashboard_url(serve.parse_args(["--host", "0.0.0.0"])) == "http://localhost:8000/dashboard"
    assert serve.dashboard_url(serve.parse_args(["--host", "::1", "--port", "81"])) == "http://[::1]:81/dashboard"
