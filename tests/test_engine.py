"""The engine with the real tiny model on CPU, stepped by hand (no thread, no HTTP): continuous
batching, chunked prefill and prompt tails fed through the one-token step all give the tokens of
`dsv4_mini.generate` (greedy, one request alone)."""
import pytest
import torch

import dsv4_mini
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
