"""Sampling: the next token of every row of a step, in one batched pass on the device.

Per row, in vLLM's order (its v1 sampler):
  raw logits ──► logprobs (of the model's own distribution: log_softmax of the raw logits)
      │
      ├─► OpenAI penalties: logits[t] -= count[t]·frequency_penalty + (count[t] > 0)·presence_penalty
      │   (count = how often t was generated so far by this request; prompt tokens do not count)
      ├─► greedy rows (temperature < GREEDY_BELOW): argmax
      └─► x = logits / temperature → min_p → top_k → top_p → an exponential race among the kept tokens

Truncation keeps a top set {x ≥ τ}: min_p keeps x ≥ max(x) + log(min_p) (p ≥ min_p·p_max), top_k the
k largest, top_p the smallest top set (after min_p and top_k, renormalized) whose probability mass
reaches top_p. Tokens tied with the last kept one are all kept.

The race: token = argmax over kept i of x_i + g_i, g_i = −log(−log u_i) (Gumbel; the same as argmax of
p_i / E_i with E_i ~ Exp(1)), which draws i with probability softmax(x)_i over the kept set. u_i comes
from a counter-based hash of (seed, position, i): no generator state, so a seeded request draws the same
tokens whatever else shares its batch, and the draw can be taken on the device without a host sync.

`sample_torch` is the readable definition (and the CPU path); `sample_triton` is one program per row that
finds each threshold by a multi-pivot search over the row (a few passes, no sort: FlashInfer's
sorting-free sampling is the model) and runs the race in one more pass. `Sampler` is what the model
runner uses: per-request parameters → device tensors, per-slot token counts for the penalties,
logprobs; it never waits for the device.

Shapes: B rows, V sampled vocabulary (the tokenizer's ids; the logits may be wider), K top logprobs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import _mul32, _next_pow2, _use_triton, triton

if triton is not None:
    import triton.language as tl

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (logits / T would overflow)
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_FMIX1, _FMIX2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 constants
_SEED_SALT = 0x2545F491
SEED_MASK = (1 << 63) - 1  # seeds are kept as non-negative int64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # < GREEDY_BELOW = greedy
    top_p: float = 1.0           # 1 = off
    top_k: int = 0               # 0 = off
    min_p: float = 0.0           # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None         # None: off; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # None: off; k >= 0: every prompt token's logprob and the top k
    seed: int | None = None      # None: drawn from the engine's seeded stream
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprobs:
    """One position's logprobs in the model's distribution (log_softmax of its raw logits)."""
    logprob: float                  # of the token at this position
    top: list[tuple[int, float]]    # the k most likely (token id, logprob), most likely first


# ---------------------------------------------------------------------------------------------------
# The noise: u_i from a hash of (seed, position, i)
# ---------------------------------------------------------------------------------------------------

def _fmix32(h):
    """murmur3's finalizer on uint32 values held in int64 (Python ints or tensors)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX2)
    return h ^ (h >> 16)


def noise_keys(seed, position):
    """The two 32-bit keys of a row's draw, from the request's seed (non-negative int64) and the index in
    its sequence of the token being drawn (each position gets fresh, independent noise). Python ints or
    int64 tensors [B]: key_a = fmix32(position·0x9E3779B1 ^ seed_lo), key_b = fmix32(key_a ^ seed_hi ^ salt)."""
    key_a = _fmix32(_mul32(position & _M32, _GOLDEN) ^ (seed & _M32))
    key_b = _fmix32(key_a ^ (seed >> 32) ^ _SEED_SALT)
    return key_a, key_b


def gumbel_noise(seed: Tensor, position: Tensor, V: int) -> Tensor:
    """[B] int64 seeds and positions -> [B, V] fp32 Gumbel noise −log(−log u), u = (h >> 9 + 0.5) / 2^23.

    h = fmix32(fmix32(i·0x9E3779B1 ^ key_a) ^ key_b) for column i: all 32-bit arithmetic, so the
    Triton kernel computes the same bits."""
    key_a, key_b = noise_keys(seed, position)  # [B]
    cols = torch.arange(V, device=seed.device)  # [V]
    h = _fmix32(_mul32(cols, _GOLDEN)[None, :] ^ key_a[:, None])  # [B, V]
    h = _fmix32(h ^ key_b[:, None])
    u = ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)  # 23 bits: the +0.5 stays exact, u < 1
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------------------------------
# Per-row parameters on the device
# ---------------------------------------------------------------------------------------------------

def float_params(params: SamplingParams) -> tuple[float, float, float]:
    """(1 / temperature or 0 for greedy, top_p, log(min_p) or -inf): how the kernels read them."""
    inv_t = 0.0 if params.greedy else 1.0 / params.temperature
    return inv_t, params.top_p, math.log(params.min_p) if params.min_p > 0 else -math.inf


@dataclass
class RowParams:
    """The sampling parameters of B rows, as contiguous device tensors (what the kernels read)."""
    inv_temperature: Tensor  # [B] fp32, 0 = greedy
    top_p: Tensor            # [B] fp32, >= 1 = off
    log_min_p: Tensor        # [B] fp32, log(min_p); -inf = off
    top_k: Tensor            # [B] int64, <= 0 = off
    seed: Tensor             # [B] int64, non-negative
    position: Tensor         # [B] int64: index in its sequence of the token drawn

    @classmethod
    def from_host(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], device="cpu") -> "RowParams":
        f = torch.tensor(list(zip(*map(float_params, params))), dtype=torch.float32, device=device)  # [3, B]
        i = torch.tensor([[p.top_k for p in params], [s & SEED_MASK for s in seeds], positions], device=device)  # [3, B]
        return cls(f[0], f[1], f[2], i[0], i[1], i[2])


# ---------------------------------------------------------------------------------------------------
# torch twin: the definition
# ---------------------------------------------------------------------------------------------------

def _truncation_threshold(x: Tensor, top_k: int, top_p: float, log_min_p: float) -> Tensor:
    """One row x [V] fp32 (already divided by the temperature) -> τ: the kept tokens are x >= τ."""
    m = x.max()
    tau = m + log_min_p  # min_p: p_i >= min_p·p_max  <=>  x_i >= max(x) + log(min_p)
    if 0 < top_k < x.numel():
        tau = torch.maximum(tau, torch.topk(x, top_k).values[-1])
    if top_p < 1.0:
        kept = x >= tau
        order = torch.argsort(x, descending=True, stable=True)  # [V]
        w = torch.where(kept, torch.exp(x - m), 0.0)[order]  # [V] unnormalized probabilities, largest first
        mass = torch.cumsum(w, 0)
        n = int((mass < top_p * mass[-1]).sum()) + 1  # the smallest prefix whose mass reaches top_p
        tau = torch.maximum(tau, x[order[min(n, int(kept.sum())) - 1]])
    return tau


def sample_torch(logits: Tensor, V: int, p: RowParams) -> Tensor:
    """logits [B, >= V] -> tokens [B] int64, drawn from columns [0, V) (see the module doc).

    Row by row, so a row's floating-point results never depend on the batch (CPU vector loops round
    a batch's tail elements differently)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    inv_t, top_p, log_min_p, top_k = (t.tolist() for t in (p.inv_temperature, p.top_p, p.log_min_p, p.top_k))
    for b in range(logits.shape[0]):
        row = logits[b, :V].float()  # [V]
        if inv_t[b] == 0.0:
            out[b] = row.argmax()
            continue
        x = row * inv_t[b]
        tau = _truncation_threshold(x, top_k[b], top_p[b], log_min_p[b])
        score = torch.where(x >= tau, x + gumbel_noise(p.seed[b:b + 1], p.position[b:b + 1], V)[0], -math.inf)
        out[b] = score.argmax()
    return out


# ---------------------------------------------------------------------------------------------------
# Triton: one program per row, thresholds by multi-pivot search, then the race
# ---------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _fmix32_tl(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        h = h ^ (h >> 16)
        return h

    @triton.jit
    def _gumbel_tl(cols, seed, position):
        """Same bits as gumbel_noise for columns `cols` of a row (seed, position: int64 scalars)."""
        key_a = _fmix32_tl((position.to(tl.uint32) * 0x9E3779B1) ^ seed.to(tl.uint32))  # low 32 bits
        key_b = _fmix32_tl(key_a ^ (seed >> 32).to(tl.uint32) ^ 0x2545F491)
        h = _fmix32_tl((cols.to(tl.uint32) * 0x9E3779B1) ^ key_a)
        h = _fmix32_tl(h ^ key_b)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return -tl.log(-tl.log(u))

    @triton.jit
    def _order_key(x):
        """fp32 -> int64 whose order is the float order (-0.0 as +0.0): thresholds become integers."""
        bits = (x + 0.0).to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)

    @triton.jit
    def _stat_at_pivots(row_ptr, V, inv_t, m, floor_key, pivots, lo, hi, MASS: tl.constexpr,
                        NPIV: tl.constexpr, BLOCK: tl.constexpr):
        """One pass over the row -> (stat [NPIV], lowest and highest key of the tokens in [lo, hi)).
        stat: for each pivot key p, how many tokens (MASS=False) or how much unnormalized probability
        exp(x - m) (MASS=True) the row has at keys >= max(p, floor_key)."""
        acc = tl.zeros([NPIV], dtype=tl.float32)
        data_lo = tl.full([BLOCK], 0x7FFFFFFFFFFFFFFF, tl.int64)
        data_hi = tl.full([BLOCK], -0x7FFFFFFFFFFFFFFF, tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)  # [BLOCK]
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
            key = _order_key(x)
            kept = (cols < V) & (key >= floor_key)
            if MASS:
                w = tl.where(kept, tl.exp(x - m), 0.0)
            else:
                w = kept.to(tl.float32)
            acc += tl.sum(tl.where(key[:, None] >= pivots[None, :], w[:, None], 0.0), axis=0)
            inside = kept & (key >= lo) & (key < hi)
            data_lo = tl.minimum(data_lo, tl.where(inside, key, 0x7FFFFFFFFFFFFFFF))
            data_hi = tl.maximum(data_hi, tl.where(inside, key, -0x7FFFFFFFFFFFFFFF))
        return acc, tl.min(data_lo, axis=0), tl.max(data_hi, axis=0)

    @triton.jit
    def _search_threshold(row_ptr, V, inv_t, m, floor_key, lo, hi, target, MASS: tl.constexpr,
                          NPIV: tl.constexpr, BLOCK: tl.constexpr):
        """The largest key t in [lo, hi) with stat(t) >= target, given stat(lo) >= target > stat(hi)
        (stat: _stat_at_pivots). Each pass tests NPIV pivots spread over (lo, hi), and moves the
        bracket's ends onto the lowest and highest token inside it (that changes neither stat), so
        it shrinks ~NPIV+1 times per pass and stops once one token value is left in it."""
        j = tl.arange(0, NPIV).to(tl.int64) + 1  # [NPIV]
        while hi - lo > 1:
            pivots = lo + ((hi - lo) * j) // (NPIV + 1)  # [NPIV] in [lo, hi)
            stat, data_lo, data_hi = _stat_at_pivots(row_ptr, V, inv_t, m, floor_key, pivots, lo, hi,
                                                     MASS, NPIV, BLOCK)
            ok = stat >= target
            lo = tl.maximum(tl.where(data_lo <= data_hi, tl.maximum(lo, data_lo), lo),
                            tl.max(tl.where(ok, pivots, lo), axis=0))
            hi = tl.minimum(tl.where(data_lo <= data_hi, tl.minimum(hi, data_hi + 1), hi),
                            tl.min(tl.where(ok, hi, pivots), axis=0))
        return lo

    @triton.jit
    def _sample_kernel(logits_ptr, stride, V, inv_t_ptr, top_p_ptr, log_min_p_ptr, top_k_ptr,
                       seed_ptr, position_ptr, out_ptr, NPIV: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride
        inv_t = tl.load(inv_t_ptr + row)
        # pass 1: max and first argmax of the raw logits
        best = float("-inf")
        best_idx = 0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            raw = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
            block_max = tl.max(raw, axis=0)
            block_idx = start + tl.argmax(raw, axis=0, tie_break_left=True)
            best_idx = tl.where(block_max > best, block_idx, best_idx)
            best = tl.maximum(best, block_max)
        token = best_idx.to(tl.int64)
        if inv_t > 0.0:  # a sampled row (greedy rows keep the argmax)
            m = best * inv_t  # = max(x): scaling by a positive number keeps the order
            top_k = tl.load(top_k_ptr + row)
            top_p = tl.load(top_p_ptr + row)
            hi = _order_key(m) + 1  # nothing is kept at or above hi
            floor_key = _order_key(m + tl.load(log_min_p_ptr + row))  # min_p
            everything = tl.full([NPIV], 0, tl.int64) + floor_key
            if top_k > 0:
                n_kept = tl.max(_stat_at_pivots(row_ptr, V, inv_t, m, floor_key, everything, floor_key, hi,
                                                False, NPIV, BLOCK)[0], 0)
                if n_kept > top_k.to(tl.float32):
                    floor_key = _search_threshold(row_ptr, V, inv_t, m, floor_key, floor_key, hi,
                                                  top_k.to(tl.float32), False, NPIV, BLOCK)
            if top_p < 1.0:
                everything = tl.full([NPIV], 0, tl.int64) + floor_key
                total = tl.max(_stat_at_pivots(row_ptr, V, inv_t, m, floor_key, everything, floor_key, hi,
                                               True, NPIV, BLOCK)[0], 0)
                floor_key = _search_threshold(row_ptr, V, inv_t, m, floor_key, floor_key, hi,
                                              top_p * total, True, NPIV, BLOCK)
            # the race among the kept tokens
            seed = tl.load(seed_ptr + row)
            position = tl.load(position_ptr + row)
            best_score = float("-inf")
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")) * inv_t
                kept = (cols < V) & (_order_key(x) >= floor_key)
                score = tl.where(kept, x + _gumbel_tl(cols, seed, position), float("-inf"))
                block_max = tl.max(score, axis=0)
                block_idx = start + tl.argmax(score, axis=0, tie_break_left=True)
                token = tl.where(block_max > best_score, block_idx.to(tl.int64), token)
                best_score = tl.maximum(best_score, block_max)
        tl.store(out_ptr + row, token)


SAMPLE_CFG = dict(block=1024, npiv=16)  # Triton launch: columns per block, pivots per search pass


def sample_triton(logits: Tensor, V: int, p: RowParams) -> Tensor:
    """Triton twin of sample_torch (same signature and tokens, up to exp/log rounding at near-ties)."""
    B = logits.shape[0]
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        logits = logits.float().contiguous()
    block = min(SAMPLE_CFG["block"], _next_pow2(V))
    # no FMA contraction: the kernel rounds x·(1/T) + g and max·(1/T) + log(min_p) like the twin
    _sample_kernel[(B,)](logits, logits.stride(0), V, p.inv_temperature, p.top_p, p.log_min_p, p.top_k,
                         p.seed, p.position, out, NPIV=SAMPLE_CFG["npiv"], BLOCK=block,
                         num_warps=8 if block >= 1024 else 4, enable_fp_fusion=False)
    return out


def sample(logits: Tensor, V: int, p: RowParams) -> Tensor:
    """logits [B, >= V] -> tokens [B] int64 (see sample_torch). Triton on CUDA, torch otherwise."""
    return (sample_triton if _use_triton(logits) else sample_torch)(logits, V, p)


# ---------------------------------------------------------------------------------------------------
# Penalties and logprobs
# ---------------------------------------------------------------------------------------------------

def apply_penalties(logits: Tensor, counts: Tensor, frequency: Tensor, presence: Tensor) -> Tensor:
    """OpenAI's: logits [B, V] - counts [B, V] · frequency [B, 1] - (counts > 0) · presence [B, 1]."""
    return logits - counts * frequency - (counts > 0) * presence


def logprobs_of(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, V], tokens [N] -> (logprob of each token [N], top-k ids [N, k], top-k logprobs [N, k]),
    in the distribution log_softmax(logits) (fp32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1)  # [N]
    top = logprobs.topk(k, dim=-1)
    return chosen, top.indices, top.values


def to_token_logprobs(chosen: list[float], top_ids: list[list[int]], top_values: list[list[float]],
                      k: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(c, list(zip(ids[:k], vals[:k]))) for c, ids, vals in zip(chosen, top_ids, top_values)]


# ---------------------------------------------------------------------------------------------------
# The runner's sampler
# ---------------------------------------------------------------------------------------------------

@dataclass
class StepSample:
    """One step's draws, on the device until `to_host`."""
    tokens: Tensor                    # [B] int64
    logprobs: tuple | None = None     # (chosen [B], top ids [B, K], top logprobs [B, K]) if any row asked
    top_k: int = 0                    # K


class Sampler:
    """Samples the rows of a step on the device, without a host sync.

    Each request's parameters are written once, at admission, into per-slot tables on the device; a
    step sends only its rows' slots and positions. Penalties use per-slot counts of the tokens
    generated so far: counts [num_slots, logit width] int32 exists from the first penalized request
    on; a penalized request's row is zeroed when it is admitted, and every kept token of a step that
    has a penalized row adds one (other requests' rows may count garbage: zeroed before they are read).
    """

    def __init__(self, num_slots: int, num_token_ids: int | None, device):
        self.num_slots, self.num_token_ids, self.device = num_slots, num_token_ids, torch.device(device)
        self.pin = self.device.type == "cuda"  # host->device copies that do not wait for queued GPU work
        self.float_table = torch.zeros(3, num_slots, device=self.device)  # float_params per slot
        self.int_table = torch.zeros(2, num_slots, dtype=torch.int64, device=self.device)  # top_k, seed
        self.counts: Tensor | None = None

    def warm_up(self, vocab_size: int) -> None:
        """Compile the sampling kernel now (server start), not on the first sampled request. CUDA only."""
        if self.device.type != "cuda":
            return
        logits = torch.zeros(1, vocab_size, device=self.device)
        rows = RowParams.from_host([SamplingParams(top_k=2, top_p=0.5)], [0], [0], self.device)
        sample(logits, self.num_token_ids or vocab_size, rows)

    def admit(self, slot: int, params: SamplingParams, seed: int, vocab_size: int) -> None:
        self.float_table[:, slot].copy_(self._to_device(float_params(params), torch.float32))
        self.int_table[:, slot].copy_(self._to_device((params.top_k, seed & SEED_MASK), torch.int64))
        if params.penalized:
            if self.counts is None:
                self.counts = torch.zeros(self.num_slots, vocab_size, dtype=torch.int32, device=self.device)
            self.counts[slot].zero_()

    def sample(self, logits: Tensor, seqs: list, counted: list[bool]) -> StepSample:
        """logits [B, V'] fp32 of rows `seqs` (engine.Sequence: params, slot, num_tokens = the index of
        the token drawn; admitted) -> StepSample. `counted[b]`: row b's token is kept (counts for penalties)."""
        V = self.num_token_ids or logits.shape[1]
        raw = logits[:, :V]  # [B, V]
        params = [s.params for s in seqs]
        penalized = self.counts is not None and any(p.penalized for p in params)
        greedy = all(p.greedy for p in params)
        slots = None
        if penalized or not greedy:
            slots, positions = self._to_device(([s.slot for s in seqs], [s.num_tokens for s in seqs]), torch.int64)
        if penalized:
            raw = self._penalize(raw, seqs, slots)
        if greedy:
            tokens = raw.argmax(-1)  # [B]
        else:
            f, i = self.float_table[:, slots], self.int_table[:, slots]  # [3, B], [2, B]
            tokens = sample(raw, V, RowParams(f[0], f[1], f[2], i[0], i[1], positions))
        if penalized:  # counts[slot, token] += 1 for the kept rows (atomics: no sync, graph-safe)
            flat = slots * self.counts.shape[1] + tokens  # [B]
            self.counts.view(-1).scatter_add_(0, flat, self._to_device(counted, torch.int32))
        out = StepSample(tokens)
        if any(p.logprobs is not None for p in params):
            out.top_k = max(p.logprobs or 0 for p in params)
            out.logprobs = logprobs_of(logits[:, :V], tokens, out.top_k)  # the model's, before penalties
        return out

    def _to_device(self, values, dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=self.pin)

    def _penalize(self, logits: Tensor, seqs: list, slots: Tensor) -> Tensor:
        penalties = self._to_device([[s.params.frequency_penalty for s in seqs],
                                     [s.params.presence_penalty for s in seqs]], torch.float32)  # [2, B]
        counts = self.counts[slots, :logits.shape[1]]  # [B, V]
        return apply_penalties(logits.float(), counts, penalties[0, :, None], penalties[1, :, None])

    def prompt_logprobs(self, logits: Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
        """logits [N, V'] of N prompt positions, targets: the next prompt token of each -> their logprobs
        (waits for the device: only requests that ask for prompt logprobs pay for it)."""
        V = self.num_token_ids or logits.shape[1]
        target = torch.tensor(targets, device=logits.device)
        chosen, ids, values = logprobs_of(logits[:len(targets), :V], target, max(k, 0))
        return to_token_logprobs(chosen.tolist(), ids.tolist(), values.tolist(), k)
