"""The engine with the real tiny model on CPU, stepped by hand (no thread, no HTTP): continuous
batching, chunked prefill and prompt tails fed through the one-token step all give the tokens of
`dsv4_mini.generate` (greedy, one request alone)."""
import os

import pytest
import torch

import dsv4_mini
import eplb
import weights
from engine import Engine, SamplingParams, Sequence


@pytest.fixture(scope="module")
def model():
    return weights.build_model(dsv4_mini.ModelConfig.tiny(), seed=3)


def run_all(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    seqs = [engine.submit(Sequence(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                   on_token=lambda token, reason: None)) for p in prompts]
    for _ in range(1000):
        if not engine.has_work():
            break
        engine.step()
    assert all(s.finish_reason == "length" for s in seqs)
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("prefill_chunk, prefill_tail, run_ahead", [(256, 0, False), (5, 0, False), (7, 3, False),
                                                                   (256, 64, False), (7, 3, True), (256, 64, True)])
def test_engine_matches_generate(model, prefill_chunk, prefill_tail, run_ahead):
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 4, 9, 23, 40]  # shorter and longer than the tail, the chunk and the window (8)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    want = [dsv4_mini.generate(model, torch.tensor([p]), 12)[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=16, prefill_chunk=prefill_chunk,
                    prefill_tail=prefill_tail, decode_graphs=True, run_ahead=run_ahead)
    assert engine.run_ahead == run_ahead
    assert run_all(engine, prompts, 12) == want


def test_run_ahead_survives_changing_batches(model):
    """Steps launched ahead are used when the next batch is the same and redone when it is not
    (requests finishing at different lengths, new requests admitted mid-way, an EOS-like stop id):
    every request still gets exactly its solo greedy tokens."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 6, 2, 5, 7, 4)]
    lengths = [5, 9, 3, 12, 7, 10]
    solo = [dsv4_mini.generate(model, torch.tensor([p]), n)[0, len(p):].tolist() for p, n in zip(prompts, lengths)]
    stop_id = solo[3][4]  # request 3 stops at its 5th token (or earlier, if that id comes up sooner)
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=16, prefill_tail=64, decode_graphs=True,
                    run_ahead=True)
    got: dict[int, list] = {i: [] for i in range(len(prompts))}
    launched_ahead = 0
    seqs = []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                stop_token_ids=(stop_id,) if i == 3 else ())
        seqs.append(Sequence(p, params, on_token=lambda t, r, i=i: got[i].append(t) if t is not None else None))
    for seq in seqs[:3]:
        engine.submit(seq)
    for step in range(200):
        if step == 4:
            for seq in seqs[3:]:
                engine.submit(seq)  # admitted as slots free up
        if not engine.has_work():
            break
        launched_ahead += engine.runner.ahead is not None
        engine.step()
    for i, seq in enumerate(seqs):
        want = solo[i][:solo[i].index(stop_id) + 1] if i == 3 and stop_id in solo[i] else solo[i]
        assert seq.output_ids == want == got[i], i
    assert launched_ahead > 0


def test_padded_vocab_rows_are_never_sampled(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64, max_queue=4, num_token_ids=7, decode_graphs=True)
    outputs = run_all(engine, [[1, 2, 3], [4, 5]], 10)
    assert all(0 <= t < 7 for out in outputs for t in out)


def test_one_bad_request_never_ends_its_neighbours(model):
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=8, decode_graphs=True)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tiny_t = SamplingParams(max_tokens=6, temperature=1e-30, ignore_eos=True)  # logits / T would overflow

    def explode(token, reason):
        raise RuntimeError("client callback failed")

    ok = engine.submit(Sequence([1, 2, 3], greedy, on_token=lambda t, r: None))
    cold = engine.submit(Sequence([1, 2, 3], tiny_t, on_token=lambda t, r: None))
    bad = engine.submit(Sequence([4, 5], greedy, on_token=explode))
    for _ in range(50):
        if not engine.has_work():
            break
        engine.step()
    assert ok.finish_reason == "length" and cold.finish_reason == "length" and bad.finish_reason == "abort"
    assert cold.output_ids == ok.output_ids  # below 1e-5 the temperature is greedy
    assert engine.free_slots and len(engine.free_slots) == 4
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit(Sequence([], greedy, on_token=lambda t, r: None))


def test_calls_after_stop_fail_instead_of_waiting(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=32, max_queue=1)
    engine.start()
    assert engine.call(lambda: 42).result(timeout=10) == 42
    engine.stop()
    with pytest.raises(RuntimeError, match="not running"):
        engine.call(lambda: 1).result(timeout=1)


# ---------------------------------------------------------------------------------------------------
# Sampling on the device: seeds, penalties, logprobs
# ---------------------------------------------------------------------------------------------------

def run_requests(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
    seqs = [engine.submit(Sequence(p, params, on_token=lambda t, r: None)) for p, params in requests]
    for _ in range(1000):
        if not engine.has_work():
            break
        engine.step()
    return seqs


def test_seeded_sampled_request_replays_alone_and_in_a_busy_batch(model):
    """The same seeded request draws the same tokens alone, among neighbours (sampled, greedy, seeded
    or not), with another batch bucket, and with run-ahead: the draws are keyed by (seed, position)."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=gen).tolist()
    mine = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=8, decode_graphs=True, run_ahead=False)
    want = run_requests(alone, [(prompt, mine)])[0].output_ids
    others = [(torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist(),
               SamplingParams(max_tokens=m, temperature=t, seed=s, ignore_eos=True))
              for n, m, t, s in [(3, 12, 1.0, None), (9, 4, 0.0, None), (5, 8, 0.7, 5), (2, 11, 1.3, None)]]
    for max_batch_size, run_ahead, at in [(8, True, 2), (8, False, 4), (2, True, 1)]:
        engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=64, max_queue=8, decode_graphs=True,
                        run_ahead=run_ahead)
        requests = others[:at] + [(prompt, mine)] + others[at:]
        seqs = run_requests(engine, requests)
        assert seqs[at].output_ids == want, (max_batch_size, run_ahead)
    assert len(set(want)) > 1  # it did sample
    unseeded = run_requests(alone, [(prompt, SamplingParams(max_tokens=10, ignore_eos=True))] * 2)
    assert unseeded[0].output_ids != unseeded[1].output_ids  # each gets its own seed from the stream


def reference_greedy(model, prompt: list[int], params: SamplingParams) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with OpenAI's penalties, by full forwards -> (tokens, raw logits [len(prompt)+n-1, V])."""
    out: list[int] = []
    counts = torch.zeros(model.config.vocab_size)
    for _ in range(params.max_tokens):
        logits = model.forward(torch.tensor([prompt + out]))[0]  # [S, V]
        last = logits[-1] - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
        out.append(int(last.argmax()))
        counts[out[-1]] += 1
    return out, logits


@pytest.mark.parametrize("run_ahead", [False, True])
def test_penalties_and_logprobs_match_direct_computation(model, run_ahead):
    """Greedy with presence/frequency penalties gives the tokens of a direct penalized argmax; the
    logprobs (sampled tokens, top-k, and every prompt token over several prefill chunks) are those of
    log_softmax of the model's raw logits."""
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, model.config.vocab_size, (12,), generator=gen).tolist()
    params = SamplingParams(max_tokens=8, temperature=0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=3,
                            prompt_logprobs=2, ignore_eos=True)
    want, logits = reference_greedy(model, prompt, params)
    logprobs = torch.log_softmax(logits.double(), -1)  # [S, V]: row j predicts token j + 1
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=8, prefill_chunk=5, prefill_tail=3,
                    decode_graphs=True, run_ahead=run_ahead)
    neighbour = (prompt[:4], SamplingParams(max_tokens=9, temperature=1.0, presence_penalty=1.0, ignore_eos=True))
    seq = run_requests(engine, [neighbour, (prompt, params)])[1]
    assert seq.output_ids == want
    tokens = prompt + want
    assert len(seq.logprobs) == len(want) and len(seq.prompt_logprobs) == len(prompt)
    assert seq.prompt_logprobs[0] is None
    positions = [(j, lp) for j, lp in enumerate(seq.prompt_logprobs) if j > 0]
    positions += [(len(prompt) + i, lp) for i, lp in enumerate(seq.logprobs)]
    for j, lp in positions:  # lp: the logprobs of tokens[j], predicted at row j - 1
        row = logprobs[j - 1]
        k = 2 if j < len(prompt) else 3
        assert lp.logprob == pytest.approx(row[tokens[j]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(k).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)


def test_prompt_only_request_returns_prompt_logprobs_and_no_token(model):
    """max_tokens=0 with prompt logprobs (lm-eval's loglikelihood: echo, no completion)."""
    prompt = [5, 9, 2, 33, 7, 1, 8]
    events = []
    engine = Engine(model, max_batch_size=2, max_seq_len=64, max_queue=4, prefill_chunk=3, prefill_tail=64,
                    decode_graphs=True)
    seq = engine.submit(Sequence(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0),
                                 on_token=lambda t, r: events.append((t, r))))
    for _ in range(20):
        if not engine.has_work():
            break
        engine.step()
    assert seq.output_ids == [] and seq.finish_reason == "length" and events == [(None, "length")]
    want = torch.log_softmax(model.forward(torch.tensor([prompt]))[0].double(), -1)
    assert [lp.logprob for lp in seq.prompt_logprobs[1:]] == pytest.approx(
        [want[j - 1, prompt[j]].item() for j in range(1, len(prompt))], abs=1e-4)
    assert engine.free_slots and len(engine.free_slots) == 2


# ---------------------------------------------------------------------------------------------------
# Run-ahead under EPLB
# ---------------------------------------------------------------------------------------------------

def run_with_eplb(run_ahead: bool, background_checks: bool = False):
    config = dsv4_mini.ModelConfig.tiny()
    model = weights.build_model(config, seed=3, num_physical_experts=config.n_routed_experts + 4)
    manager = eplb.EPLBManager(model, eplb.EPLBConfig(num_ranks=2, rebalance_num_iterations=3, window=4096,
                                                      layers_per_step=2, background_checks=background_checks))
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=16, prefill_chunk=7, prefill_tail=3,
                    eplb=manager, decode_graphs=True, run_ahead=run_ahead)
    assert engine.run_ahead == run_ahead
    gen = torch.Generator().manual_seed(8)
    requests = []
    for i, (n, m) in enumerate([(3, 9), (11, 6), (2, 12), (8, 5), (5, 10), (4, 7)]):
        prompt = torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
        temperature = 0.0 if i % 2 else 1.0
        requests.append((prompt, SamplingParams(max_tokens=m, temperature=temperature, top_p=0.9, seed=i,
                                                frequency_penalty=0.5 * (i == 4), ignore_eos=True)))
    used_ahead = []
    decode = engine.runner.decode

    def decode_noting_ahead(seqs, positions, load):
        ahead = engine.runner.ahead
        used_ahead.append(ahead is not None and ahead.seqs == seqs and ahead.positions == positions)
        return decode(seqs, positions, load)

    engine.runner.decode = decode_noting_ahead
    seqs = run_requests(engine, requests)
    return manager, [s.output_ids for s in seqs], sum(used_ahead)


def test_eplb_load_is_counted_once_per_step_with_run_ahead():
    """Under EPLB with rebalances (moved over several steps), run-ahead gives the same tokens and the
    very same per-step load counts and placements: a step launched ahead is counted only when kept,
    and none is launched over a move."""
    base, base_out, _ = run_with_eplb(run_ahead=False)
    ahead, ahead_out, used_ahead = run_with_eplb(run_ahead=True)
    assert used_ahead > 0
    assert ahead_out == base_out
    steps = base.recorder.steps
    assert ahead.recorder.steps == steps and steps < 4096
    assert base.counters["rebalances_total"] >= 2
    assert {k: v for k, v in ahead.counters.items() if "seconds" not in k} == \
        {k: v for k, v in base.counters.items() if "seconds" not in k}
    assert torch.equal(ahead.recorder.physical[:steps], base.recorder.physical[:steps])
    assert torch.equal(ahead.recorder.logical[:steps], base.recorder.logical[:steps])
    assert torch.equal(ahead.location.phy2log, base.location.phy2log)
    assert int(base.recorder.physical[:steps].sum()) > 0


def test_background_checks_keep_run_ahead_and_count_each_step_once():
    """Checks decided on a worker thread (the server's mode on CUDA): the engine keeps running ahead
    while a check is in flight, the verdict is applied at a later step with no step launched ahead of
    it, and the outputs and every step's logical load equal the engine-thread checks' run (logical load
    does not depend on the placement when each step is folded through the placement that ran it)."""
    base, base_out, _ = run_with_eplb(run_ahead=False)
    original = eplb.EPLBManager._start_background_check

    class LateCheck:  # finished, but seen finished only from its second look on: lands between steps
        def __init__(self, future):
            self.future, self.looks = future, 0

        def done(self):
            self.looks += 1
            return self.looks > 1 and self.future.done()

        def result(self):
            return self.future.result()

    def start_and_wait(self):
        original(self)
        self._check.result()
        self._check = LateCheck(self._check)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eplb.EPLBManager, "_start_background_check", start_and_wait)
        background, out, used_ahead = run_with_eplb(run_ahead=True, background_checks=True)
    assert background.config.background_checks and used_ahead > 0
    assert out == base_out
    steps = base.recorder.steps
    assert background.recorder.steps == steps
    assert torch.equal(background.recorder.logical[:steps], base.recorder.logical[:steps])
    assert background.counters["rebalances_total"] >= 2
    moves = [r for r in background.records if r.decision == "moved"]
    assert all(r.finished_step > r.step for r in moves)  # applied after the step whose load it judged
    assert background._judges.submit(os.getpid).result() != os.getpid()  # judged in another process
    background.close()


def test_a_dead_judging_process_hands_checks_to_the_engine_thread():
    """The judging process killed (e.g. by the OOM killer): the check in flight is dropped with an error
    logged, and later checks run on the engine thread; decoding and EPLB go on."""
    config = dsv4_mini.ModelConfig.tiny()
    model = weights.build_model(config, seed=3, num_physical_experts=config.n_routed_experts + 4)
    manager = eplb.EPLBManager(model, eplb.EPLBConfig(num_ranks=2, rebalance_num_iterations=3, window=64,
                                                      background_checks=True))
    manager._judges.submit(int).result()  # the process is up
    for process in list(manager._judges._processes.values()):
        process.kill()
        process.join()
    engine = Engine(model, max_batch_size=4, max_seq_len=64, max_queue=8, eplb=manager, decode_graphs=True)
    prompt = list(range(1, 9))
    seqs = run_requests(engine, [(prompt, SamplingParams(max_tokens=12, ignore_eos=True))] * 2)
    assert all(len(s.output_ids) == 12 for s in seqs)
    assert not manager.config.background_checks and manager._judges is None
    assert manager.counters["rebalance_checks_total"] >= 2  # checks went on, on this thread
