"""Server pieces without a model: tokenizer and text streaming (text.py), the CLI (serve.py), and
the app's error surface (app.py, with a small fake engine that lives only in this file)."""
import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings, strategies as st

import serve
from app import Runtime, create_app
from engine import EngineStats, QueueFull, SamplingParams, TokenLogprobs
from text import ASSISTANT, BOS, EOS, THINK_END, USER, TextStream, TextTokenizer, builtin_tokenizer

TOKENIZER = TextTokenizer(builtin_tokenizer(512))


# ---------------------------------------------------------------- tokenizer and text stream

def test_builtin_tokenizer_is_deterministic_and_has_chat_tokens():
    again = TextTokenizer(builtin_tokenizer(512))
    assert again.tokenizer.to_str() == TOKENIZER.tokenizer.to_str()
    assert TOKENIZER.vocab_size <= 512 and TOKENIZER.has_chat_tokens and TOKENIZER.eos_ids
    prompt = TOKENIZER.render_chat([("system", "be brief"), ("user", "hi")])
    assert prompt == f"{BOS}be brief{USER}hi{ASSISTANT}{THINK_END}"


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_builtin_tokenizer_is_lossless(text):
    # user text (encode_plain) round-trips whatever it spells; a raw prompt (encode) turns control-token
    # strings such as "</think>" into control tokens on purpose, which decode then skips
    assert TOKENIZER.decode(TOKENIZER.encode_plain(text)) == text
    if not any(t in text for t in (BOS, EOS, USER, ASSISTANT, THINK_END)):
        assert TOKENIZER.decode(TOKENIZER.encode(text, add_bos=False)) == text


def test_raw_prompt_control_strings_become_control_tokens():
    ids = TOKENIZER.encode(f"a{THINK_END}b", add_bos=False)
    assert TOKENIZER.tokenizer.token_to_id(THINK_END) in ids
    assert TOKENIZER.decode(ids) == "ab" and TOKENIZER.decode(TOKENIZER.encode_plain(f"a{THINK_END}b")) == f"a{THINK_END}b"


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1))
def test_stream_deltas_are_whole_characters_and_add_up(text):
    stream = TextStream(TOKENIZER, stop=[])
    ids = TOKENIZER.encode(text, add_bos=False)
    deltas = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_stream_holds_back_a_split_emoji():
    stream = TextStream(TOKENIZER, stop=[])
    emoji_bytes = [TOKENIZER.tokenizer.token_to_id(c) for c in "ðŁĺĢ"]   # byte tokens of 😀
    assert None not in emoji_bytes
    assert [stream.push(t) for t in emoji_bytes] == ["", "", "", "😀"]


def test_stop_string_is_held_back_then_cut():
    stream = TextStream(TOKENIZER, stop=["STOP"])
    out = [stream.push(t) for t in TOKENIZER.encode("abc ST", add_bos=False)]
    assert "".join(out) == "abc "            # "ST" may still become "STOP": held back
    out += [stream.push(t) for t in TOKENIZER.encode("OP tail", add_bos=False)]
    assert "".join(out) == "abc " and stream.stopped


def test_held_back_prefix_is_released_when_it_cannot_match():
    stream = TextStream(TOKENIZER, stop=["STOP"])
    text = "".join(stream.push(t) for t in TOKENIZER.encode("a STX", add_bos=False)) + stream.finish()
    assert text == "a STX" and not stream.stopped


# ---------------------------------------------------------------- CLI: --init-device

def test_init_device_flag_is_documented_checked_and_reaches_build_model(capsys, tmp_path):
    with pytest.raises(SystemExit):
        serve.parse_args(["--help"])
    assert "--init-device {cpu,model}" in capsys.readouterr().out
    for argv, message in ((["--init-device", "gpu"], "argument --init-device: invalid choice: 'gpu'"),
                          (["--init-device", "model", "--model-path", str(tmp_path)], "no config.json")):
        with pytest.raises(SystemExit) as exit_info:
            serve.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and message in err[-1] and err[-1].startswith("serve.py: error:")
    (tmp_path / "config.json").write_text("{\"n_routed_experts\": 16}")
    with pytest.raises(SystemExit):
        serve.parse_args(["--init-device", "model", "--model-path", str(tmp_path)])
    assert "--init-device only applies to the built-in random weights" in capsys.readouterr().err
    args = serve.parse_args(["--preset", "tiny", "--init-device", "model"])
    assert args.init_device == "model" and serve.parse_args([]).init_device == "cpu"
    # on a CPU model, "model" is the CPU init: the same weights as the default
    a = serve.build_model_for_rank(args, "cpu", torch.float32)
    b = serve.build_model_for_rank(serve.parse_args(["--preset", "tiny"]), "cpu", torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------- app error surface (fake engine)

A_ID = TOKENIZER.tokenizer.token_to_id("a")


class FakeEngine:
    """Emits max_tokens copies of the token "a" (logprob -0.5, top: "a" then "b"; prompt tokens -1.0
    when asked), or raises QueueFull when full=True."""

    def __init__(self, full=False):
        self.full, self.device = full, "cpu"
        self.stats = EngineStats(num_slots=4)
        self.alive = True
        self.submitted = []

    def submit(self, seq):
        if self.full:
            raise QueueFull
        self.submitted.append(seq)
        if seq.params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None] + [TokenLogprobs(-1.0, [(A_ID, -0.5)]) for _ in seq.prompt_ids[1:]]
        if seq.params.max_tokens == 0:
            seq.on_token(None, "length")
        for i in range(seq.params.max_tokens):
            if seq.params.logprobs is not None:
                top = [(A_ID, -0.5), (TOKENIZER.tokenizer.token_to_id("b"), -1.5)][:seq.params.logprobs]
                seq.logprobs.append(TokenLogprobs(-0.5, top))
            seq.on_token(A_ID, "length" if i == seq.params.max_tokens - 1 else None)
        return seq

    def abort(self, seq):
        pass

    def call(self, fn):
        import concurrent.futures
        future = concurrent.futures.Future()
        future.set_result(fn())
        return future

    def start(self):
        pass

    def drain(self, timeout_s):
        pass


def make_client(engine=None, **kwargs):
    engine = engine or FakeEngine()
    runtime = Runtime(engine=engine, tokenizer=TOKENIZER, model_name="m", max_seq_len=64, vocab_size=512)
    app = create_app(lambda: runtime, **kwargs)
    client = TestClient(app)
    client.__enter__()
    for _ in range(200):
        if client.get("/health").status_code == 200:
            break
        asyncio.run(asyncio.sleep(0.01))
    return client


@pytest.fixture(scope="module")
def client():
    c = make_client()
    yield c
    c.__exit__(None, None, None)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_fake_completion_roundtrip(client):
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "aaa"
    assert r.json()["usage"]["completion_tokens"] == 3


BASE = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize("body,param", [
    ({**BASE, "max_tokens": "5"}, "max_tokens"),
    ({**BASE, "max_tokens": 5.5}, "max_tokens"),
    ({**BASE, "temperature": "hot"}, "temperature"),
    ({**BASE, "stream": "yes"}, "stream"),
    ({"model": "m"}, "prompt"),
    ({**BASE, "frobnicate": 1}, "frobnicate"),
    ({**BASE, "temperature": 2.5}, "temperature"),
    ({**BASE, "temperature": -0.1}, "temperature"),
    ({**BASE, "top_p": 0}, "top_p"),
    ({**BASE, "top_p": 1.5}, "top_p"),
    ({**BASE, "top_k": -2}, "top_k"),
    ({**BASE, "max_tokens": 0}, "max_tokens"),
    ({**BASE, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**BASE, "stop_token_ids": [512]}, "stop_token_ids"),
    ({**BASE, "prompt": [1, 2, 99999]}, "prompt"),
    ({**BASE, "prompt": ["a", "b"]}, "prompt"),
    ({**BASE, "max_tokens": 100}, "max_tokens"),       # 1 + 100 > 64: over the context
    ({**BASE, "logprobs": 21}, "logprobs"),
    ({**BASE, "logprobs": -1}, "logprobs"),
    ({**BASE, "logprobs": True}, "logprobs"),
    ({**BASE, "n": 0}, "n"),
    ({**BASE, "n": 17}, "n"),
    ({**BASE, "min_p": 1.5}, "min_p"),
    ({**BASE, "presence_penalty": 2.5}, "presence_penalty"),
    ({**BASE, "frequency_penalty": -3}, "frequency_penalty"),
    ({**BASE, "echo": True, "max_tokens": -1}, "max_tokens"),
    ({**BASE, "best_of": 3}, "best_of"),
    ({**BASE, "suffix": "x"}, "suffix"),
    ({**BASE, "logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_completion_400s_name_the_parameter(client, body, param):
    assert_error(client.post("/v1/completions", json=body), 400, param=param)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": 2}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 17}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
])
def test_chat_400s_name_the_parameter(client, extra, param):
    assert_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param=param)


def test_context_error_names_the_numbers(client):
    r = client.post("/v1/completions", json={**BASE, "max_tokens": 100})
    assert_error(r, 400, code="context_length_exceeded")
    assert "64" in r.json()["error"]["message"] and "100" in r.json()["error"]["message"]


def test_malformed_json_unknown_model_and_route(client):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_error(client.post("/v1/completions", json={**BASE, "model": "gpt-4"}), 404, "model", "model_not_found")
    assert_error(client.get("/v1/nothing"), 404)


def test_body_over_limit_is_413():
    c = make_client(max_body_bytes=1000)
    assert_error(c.post("/v1/completions", json={**BASE, "prompt": "x" * 2000}), 413)
    assert c.post("/v1/completions", json=BASE).status_code == 200
    c.__exit__(None, None, None)


def test_queue_full_is_503_with_retry_after():
    c = make_client(FakeEngine(full=True))
    r = c.post("/v1/completions", json=BASE)
    assert_error(r, 503, code="queue_full")
    assert r.headers["retry-after"] == "1"
    c.__exit__(None, None, None)


def test_api_key_guards_v1_and_eplb_but_not_health():
    c = make_client(api_key="sekret")
    for method, path in [("get", "/v1/models"), ("post", "/v1/completions"), ("get", "/eplb/state"),
                         ("post", "/eplb/rebalance"), ("post", "/start_expert_distribution_record"),
                         ("post", "/dump_expert_distribution_record")]:
        assert_error(getattr(c, method)(path), 401, code="invalid_api_key")
        assert_error(getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}), 401)
    assert c.get("/health").status_code == 200
    ok = c.post("/v1/completions", json=BASE, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    c.__exit__(None, None, None)


def test_health_is_503_while_loading():
    import threading
    gate = threading.Event()
    runtime = Runtime(engine=FakeEngine(), tokenizer=TOKENIZER, model_name="m", max_seq_len=64, vocab_size=512)
    app = create_app(lambda: (gate.wait(10), runtime)[1])
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/completions", json=BASE), 503, code="not_ready")
        gate.set()
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert c.get("/health").status_code == 200


def test_fuzz_openapi_schema_finds_no_5xx_and_the_schema_is_true(client):
    """No 5xx; every status code, content type and body is one the schema declares (400, not 422;
    /metrics as text)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures = []

    @settings(max_examples=25, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        # /dashboard/route runs the model itself (FakeEngine has none): fuzzed in test_dashboard.py
        for operation in [op.ok() for op in schema.get_all_operations() if op.ok().path != "/dashboard/route"]:
            case = data.draw(operation.as_strategy())
            # /dashboard/route runs the model itself (not in FakeEngine): fuzzed in test_dashboard.py
            if case.path == "/dashboard/route":
                continue
            response = case.call()
            try:
                case.validate_response(response, checks=checks)
            except Exception as failure:  # noqa: BLE001 - collected, reported below
                failures.append((case.method, case.path, case.body, response.status_code, str(failure)[:300]))
    run()
    assert not failures, failures[:3]
    assert json.loads(client.get("/openapi.json").text)["paths"]["/v1/completions"]


# ---------------------------------------------------------------- CLI: --expert-dtype

@pytest.mark.parametrize("fmt, weight_dtype", [("fp4", torch.uint8), ("fp8", torch.float8_e4m3fn), (None, torch.float32)])
def test_expert_dtype_flag_reaches_the_routed_experts(fmt, weight_dtype):
    argv = ["--preset", "tiny"] + (["--expert-dtype", fmt] if fmt else [])
    model = serve.build_model_for_rank(serve.parse_args(argv), "cpu", torch.float32)
    experts = model.layers[0].ffn.experts
    assert experts.w1.dtype == weight_dtype and model.layers[0].attn.wkv.weight.dtype == torch.float32
    assert len(model.expert_weights(0)) == (3 if fmt is None else 6)  # quantised slots move with their scales


# ---------------------------------------------------------------- the OpenAI sampling surface (fake engine)

def test_n_choices_and_seeds(client):
    r = client.post("/v1/completions", json={**BASE, "max_tokens": 2, "n": 3, "seed": 10, "presence_penalty": 0.5,
                                              "frequency_penalty": -0.5, "min_p": 0.1}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and all(c["text"] == "aa" for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 6 and r["usage"]["prompt_tokens"] == len(TOKENIZER.encode("hi"))
    engine = client.app.state.runtime.engine
    params = [s.params for s in engine.submitted[-3:]]
    assert [p.seed for p in params] == [10, 11, 12]
    assert params[0].presence_penalty == 0.5 and params[0].frequency_penalty == -0.5 and params[0].min_p == 0.1
    events = [json.loads(line[6:]) for line in client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 2, "n": 2, "stream": True}).text.splitlines()
        if line.startswith("data: {")]
    for i in range(2):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "aa" and mine[-1]["finish_reason"] == "length"


def test_completion_logprobs_and_echo(client):
    r = client.post("/v1/completions", json={**BASE, "max_tokens": 2, "logprobs": 1, "echo": True}).json()
    choice, prompt_len = r["choices"][0], len(TOKENIZER.encode("hi"))
    assert choice["text"] == "hiaa"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == prompt_len + 2 and lp["tokens"][-2:] == ["a", "a"]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == [-1.0] * (prompt_len - 1) + [-0.5, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][-1] == {"a": -0.5}
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] == len("".join(lp["tokens"][:-1]))
    only_prompt = client.post("/v1/completions", json={**BASE, "max_tokens": 0, "logprobs": 0, "echo": True}).json()
    assert only_prompt["choices"][0]["text"] == "hi" and only_prompt["usage"]["completion_tokens"] == 0
    assert len(only_prompt["choices"][0]["logprobs"]["tokens"]) == prompt_len
    plain = client.post("/v1/completions", json={**BASE, "max_tokens": 2}).json()["choices"][0]
    assert plain["logprobs"] is None


def test_chat_logprobs_streamed_and_not(client):
    body = {**CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in whole] == ["a", "a"] and whole[0]["logprob"] == -0.5
    assert [t["token"] for t in whole[0]["top_logprobs"]] == ["a", "b"] and whole[0]["bytes"] == [ord("a")]
    events = [json.loads(line[6:]) for line in client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    streamed = [e for ev in events for e in (ev["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == whole


def test_server_eplb_moves_one_layer_per_step_and_judges_on_the_engine_thread_on_a_cpu():
    """serve.py's defaults: a move stalls a forward step by at most one layer's copy (#12), and on a CPU
    (--eplb-checks auto) checks are judged between steps, not in a spawned process."""
    args = serve.parse_args(["--preset", "tiny", "--eplb", "--ep-size", "2", "--ep-num-redundant-experts", "2"])
    model = serve.build_model_for_rank(args, "cpu", torch.float32)
    manager = serve.make_eplb(args, model)
    assert manager.config.layers_per_step == 1 and not manager.config.background_checks
    assert manager._judges is None
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # skewed load on every layer
        manager.load.copy_(torch.randint(0, 50, manager.load.shape, generator=gen, dtype=torch.int32) ** 2)
        manager.after_step()
    assert manager.rebalance(force=True)["status"] == "started"
    assert manager.rebalancer.stats.layers == 1  # this step moved one layer ...
    left = len(manager.rebalancer.pending)
    assert left >= 1
    manager.after_step()  # ... and each later step one more
    assert manager.rebalancer.stats.layers == 2 and len(manager.rebalancer.pending) == left - 1
