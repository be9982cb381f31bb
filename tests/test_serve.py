"""The real server: `python serve.py --preset tiny ...` in a subprocess on a free loopback port,
driven by the official openai client and raw httpx."""
import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "dsv4-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 60, output=None) -> None:
    """Until GET /health answers 200; fails with the server's output (`output()`, else its stdout pipe)
    if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, output() if output else proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become ready")


class Server:
    def __init__(self, *flags: str, log_level: str = "warning"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server's output goes to a file: a pipe nobody reads would stall a chatty server once full
        self.log = tempfile.NamedTemporaryFile("w+", prefix="dsv4-serve-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "serve.py", "--preset", "tiny", "--port", str(self.port), "--log-level", log_level,
             *flags], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        wait_healthy(self.proc, self.url, output=self.output)

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def metric(self, name: str, headers=None) -> float:
        for line in httpx.get(self.url + "/metrics", headers=headers).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-seq-len", "128")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_completions_and_chat(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    assert streamed == done.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_seeded_sampling_replays_and_stop_string_cuts(client):
    run = lambda: client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=1.0,  # noqa
                                             top_p=0.9, seed=123, extra_body={"top_k": 50, "ignore_eos": True})
    first = run().choices[0].text
    assert run().choices[0].text == first
    greedy = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0]
    stop = greedy.text[3:5]
    if stop.strip():
        cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.index(stop)]


def test_openai_error_types(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=500)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=99)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200          # stays open
    assert httpx.post(server.url + "/eplb/rebalance").status_code == 401


def test_openai_client_logprobs_echo_and_n(client):
    """Prompt and token logprobs (completions with echo, and chat) are log_softmax of the model's logits
    (the server's model rebuilt here); n choices with a seed are the single requests seeded seed + i."""
    import dsv4_mini
    import serve
    import torch
    model = serve.build_model_for_rank(serve.parse_args(["--preset", "tiny"]), "cpu", torch.float32)
    prompt = [5, 17, 42, 7, 99]
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                     extra_body={"ignore_eos": True}).choices[0]
    ids = dsv4_mini.generate(model, torch.tensor([prompt]), 3)[0].tolist()
    want = torch.log_softmax(model.forward(torch.tensor([ids]))[0].double(), -1)  # row j predicts ids[j + 1]
    lp = done.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([want[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-3)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(want[j].max().item(), abs=1e-3)
               for j, top in enumerate(lp.top_logprobs[1:]))
    only_prompt = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True).choices[0]
    assert only_prompt.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:len(prompt)], abs=1e-5)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert len(whole) == 4 and all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in whole)  # greedy
    streamed = [e for c in client.chat.completions.create(**chat, stream=True) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]
    sampled = dict(model=MODEL, prompt="abc", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True, "min_p": 0.05},
                   presence_penalty=0.5, frequency_penalty=0.3)
    three = client.completions.create(**sampled, n=3, seed=5).choices
    assert [c.index for c in three] == [0, 1, 2]
    assert [c.text for c in three] == [client.completions.create(**sampled, seed=5 + i).choices[0].text for i in range(3)]
    assert len({c.text for c in three}) > 1
    chunks = list(client.completions.create(**sampled, n=2, seed=5, stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(2)] == \
        [c.text for c in three[:2]]


async def stream_text(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, done = "", False
    async with http.stream("POST", url + "/v1/completions", json=body,
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=180) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                import json
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done
    return text


def run_streams(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    async def go():
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*[stream_text(http, url, p, max_tokens) for p in prompts])
    return asyncio.run(go())


PROMPTS = [f"request {i}: " + "lorem ipsum dolor "[: 3 + i % 15] * (1 + i % 4) for i in range(64)]


def test_64_concurrent_greedy_streams_match_solo_runs(server):
    together = run_streams(server.url, PROMPTS, 8)
    alone = [run_streams(server.url, [p], 8)[0] for p in PROMPTS]
    assert together == alone
    assert len(set(together)) > 8          # distinct prompts give distinct outputs: nothing crossed


def test_disconnect_mid_stream_frees_the_slot(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "go", "max_tokens": 120, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()          # keep a reference: a dropped iterator closes the stream
        assert r.status_code == 200, next(lines)
        assert server.metric("dsv4_cache_slots_in_use") == 1
    deadline = time.monotonic() + 5
    while server.metric("dsv4_cache_slots_in_use") != 0:
        assert time.monotonic() < deadline, "slot not freed after disconnect"
        time.sleep(0.05)


@pytest.mark.parametrize("flags", [["--eplb-layers-per-step", "0"], ["--eplb-layers-per-step", "1"]],
                         ids=["all-at-once", "layer-per-step"])
def test_rebalance_under_load_keeps_outputs(server, flags):
    prompts = PROMPTS[:32]
    reference = run_streams(server.url, prompts, 12)
    eplb = Server("--api-key", KEY, "--max-seq-len", "128", "--eplb", "--ep-size", "4",
                  "--ep-num-redundant-experts", "4", "--eplb-rebalance-num-iterations", "4",
                  "--eplb-window", "4", *flags)
    try:
        assert run_streams(eplb.url, prompts, 12) == reference
        auth = {"Authorization": f"Bearer {KEY}"}
        assert eplb.metric("dsv4_eplb_rebalances_total", auth) >= 1
        state = httpx.get(eplb.url + "/eplb/state", headers=auth).json()
        assert state["enabled"] and state["rebalances"] and len(state["phy2log"]) == 4
    finally:
        eplb.stop()
    assert eplb.proc.returncode == 0


EPLB_DEMO = ("--eplb", "--ep-size", "4", "--ep-num-redundant-experts", "4")  # the README's demo flags


def after_first_move(records: list[dict]) -> tuple[dict, list[dict]]:
    """/eplb/state's rebalance records -> (the first move, the decisions after it)."""
    first = next(i for i, r in enumerate(records) if r["decision"] == "moved")
    return records[first], records[first + 1:]


def test_eplb_one_request_at_a_time_does_not_churn_and_an_idle_server_finishes_a_move():
    s = Server(*EPLB_DEMO, "--eplb-rebalance-num-iterations", "20", "--eplb-window", "20",
               "--eplb-layers-per-step", "1")
    try:
        for prompt in PROMPTS[:10]:  # one at a time: every window is mostly sampling noise
            run_streams(s.url, [prompt], 16)
        state = httpx.get(s.url + "/eplb/state", timeout=60).json()
        first, later = after_first_move(state["rebalances"])
        assert len(later) >= 4 and all(r["reason"] and r["detail"] for r in later)
        assert sum(r["slots_changed"] for r in later) / len(later) <= 0.3 * first["slots_changed"], later
        assert s.metric('dsv4_eplb_rebalances_skipped_total{reason="gain_below_margin"}') >= 1
        deadline = time.monotonic() + 20  # the server is idle now: a started move finishes anyway ...
        while httpx.get(s.url + "/eplb/state", timeout=60).json()["rebalance_in_progress"] is not None:
            assert time.monotonic() < deadline, "a layer-per-step move did not finish on the idle server"
            time.sleep(0.1)
        forced = httpx.post(s.url + "/eplb/rebalance", timeout=60).json()  # ... and so does a forced one
        assert forced["status"] == "started" and forced["reason"] == "forced" and forced["layers_planned"] >= 2
        while (state := httpx.get(s.url + "/eplb/state", timeout=60).json())["rebalance_in_progress"] is not None:
            assert time.monotonic() < deadline, "a layer-per-step move did not finish on the idle server"
            time.sleep(0.1)
        assert state["rebalances"][-1]["finished_step"] == forced["step"]  # no forward step in between
    finally:
        s.stop()
    assert s.proc.returncode == 0


def test_eplb_eight_at_a_time_gains_at_the_first_rebalance():
    s = Server(*EPLB_DEMO, "--eplb-rebalance-num-iterations", "24", "--eplb-window", "24")
    try:
        for i in range(0, 40, 8):
            run_streams(s.url, PROMPTS[i:i + 8], 12)
        first, later = after_first_move(httpx.get(s.url + "/eplb/state", timeout=60).json()["rebalances"])
        assert first["step"] == 24 and first["reason"] == "plan_pays" and later
        assert first["balancedness_measured"] - first["balancedness_before"] >= 0.15, first
    finally:
        s.stop()


def test_record_dump_goes_to_record_dir_and_reloads(tmp_path):
    s = Server("--eplb", "--record-dir", str(tmp_path))
    try:
        forced = httpx.post(s.url + "/eplb/rebalance").json()  # one rank: nothing moves, nothing is counted
        assert forced["status"] == "nothing_to_balance" and forced["reason"].startswith("one rank")
        assert s.metric("dsv4_eplb_rebalances_total") == 0
        assert httpx.post(s.url + "/start_expert_distribution_record").status_code == 200
        run_streams(s.url, ["one", "two"], 4)
        httpx.post(s.url + "/stop_expert_distribution_record")
        dumped = httpx.post(s.url + "/dump_expert_distribution_record").json()
        path = Path(dumped["path"])
        assert path.parent == tmp_path.resolve() and path.is_file() and dumped["steps"] > 0
    finally:
        s.stop()
    again = Server("--eplb", "--ep-size", "2", "--init-expert-location", str(path))
    try:  # the restarted server starts from the placement planned on the dumped load
        import dsv4_mini
        import eplb
        config = dsv4_mini.ModelConfig.tiny()
        want = eplb.initial_location(str(path), config.num_hidden_layers, config.n_routed_experts,
                                     config.n_routed_experts, 2)
        state = httpx.get(again.url + "/eplb/state").json()
        assert state["phy2log"] == want.phy2log.tolist()
        assert state["phy2log"] != eplb.ExpertLocation.trivial(config.num_hidden_layers, config.n_routed_experts,
                                                               config.n_routed_experts, 2).phy2log.tolist()
    finally:
        again.stop()
    assert again.proc.returncode == 0


def test_sigterm_drains_and_queue_full_is_503():
    s = Server("--max-batch-size", "1", "--max-queue", "1", "--drain-seconds", "4")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 500, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as running:
                lines = running.aiter_lines()
                await anext(lines)                       # it holds the only slot now
                queued = asyncio.create_task(http.post(s.url + "/v1/completions", json={**body, "max_tokens": 5}))
                while s.metric("dsv4_requests_waiting") < 1:
                    await asyncio.sleep(0.05)
                rejected = await http.post(s.url + "/v1/completions", json=body)
                assert rejected.status_code == 503 and rejected.headers["retry-after"]
                assert rejected.json()["error"]["code"] == "queue_full"
                started = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)
                rest = [line async for line in lines]
                assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"   # ended cleanly
            assert (await queued).status_code == 200
            return started
    started = asyncio.run(go())
    assert s.proc.wait(10) == 0 and time.monotonic() - started < 10


def test_bad_flags_fail_with_one_line():
    for flags in (["--ep-size", "3"], ["--max-batch-size", "0"], ["--eplb-min-balancedness", "2"],
                  ["--eplb", "--ep-size", "4", "--eplb-algorithm", "hierarchical"], ["--eplb-window", "1000001"]):
        out = subprocess.run([sys.executable, "serve.py", "--preset", "tiny", *flags], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("serve.py: error:")
