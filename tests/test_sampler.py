"""The batched sampler (sampler.py): the torch twin against direct computations on the logits
(truncated softmax by chi-square, greedy equivalences, penalties, logprobs), the counter-based noise
against its plain-Python spec, seeded rows against their neighbours, and the Triton kernel (under
TRITON_INTERPRET=1, tiny vocabularies, masked tails) against the twin."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before any module imports triton

import math
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2

import sampler
from sampler import RowParams, Sampler, SamplingParams

M32 = 0xFFFFFFFF


@dataclass
class Row:
    """What Sampler reads of an engine.Sequence."""
    params: SamplingParams
    seed: int = 0
    slot: int = 0
    num_tokens: int = 0


def rows_params(settings, seeds, positions) -> RowParams:
    return RowParams.from_host(list(settings), list(seeds), list(positions))


def truncated_softmax(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row must follow, computed directly in float64: softmax(logits / T),
    min_p (p >= min_p * max p), top_k, then the smallest most-likely prefix with mass >= top_p."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    keep = probs >= p.min_p * probs.max()
    if 0 < p.top_k < probs.numel():
        keep &= probs >= probs.topk(p.top_k).values[-1]
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        keep_sorted = mass_before < p.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, torch.where(keep_sorted, sorted_probs, 0.0))
        probs /= probs.sum()
    return probs


# ------------------------------------------------------------------------------------ the noise
def py_fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def test_noise_keys_and_uniforms_match_their_python_spec():
    for seed, position in [(0, 0), (1, 7), (2**40 + 3, 12345), (2**63 - 1, 2**31), (-5, 3)]:
        s = seed & (2**63 - 1)
        key_a = py_fmix32((((position & M32) * 0x9E3779B1) & M32) ^ (s & M32))
        key_b = py_fmix32(key_a ^ (s >> 32) ^ 0x2545F491)
        assert sampler.noise_keys(s, position) == (key_a, key_b)
        assert [k.item() for k in sampler.noise_keys(torch.tensor([s]), torch.tensor([position]))] == [key_a, key_b]
        got = sampler.gumbel_noise(torch.tensor([s]), torch.tensor([position]), 50)[0]
        for i in (0, 1, 17, 49):
            h = py_fmix32(py_fmix32(((i * 0x9E3779B1) & M32) ^ key_a) ^ key_b)
            u = ((h >> 9) + 0.5) / 2**23
            assert 0.0 < u < 1.0
            assert got[i].item() == pytest.approx(-math.log(-math.log(u)), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------ distribution
SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=0.8, top_k=8, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampled_tokens_follow_the_truncated_softmax(params):
    """Chi-square of N draws (fixed seeds, so the test cannot flake) against the truncated softmax;
    no draw ever falls outside the kept set. Half the draws vary the position, half the seed."""
    V, N = 24, 6000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 1.5
    want = truncated_softmax(logits, params)
    seeds = [7] * (N // 2) + list(range(1000, 1000 + N // 2))
    positions = list(range(N // 2)) + [5] * (N // 2)
    tokens = sampler.sample_torch(logits.expand(N, V), V, rows_params([params] * N, seeds, positions))
    counts = torch.bincount(tokens, minlength=V).double()
    kept = want > 0
    assert counts[~kept].sum() == 0
    expected = want[kept] * N
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(1 - 1e-4, int(kept.sum()) - 1), (stat, counts[kept].tolist(), expected.tolist())


def test_top_k_1_tiny_top_p_and_full_min_p_are_greedy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 50, generator=g) * 4
    greedy = logits.argmax(-1)
    for params in (SamplingParams(temperature=1.7, top_k=1), SamplingParams(temperature=1.0, top_p=1e-9),
                   SamplingParams(temperature=0.9, min_p=1.0), SamplingParams(temperature=0),
                   SamplingParams(temperature=1e-6)):
        p = rows_params([params] * 30, range(30), range(30))
        assert torch.equal(sampler.sample_torch(logits, 50, p), greedy)


def test_seeded_row_draws_the_same_token_whatever_its_neighbours():
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, 40, generator=g)
    mine = SamplingParams(temperature=1.0, top_p=0.9)
    for pos in range(5):
        alone = sampler.sample_torch(row, 40, rows_params([mine], [99], [pos]))
        for B in (2, 5, 13):
            batch = torch.randn(B, 40, generator=g)
            at = B // 2
            batch[at] = row[0]
            others = [SamplingParams(temperature=0.5 + 0.1 * i, top_k=i % 4) for i in range(B)]
            others[at] = mine
            seeds = [1000 + i for i in range(B)]
            seeds[at] = 99
            positions = [pos + 3 * i for i in range(B)]
            positions[at] = pos
            got = sampler.sample_torch(batch, 40, rows_params(others, seeds, positions))
            assert got[at] == alone[0]


# ------------------------------------------------------------------------------------ penalties, logprobs
def test_penalties_follow_openai_definition():
    logits = torch.randn(2, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 2], [5, 0, 0, 0, 1, 0]], dtype=torch.int32)
    freq, pres = torch.tensor([[0.5], [-0.25]]), torch.tensor([[1.0], [0.0]])
    got = sampler.apply_penalties(logits, counts, freq, pres)
    for b in range(2):
        for t in range(6):
            c = int(counts[b, t])
            want = logits[b, t] - c * freq[b, 0] - (1.0 if c > 0 else 0.0) * pres[b, 0]
            assert got[b, t].item() == pytest.approx(want.item())


def test_sampler_counts_its_own_tokens_and_penalizes_greedy_rows():
    """A greedy row with a large frequency penalty never repeats a token; the counts it keeps are
    exactly its tokens; a row admitted later into the same slot starts from zero."""
    V = 8
    s = Sampler(num_slots=2, num_token_ids=None, device="cpu")
    params = SamplingParams(temperature=0, frequency_penalty=100.0)
    rows = [Row(params, slot=1), Row(SamplingParams(temperature=0), slot=0)]
    s.admit(1, params, 0, V)
    s.admit(0, rows[1].params, 0, V)
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1, -2], [0.0, 1, 2, 3, 4, 5, 6, 7]])
    seen = []
    for _ in range(V):
        out = s.sample(logits, rows, [True, True])
        seen.append(int(out.tokens[0]))
        assert int(out.tokens[1]) == 7  # the unpenalized neighbour is plain greedy
    assert sorted(seen) == list(range(V))  # every token once, in order of the logits
    assert seen == list(range(V))
    assert s.counts[1].tolist() == [1] * V
    s.admit(1, params, 0, V)
    assert s.counts[1].sum() == 0


def test_logprobs_are_the_models_before_penalties_and_temperature():
    V = 10
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V + 2, generator=g)  # two padded ids past the tokenizer's
    s = Sampler(num_slots=3, num_token_ids=V, device="cpu")
    rows = [Row(SamplingParams(temperature=0.7, logprobs=3, presence_penalty=2.0), seed=1, slot=0, num_tokens=4),
            Row(SamplingParams(temperature=0, logprobs=0), slot=1),
            Row(SamplingParams(temperature=1.0), seed=3, slot=2)]
    for r in rows:
        s.admit(r.slot, r.params, r.seed, V + 2)
    out = s.sample(logits, rows, [True] * 3)
    chosen, top_ids, top_values = out.logprobs
    want = torch.log_softmax(logits[:, :V].double(), -1)
    assert out.top_k == 3
    for b in range(3):
        assert chosen[b].item() == pytest.approx(want[b, out.tokens[b]].item(), abs=1e-5)
        assert top_ids[b].tolist() == want[b].topk(3).indices.tolist()
        assert top_values[b].tolist() == pytest.approx(want[b].topk(3).values.tolist(), abs=1e-5)
    prompt = s.prompt_logprobs(logits, [4, 9], k=2)
    assert [p.logprob for p in prompt] == pytest.approx([want[0, 4].item(), want[1, 9].item()], abs=1e-5)
    assert [t for t, _ in prompt[1].top] == want[1].topk(2).indices.tolist()


# ------------------------------------------------------------------------------------ Triton twin
def test_triton_sampler_is_interpreted():
    assert type(sampler._sample_kernel).__name__ == "InterpretedFunction"


TWIN_SETTINGS = SETTINGS + [
    SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=2.0, top_k=500), SamplingParams(temperature=0.3, top_p=0.5, min_p=0.3),
    SamplingParams(temperature=1e-4), SamplingParams(temperature=1.0, top_k=3, top_p=0.2),
]


@pytest.mark.parametrize("V, width, block", [(37, 40, 1024), (64, 64, 1024), (100, 128, 32), (100, 100, 16)])
def test_triton_sampler_matches_twin(V, width, block, monkeypatch):
    """fp32 logits, vocabularies that are not a power of two, a row wider than V (ids past it are never
    drawn), blocks smaller than the row (several passes per search), a few -inf logits."""
    monkeypatch.setitem(sampler.SAMPLE_CFG, "block", block)
    g = torch.Generator().manual_seed(V + block)
    n = len(TWIN_SETTINGS)
    logits = torch.randn(2 * n, width, generator=g) * 3
    logits[:, V:] = 50.0  # padded ids: huge logits that must never be drawn
    logits[3, :5] = -math.inf
    p = rows_params(TWIN_SETTINGS * 2, range(2 * n), [7 * i for i in range(2 * n)])
    got = sampler.sample_triton(logits, V, p)
    want = sampler.sample_torch(logits, V, p)
    assert got.tolist() == want.tolist()
    assert int(got.max()) < V


def test_triton_noise_matches_twin():
    """The race alone (no truncation, T = 1): the kernel's Gumbel noise has the twin's bits."""
    V = 64
    logits = torch.zeros(16, V)  # all tied: the winner is decided by the noise alone
    p = rows_params([SamplingParams(temperature=1.0)] * 16, range(16), range(16))
    assert sampler.sample_triton(logits, V, p).tolist() == sampler.sample_torch(logits, V, p).tolist()


def test_sampler_tables_give_the_rows_own_parameters():
    """Sampler reads each row's parameters from per-slot tables written at admission: it draws what
    sample_torch draws from the same rows' parameters, whatever the order of the rows."""
    V = 30
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, V, generator=g) * 2
    rows = [Row(SamplingParams(temperature=0.8, top_k=6), seed=41, slot=3, num_tokens=10),
            Row(SamplingParams(temperature=1.2, top_p=0.7), seed=2**62 + 5, slot=0, num_tokens=3),
            Row(SamplingParams(temperature=0), seed=7, slot=2, num_tokens=8),
            Row(SamplingParams(temperature=1.0, min_p=0.2), seed=9, slot=1, num_tokens=1)]
    s = Sampler(num_slots=4, num_token_ids=None, device="cpu")
    for r in rows:
        s.admit(r.slot, r.params, r.seed, V)
    want = sampler.sample_torch(logits, V, rows_params([r.params for r in rows], [r.seed for r in rows],
                                                       [r.num_tokens for r in rows]))
    assert s.sample(logits, rows, [True] * 4).tokens.tolist() == want.tolist()
    order = [2, 0, 3, 1]
    got = s.sample(logits[order], [rows[i] for i in order], [True] * 4).tokens
    assert got.tolist() == want[order].tolist()
