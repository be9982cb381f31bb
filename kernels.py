"""Routing and expert kernels for dsv4-mini: each Triton kernel has a plain-torch twin.

The torch twins are the readable definition of the semantics and the CPU production path; the
Triton kernels are the CUDA path and must match them (ids exactly, floats to fp32 rounding; on a
GPU, score_topk may pick differently where two experts' scores tie to within GPU exp/log rounding:
1 row in 262 144 in bench_kernels.py).
Public functions dispatch: Triton for CUDA tensors, torch otherwise; env `DSV4_KERNELS=torch|triton`
forces one (Triton on CPU tensors needs `TRITON_INTERPRET=1` set before triton is imported).

Routed experts may be held quantised (dsv4_mini.RoutedExperts): moe_experts takes their format from
w1.dtype (uint8 = packed fp4 e2m1, float8_e4m3fn = fp8, else unquantised) and scales=(s1, s3, s2) of
ue8m0 bytes; the Triton kernels dequantise tile by tile in registers, the torch twin dequantises each
used slot with checkpoint's reference functions.

Shapes: T tokens, E logical experts, K top-k, V vocab, P physical slots, X max replicas per expert,
d hidden, I expert intermediate size, P_local slots held by this rank.
"""
import os

import torch
import torch.nn.functional as F

import checkpoint

try:  # the torch twins work without triton (e.g. a CPU-only install)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = [
    "replica_index", "hash_topk", "score_topk", "moe_experts",
    "hash_topk_torch", "hash_topk_triton", "score_topk_torch", "score_topk_triton",
    "moe_experts_torch", "moe_experts_triton", "expert_format", "expert_shapes", "dequantize_slot",
    "hc_pre_triton", "hc_post_triton", "gpu_clock",
]

# ---------------------------------------------------------------------------------------------
# Replica choice: r = mix32(token, k) % count
# ---------------------------------------------------------------------------------------------
# Why a hash: with `flat_pos % count` (flat_pos = t*K + k) the replica depends only on k whenever
# count divides K, so an expert that is usually some token's k-th choice loads one replica only.
# A well-mixed hash of (token, k) gives every replica 1/count of its expert's choices.
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # odd multiplier: t -> t*G is a bijection mod 2^32 (spreads consecutive t)
_FMIX1 = 0x85EBCA6B  # murmur3 fmix32 constants (full avalanche)
_FMIX2 = 0xC2B2AE35


def _mul32(a, c: int):
    """(a * c) mod 2^32 for int64 a in [0, 2^32): split c in 16-bit halves so int64 never overflows."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def replica_index(token_idx, k, count):
    """Replica r in [0, count) for (token_idx, k); int64 tensors (broadcastable) -> int64.

    h = fmix32((token_idx * 0x9E3779B1) ^ k) (murmur3 finalizer), r = h % count; all arithmetic
    is on 32-bit unsigned values, so the Triton uint32 version produces identical bits.
    """
    h = _mul32(token_idx & _M32, _GOLDEN) ^ (k & _M32)
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX2)
    h = h ^ (h >> 16)
    return h % count.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Routing: torch twins
# ---------------------------------------------------------------------------------------------
def _check_maps(log2phy, logcnt):
    if (log2phy is None) != (logcnt is None):
        raise ValueError("log2phy and logcnt must be given together")


def _valid_rows(T, num_valid_tokens, device):
    """[T] bool: rows < num_valid_tokens (None: all). An int, or a [1] int tensor on the device, which a
    CUDA graph can read at replay: the padded rows of a batch bucket then count nothing, without a sync."""
    if num_valid_tokens is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device) < num_valid_tokens


def _map_and_count(experts, log2phy, logcnt, load, num_valid_tokens):
    """Logical experts [T, K] -> physical ids [T, K] int32 (replica by hash); each (token, k) of the
    first num_valid_tokens rows adds 1 to load[physical id]: the one place where load is counted."""
    T, K = experts.shape
    experts = experts.long()  # [T, K]
    if log2phy is not None:
        t = torch.arange(T, device=experts.device).unsqueeze(1)  # [T, 1]
        k = torch.arange(K, device=experts.device).unsqueeze(0)  # [1, K]
        r = replica_index(t, k, logcnt.long()[experts])  # [T, K]
        ids = log2phy.long()[experts, r]  # [T, K]
    else:
        ids = experts
    if load is not None:
        counted = _valid_rows(T, num_valid_tokens, experts.device).unsqueeze(1).expand(T, K)  # [T, K]
        load.index_add_(0, ids.flatten(), counted.flatten().to(load.dtype))
    return ids.to(torch.int32)


def _sqrtsoftplus(router_logits):
    return F.softplus(router_logits.float()).sqrt()  # [T, E]


def _normalize(picked, routed_scaling_factor):
    """Sum-normalize (no epsilon, like the reference) and scale: [T, K] -> [T, K] fp32."""
    return picked / picked.sum(dim=-1, keepdim=True) * routed_scaling_factor


def hash_topk_torch(router_logits, input_ids, tid2eid, routed_scaling_factor,
                    log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Hash routing: experts = tid2eid[input_ids]; weights from sqrt(softplus(logits)).

    router_logits [T, E] fp32, input_ids [T] int64, tid2eid [V, K] int32, log2phy [E, X] int32,
    logcnt [E] int32, load [P] int32 (added to in place) -> (weights [T, K] fp32, ids [T, K] int32).
    """
    _check_maps(log2phy, logcnt)
    V = tid2eid.shape[0]
    if input_ids.numel():
        lo, hi = torch.aminmax(input_ids)
        if int(lo) < 0 or int(hi) >= V:
            raise ValueError(f"input_ids outside [0, {V})")
    scores = _sqrtsoftplus(router_logits)  # [T, E]
    experts = tid2eid[input_ids].long()  # [T, K]
    weights = _normalize(scores.gather(1, experts), routed_scaling_factor)  # [T, K]
    return weights, _map_and_count(experts, log2phy, logcnt, load, num_valid_tokens)


def score_topk_torch(router_logits, bias, top_k, routed_scaling_factor,
                     log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Score routing: experts = top-k of s + bias (ties -> lower expert id); weights use s only.

    router_logits [T, E] fp32, bias [E] fp32 | None -> (weights [T, K] fp32, ids [T, K] int32).
    """
    _check_maps(log2phy, logcnt)
    scores = _sqrtsoftplus(router_logits)  # [T, E]
    choice = scores if bias is None else scores + bias.float()  # [T, E]
    # stable descending sort keeps the lower expert id first among equal values
    experts = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, K]
    weights = _normalize(scores.gather(1, experts), routed_scaling_factor)  # [T, K]
    return weights, _map_and_count(experts, log2phy, logcnt, load, num_valid_tokens)


# ---------------------------------------------------------------------------------------------
# Experts: torch twin
# ---------------------------------------------------------------------------------------------
def _swiglu(g, u, weight, limit):
    """Clamped SwiGLU times the routing weight (applied before w2, like the reference); fp32."""
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return F.silu(g) * u * weight


MATMUL_TILE_ROWS = 4  # see _tiled_matmul; small, because decode has ~1 token per slot


def _tiled_matmul(xs, w):
    """xs [n, a] @ w [b, a].T -> [n, b], computed in fixed tiles of MATMUL_TILE_ROWS rows.

    CPU BLAS picks different kernels (and so different rounding) by row count. With fixed tiles a
    row's result is bitwise independent of which other rows share the call. EPLB relies on that:
    moving an expert to another slot changes which tokens share a slot, never the output.
    (One F.linear per tile: a batched matmul over a broadcast weight would copy the weight.)
    """
    n = xs.shape[0]
    pad = (-n) % MATMUL_TILE_ROWS
    if pad:
        xs = torch.cat([xs, xs.new_zeros(pad, xs.shape[1])])
    return torch.cat([F.linear(tile, w) for tile in xs.split(MATMUL_TILE_ROWS)])[:n]


def expert_format(w1) -> str:
    """The routed experts' storage format, from the weight dtype: "fp4" (uint8: packed e2m1),
    "fp8" (float8_e4m3fn) or "bf16" (any float dtype: unquantised)."""
    if w1.dtype == torch.uint8:
        return "fp4"
    if w1.dtype == torch.float8_e4m3fn:
        return "fp8"
    return "bf16"


def dequantize_slot(w, scale, slot: int, dtype):
    """One slot of a quantised slot-stacked weight -> [rows, cols] `dtype`, through checkpoint's
    reference dequantisers. w: fp4 uint8 [P_local, rows, cols/2] with scale uint8 e8m0
    [P_local, rows, cols/32], or fp8 e4m3 [P_local, rows, cols] with scale [P_local, rows/128, cols/128]."""
    if w.dtype == torch.uint8:
        return checkpoint.dequantize_fp4_packed(w[slot], scale[slot], dtype)
    return checkpoint.dequantize_fp8_blockwise(w[slot], scale[slot], dtype)


def _check_scales(w1, scales):
    fmt = expert_format(w1)
    if (fmt == "bf16") != (scales is None):
        raise ValueError(f"{fmt} experts need scales={'None' if fmt == 'bf16' else '(s1, s3, s2)'}")
    return fmt


def moe_experts_torch(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0, scales=None, *,
                      act_parts=0, act_shared_scale=False):
    """Routed experts over physical slots: sum_k weights[t,k] * expert(ids[t,k])(x[t]).

    x [T, d], weights [T, K] fp32, ids [T, K] int32, w1/w3 [P_local, I, d], w2 [P_local, d, I]
    -> [T, d] fp32. ids outside [slot_offset, slot_offset + P_local) contribute nothing (they live
    on another expert-parallel rank). Loops only over slots that have tokens. Each (t, k) result is
    computed alone (tiled matmuls) and summed over k in k order, so the output does not depend on
    which slot holds an expert or who shares it.
    Quantised experts (see dsv4_mini.RoutedExperts; format from w1.dtype): scales = (s1, s3, s2);
    each used slot is dequantised to x.dtype first (dequantize_slot), then the same math runs.
    act_parts (1 or 2, fp8 experts): twin of the fp8 tensor-core prefill path: x and h rounded
    through fp8x_act_split_torch (that many e4m3 parts) before their matmuls, which run in fp32;
    act_shared_scale: both parts in one scale (twin of the fp4 fp8_mma decode path: act_parts=2 with it).
    """
    fmt = _check_scales(w1, scales)
    T, K = ids.shape
    per_pair = torch.zeros(T * K, x.shape[1], dtype=torch.float32, device=x.device)  # [T*K, d]
    P_local = w1.shape[0]
    local = ids.long().flatten() - slot_offset  # [T*K]
    local = torch.where((local >= 0) & (local < P_local), local, P_local)  # P_local = not here
    counts = torch.bincount(local, minlength=P_local + 1)[:P_local].tolist()
    order = torch.argsort(local, stable=True)  # (t, k) pairs grouped by slot
    flat_w = weights.float().flatten()  # [T*K]
    start = 0
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]  # [n] flat (t, k) indices routed to this slot
        start += n
        if fmt == "bf16":
            m1, m3, m2 = w1[slot], w3[slot], w2[slot]
        else:
            wdt = torch.float32 if act_parts else x.dtype
            m1, m3, m2 = (dequantize_slot(w, s, slot, wdt) for w, s in zip((w1, w3, w2), scales))
        xs = x[pairs // K].to(m1.dtype)  # [n, d]
        if act_parts:
            xs = fp8x_act_round_torch(xs, act_parts, act_shared_scale)
        g = _tiled_matmul(xs, m1).float()  # [n, I]
        u = _tiled_matmul(xs, m3).float()  # [n, I]
        h = _swiglu(g, u, flat_w[pairs].unsqueeze(1), swiglu_limit)  # [n, I]
        if act_parts:
            h = fp8x_act_round_torch(h, act_parts, act_shared_scale)
        per_pair[pairs] = _tiled_matmul(h.to(m2.dtype), m2).float()  # [n, d]
    return per_pair.view(T, K, x.shape[1]).sum(1)


FP8X_BLOCK = 128  # activation scale block of the fp8 tensor-core prefill path (= the weights' block)


def _pow2_for_e4m3_torch(amax):
    """amax [...] fp32 >= 0 -> power-of-two scales s with amax / s in (224, 448] (1 where amax is 0),
    from amax's exponent bits: amax = m 2^e, m in [1, 2); 256 m fits e4m3's 448 iff m <= 1.75."""
    bits = amax.contiguous().view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    e = torch.where(amax > 0, e.clamp(1, 253), torch.full_like(e, 127))
    return (e << 23).view(torch.float32)


def fp8x_act_split_torch(a, parts: int = 2, shared_scale: bool = False):
    """a [R, K] float -> (q [parts, R, K] float8_e4m3fn, s [parts, R, ceil(K/128)] fp32) with
    a ~= s[0] * q[0] + s[1] * q[1] per 128-input block (scales broadcast over the block): part 0
    rounds a / s[0] to e4m3 (ties to even), part 1 the exact remainder a - s[0] q[0] the same way.
    Relative error per element ~2^-8 with two parts (~2^-4 with one). Torch twin of _fp8x_split_kernel.
    shared_scale: part 1 keeps part 0's scale (s[1] = s[0]): the remainder is at most half an e4m3 step
    of part 0, <= 16 in those units, so it fits, and e4m3's 18 binades leave the error per element
    <= max(2^-8 |a|, 2^-10 s): as accurate, and the two parts' dots can share one accumulator."""
    R, K = a.shape
    KB = -(-K // FP8X_BLOCK)
    rest = F.pad(a.float(), (0, KB * FP8X_BLOCK - K)).view(R, KB, FP8X_BLOCK)  # [R, KB, 128]
    qs, ss = [], []
    for p in range(parts):
        s = ss[0] if p and shared_scale else _pow2_for_e4m3_torch(rest.abs().amax(-1))  # [R, KB]
        q = (rest / s.unsqueeze(-1)).to(torch.float8_e4m3fn)  # [R, KB, 128]
        rest = rest - q.float() * s.unsqueeze(-1)  # exact: q * s is a rounding of rest
        qs.append(q.view(R, KB * FP8X_BLOCK)[:, :K])
        ss.append(s)
    return torch.stack(qs), torch.stack(ss)


def fp8x_act_dequant_torch(q, s):
    """(q [parts, R, K] e4m3, s [parts, R, KB] fp32) of fp8x_act_split_torch -> [R, K] fp32."""
    K = q.shape[2]
    scale = s.repeat_interleave(FP8X_BLOCK, dim=2)[:, :, :K]  # [parts, R, K]
    return (q.float() * scale).sum(0)


def fp8x_act_round_torch(a, parts: int = 2, shared_scale: bool = False):
    """a [R, K] -> its fp8x split, dequantised (fp32): what the fp8 prefill path's dots see."""
    return fp8x_act_dequant_torch(*fp8x_act_split_torch(a, parts, shared_scale))


# ---------------------------------------------------------------------------------------------
# Routing: Triton (one pass, one program per block of tokens)
# ---------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _sqrtsoftplus_tl(x):
        """sqrt(softplus(x)) to fp32 rounding: softplus = max(x, 0) + log1p(exp(-|x|))."""
        y = tl.exp(-tl.abs(x))
        one_p = 1.0 + y
        # accurate log1p(y): log(1+y) * y / ((1+y) - 1) cancels the rounding of 1+y (Goldberg)
        log1p = tl.where(one_p == 1.0, y, tl.log(one_p) * (y / (one_p - 1.0)))
        return tl.sqrt_rn(tl.maximum(x, 0.0) + log1p)

    @triton.jit
    def _sqrtsoftplus_fast(x):
        """Cheaper sqrt(softplus(x)) for ranking all E experts (monotonic, a few ulp off);
        the K picked weights are recomputed with _sqrtsoftplus_tl."""
        return tl.sqrt(tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))

    @triton.jit
    def _replica_tl(t, k, count):
        """Same bits as replica_index: fmix32((t * 0x9E3779B1) ^ k) % count, in uint32."""
        h = (t.to(tl.uint32) * 0x9E3779B1) ^ k.to(tl.uint32)
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        h = h ^ (h >> 16)
        return (h % tl.maximum(count, 1).to(tl.uint32)).to(tl.int32)

    @triton.jit
    def _route_kernel(logits_ptr, stride_lt, input_ids_ptr, tid2eid_ptr, V, bias_ptr,
                      log2phy_ptr, X, logcnt_ptr, load_ptr, P, weights_ptr, ids_ptr,
                      T, E, num_valid, num_valid_ptr, scale, num_blocks,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, NB: tl.constexpr, HASH: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MAP: tl.constexpr, COUNT: tl.constexpr,
                      KEY64: tl.constexpr, HIST: tl.constexpr, NV_PTR: tl.constexpr):
        # persistent: program p handles row blocks p, p + nprog, ...; the load counts of all its
        # blocks are gathered in a register histogram (bin NB-1 = not counted) and added to
        # `load` once at the end: one atomic per (program, non-empty bin) instead of one per pair
        kcol = tl.arange(0, KP)  # [KP]
        hist = tl.zeros([NB], dtype=tl.int32)
        nv = num_valid
        if NV_PTR:  # the count of valid rows is data (a CUDA graph's padded bucket), read at run time
            nv = tl.load(num_valid_ptr)
        for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
            rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
            row_ok = rows < T
            k_ok = row_ok[:, None] & (kcol[None, :] < K)  # [BT, KP]
            row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride_lt  # [BT, 1]
            if HASH:
                # experts from the frozen table; bad token ids never touch memory (mask) and come
                # out as id -1, weight 0, uncounted (the wrapper raises before launch when it can)
                tok = tl.load(input_ids_ptr + rows, mask=row_ok, other=0)  # [BT]
                tok_ok = (tok >= 0) & (tok < V)
                ok = k_ok & tok_ok[:, None]  # [BT, KP]
                expert = tl.load(tid2eid_ptr + tok.to(tl.int64)[:, None] * K + kcol[None, :],
                                 mask=ok, other=0)  # [BT, KP]
                ok = ok & (expert >= 0) & (expert < E)
            else:
                ecol = tl.arange(0, BLOCK_E)  # [BE]
                e_ok = row_ok[:, None] & (ecol[None, :] < E)  # [BT, BE]
                choice = _sqrtsoftplus_fast(tl.load(row_base + ecol[None, :], mask=e_ok, other=0.0))
                if HAS_BIAS:
                    choice += tl.load(bias_ptr + ecol, mask=ecol < E, other=0.0)[None, :]
                expert = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
                if KEY64:
                    choice = choice + 0.0  # -0.0 -> +0.0: equal values must tie (lower id wins)
                    # one int64 key per (row, expert): order-preserving float bits above,
                    # reversed expert id below: a plain max is the top-1 with ties to the lower
                    # id, and every key is unique (exact removal by equality)
                    bits = choice.to(tl.int32, bitcast=True)
                    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order == signed int order
                    key = (bits.to(tl.int64) << 32) | (BLOCK_E - 1 - ecol).to(tl.int64)[None, :]
                    key = tl.where(e_ok, key, -0x7FFFFFFFFFFFFFFF)  # below every real key
                    for j in tl.static_range(K):  # K rounds of max; ties -> lowest expert id
                        best = tl.max(key, axis=1)  # [BT]
                        key = tl.where(key == best[:, None], -0x7FFFFFFFFFFFFFFF, key)
                        e_j = (BLOCK_E - 1) - (best & 0xFFFFFFFF).to(tl.int32)  # [BT]
                        expert = tl.where(kcol[None, :] == j, e_j[:, None], expert)
                else:
                    choice = tl.where(e_ok, choice, float("-inf"))  # [BT, BE]
                    for j in tl.static_range(K):  # K rounds of argmax; ties -> lowest expert id
                        e_j = tl.argmax(choice, axis=1, tie_break_left=True)  # [BT]
                        choice = tl.where(ecol[None, :] == e_j[:, None], float("-inf"), choice)
                        expert = tl.where(kcol[None, :] == j, e_j[:, None], expert)
                ok = k_ok & (expert >= 0) & (expert < E)
            # weights from the K picked logits (L1/L2-hot), with the accurate score
            picked = _sqrtsoftplus_tl(tl.load(row_base + expert, mask=ok, other=0.0))  # [BT, KP]
            picked = tl.where(ok, picked, 0.0)
            total = tl.sum(picked, axis=1)  # [BT]
            total = tl.where(tl.max(ok.to(tl.int32), axis=1) > 0, total, 1.0)  # no 0/0 on masked
            weight = picked / total[:, None] * scale  # [BT, KP]
            phys = expert
            if HAS_MAP:
                count = tl.load(logcnt_ptr + expert, mask=ok, other=1)  # [BT, KP]
                r = _replica_tl(rows[:, None], kcol[None, :], count)
                r = tl.minimum(r, X - 1)  # a corrupt logcnt > X must not read past the row
                phys = tl.load(log2phy_ptr + expert.to(tl.int64) * X + r, mask=ok, other=-1)
            phys = tl.where(ok, phys, -1)
            weight = tl.where(ok, weight, 0.0)
            out_off = rows.to(tl.int64)[:, None] * K + kcol[None, :]  # [BT, KP]
            tl.store(weights_ptr + out_off, weight, mask=k_ok)
            tl.store(ids_ptr + out_off, phys, mask=k_ok)
            if COUNT:
                counted = ok & (rows < nv)[:, None] & (phys >= 0) & (phys < P)
                if HIST:
                    bins = tl.where(counted, phys, NB - 1)  # NB - 1 >= P: "not counted" bin
                    hist += tl.histogram(tl.reshape(bins, [BLOCK_T * KP]), NB)
                else:  # small blocks (score): a histogram per block costs more than atomics
                    tl.atomic_add(load_ptr + phys, tl.full([BLOCK_T, KP], 1, tl.int32),
                                  mask=counted, sem="relaxed")
        if COUNT and HIST:
            b = tl.arange(0, NB)
            tl.atomic_add(load_ptr + b, hist, mask=(b < P) & (hist > 0), sem="relaxed")


# Routing launch parameters (module-level so bench/bench_kernels.py can sweep them):
# rows per program = hash_rows (hash) or score_elems // BLOCK_E (score), never more than needed
# to give every SM a block; at most `waves` programs per SM, each looping over row blocks.
# score_key64: top-K by int64 (value, id) keys instead of argmax rounds (both exact).
# *_hist: count load with a per-program register histogram (else one atomic per pair);
# score_waves: programs per SM for score (0: one program per row block, no persistent loop).
# The defaults are the fastest of `python bench/bench_kernels.py --sweep` on an H200 (BENCHMARKS.md).
ROUTE_CFG = dict(hash_rows=128, hash_warps=4, score_elems=512, score_warps=1, waves=4,
                 score_key64=False, score_hist=False, score_waves=0)
_NUM_SMS = {}


def _num_sms(dev) -> int:
    """SM count of a CUDA device (cached: the property query costs host time); 4 elsewhere
    (the interpreter: a few programs, so the persistent loop runs several blocks in tests)."""
    if dev.type != "cuda":
        return 4
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    n = _NUM_SMS.get(idx)
    if n is None:
        n = _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _route_triton(router_logits, K, routed_scaling_factor, log2phy, logcnt, load,
                  num_valid_tokens, input_ids=None, tid2eid=None, bias=None):
    """Launch _route_kernel: hash mode when tid2eid is given, else top-K of s + bias.

    Host work is kept to the two output allocations and one launch (no syncs, no copies of
    inputs that are already fp32 / int / contiguous)."""
    if (log2phy is None) != (logcnt is None):
        raise ValueError("log2phy and logcnt must be given together")
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty((T, K), dtype=torch.float32, device=dev)  # [T, K]
    ids = torch.empty((T, K), dtype=torch.int32, device=dev)  # [T, K]
    if T == 0 or K == 0:
        return weights, ids
    logits = router_logits
    if logits.dtype != torch.float32:
        logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    hash_mode = tid2eid is not None
    dummy = ids  # stands in for pointers a variant does not read
    KP = _next_pow2(K)
    BLOCK_E = _next_pow2(E)
    cfg = ROUTE_CFG
    nsm = _num_sms(dev)
    if hash_mode:
        cap, warps = cfg["hash_rows"], cfg["hash_warps"]
        if not input_ids.is_contiguous():
            input_ids = input_ids.contiguous()
        if not tid2eid.is_contiguous():
            tid2eid = tid2eid.contiguous()
    else:
        cap, warps = max(1, cfg["score_elems"] // BLOCK_E), cfg["score_warps"]
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
    # small T: shrink the block so every SM gets work (one compile per power of two, cached)
    BLOCK_T = max(1, min(cap, _next_pow2(-(-T // nsm))))
    num_blocks = -(-T // BLOCK_T)
    waves = cfg["waves"] if hash_mode else cfg["score_waves"]
    grid = (min(num_blocks, nsm * waves) if waves else num_blocks,)
    hist = load is not None and (hash_mode or bool(cfg["score_hist"]))
    if log2phy is not None:
        if not log2phy.is_contiguous():
            log2phy = log2phy.contiguous()
        if not logcnt.is_contiguous():
            logcnt = logcnt.contiguous()
    P = load.shape[0] if load is not None else 1
    nv_ptr = isinstance(num_valid_tokens, torch.Tensor)
    if nv_ptr and (num_valid_tokens.device != dev or num_valid_tokens.dtype != torch.int32):
        raise ValueError("num_valid_tokens as a tensor must be int32 on the logits' device")
    nv = T if num_valid_tokens is None or nv_ptr else max(0, min(int(num_valid_tokens), T))
    _route_kernel[grid](
        logits, logits.stride(0),
        input_ids if hash_mode else dummy,
        tid2eid if hash_mode else dummy,
        tid2eid.shape[0] if hash_mode else 0,
        bias if bias is not None else dummy,
        log2phy if log2phy is not None else dummy,
        log2phy.shape[1] if log2phy is not None else 1,
        logcnt if logcnt is not None else dummy,
        load if load is not None else dummy, P,
        weights, ids, T, E, nv, num_valid_tokens if nv_ptr else dummy, float(routed_scaling_factor), num_blocks,
        K=K, KP=KP, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, NB=max(32, _next_pow2(P + 1)),
        HASH=hash_mode, HAS_BIAS=bias is not None, HAS_MAP=log2phy is not None,
        COUNT=load is not None, KEY64=bool(cfg["score_key64"]), HIST=hist, NV_PTR=nv_ptr, num_warps=warps)
    return weights, ids


def hash_topk_triton(router_logits, input_ids, tid2eid, routed_scaling_factor,
                     log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Triton twin of hash_topk_torch (same signature and results).

    Token ids are checked on the host only for CPU tensors (free there); on CUDA a check would
    cost a device sync per call, so the kernel masks instead: a token id outside [0, V) yields
    ids -1 and weight 0 for its row and is not counted (the caller validates ids once per batch).
    """
    if not input_ids.is_cuda and input_ids.numel():
        V = tid2eid.shape[0]
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
            raise ValueError(f"input_ids outside [0, {V})")
    if load is not None and not load.is_contiguous():
        raise ValueError("load must be contiguous (it is added to in place)")
    return _route_triton(router_logits, tid2eid.shape[1], routed_scaling_factor, log2phy, logcnt,
                         load, num_valid_tokens, input_ids=input_ids, tid2eid=tid2eid)


def score_topk_triton(router_logits, bias, top_k, routed_scaling_factor,
                      log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Triton twin of score_topk_torch (same signature and results)."""
    if top_k > router_logits.shape[1]:
        raise ValueError(f"top_k={top_k} > number of experts {router_logits.shape[1]}")
    if load is not None and not load.is_contiguous():
        raise ValueError("load must be contiguous (it is added to in place)")
    return _route_triton(router_logits, top_k, routed_scaling_factor, log2phy, logcnt, load,
                         num_valid_tokens, bias=bias)


# ---------------------------------------------------------------------------------------------
# Experts: Triton grouped GEMM over slot-sorted (token, k) pairs
# ---------------------------------------------------------------------------------------------
# Two ways to group the T*K (token, k) pairs by local slot, both without a host sync:
# - decode ("scan", few pairs): every up/down program scans all ids for its own slot and
#   compacts them in registers (cumsum), looping over BLOCK_M-row chunks; h and y are indexed by
#   pair, so there is no align step at all: 3 launches (up, down, sum);
# - prefill ("sorted"): 2 small Triton kernels (count + scan, scatter) sort the pairs by slot,
#   each slot's run padded to a multiple of BLOCK_M, so each BLOCK_M-row block is one slot; then
#   up kernel h = swiglu(x @ w1[s]^T, x @ w3[s]^T) * weight per (block, I-tile), down kernel
#   y[pair] = h @ w2[s]^T (fp32).
# Finally the sum kernel: out[t] = sum over k of y[t, k] for local pairs (fixed order, no atomics
# on outputs). Every pair's row is computed independently of its position in a tile, so the
# result does not depend on the (atomic) order of pairs inside a slot: runs are bitwise repeatable.
if triton is not None:

    @triton.jit
    def _moe_scan_kernel(ids_ptr, ws_ptr, pairs_ptr, slot_ptr, N, slot_offset, P_local,
                         num_blocks, NBINS: tl.constexpr, BLOCK_M: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # one program: pairs per slot (register histogram; bin NBINS-1 = not local), padded run
        # starts -> cursors ws[0:NBINS], block -> slot, padding rows of pairs_ptr = N
        counts = tl.zeros([NBINS], dtype=tl.int32)
        for i0 in range(0, N, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            local = tl.load(ids_ptr + offs, mask=offs < N, other=-1) - slot_offset
            ok = (offs < N) & (local >= 0) & (local < P_local)
            counts += tl.histogram(tl.where(ok, local, NBINS - 1), NBINS)
        b = tl.arange(0, NBINS)
        in_range = b < P_local
        counts = tl.where(in_range, counts, 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, 0)  # [NBINS]
        tl.store(ws_ptr + b, pad_end - padded, mask=in_range)  # cursor = run start
        pad_end = tl.where(in_range, pad_end, 0x7FFFFFFF)
        for b0 in range(0, num_blocks, CHUNK):
            blk = b0 + tl.arange(0, CHUNK)  # [CH]
            start = blk * BLOCK_M
            slot = tl.sum((pad_end[None, :] <= start[:, None]).to(tl.int32), axis=1)  # [CH]
            tl.store(slot_ptr + blk, tl.where(slot < P_local, slot, -1), mask=blk < num_blocks)
        size = num_blocks * BLOCK_M
        for r0 in range(0, size, CHUNK * BLOCK_M):
            r = r0 + tl.arange(0, CHUNK * BLOCK_M)
            tl.store(pairs_ptr + r, tl.full([CHUNK * BLOCK_M], 0, tl.int32) + N, mask=r < size)

    @triton.jit
    def _moe_scatter_kernel(ids_ptr, ws_ptr, pairs_ptr, N, slot_offset, P_local,
                            NBINS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        local = tl.load(ids_ptr + offs, mask=offs < N, other=-1) - slot_offset
        ok = (offs < N) & (local >= 0) & (local < P_local)
        dest = tl.atomic_add(ws_ptr + local, tl.full([BLOCK], 1, tl.int32), mask=ok,
                             sem="relaxed")
        tl.store(pairs_ptr + dest, offs, mask=ok)


def _moe_align(ids, slot_offset: int, P_local: int, BLOCK_M: int):
    """ids [T, K] int32 -> (sorted_pairs [num_blocks*BLOCK_M] int32, block_slot [num_blocks] int32).

    sorted_pairs holds flat pair indices t*K + k grouped by slot (N = T*K marks padding; the
    order inside a slot is unspecified); block_slot[b] is the slot of rows b*BLOCK_M.. (or -1:
    block unused). num_blocks is the upper bound cdiv(N, BLOCK_M) + min(N, P_local), so nothing
    here waits on the device. Two launches (count + scan, scatter), no torch ops but allocations.
    """
    N = ids.numel()
    dev = ids.device
    if ids.dtype != torch.int32 or not ids.is_contiguous():
        ids = ids.to(torch.int32).contiguous()
    num_blocks = -(-N // BLOCK_M) + min(N, P_local)
    size = num_blocks * BLOCK_M
    NBINS = max(32, _next_pow2(P_local + 1))
    ws = torch.empty(NBINS, dtype=torch.int32, device=dev)  # per-slot cursors
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=dev)
    block_slot = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    BLOCK = 1024
    _moe_scan_kernel[(1,)](ids, ws, sorted_pairs, block_slot, N, slot_offset, P_local, num_blocks,
                           NBINS=NBINS, BLOCK_M=BLOCK_M, CHUNK=max(1, min(64, 8192 // NBINS)),
                           BLOCK=BLOCK)
    _moe_scatter_kernel[(max(1, -(-N // BLOCK)),)](ids, ws, sorted_pairs, N, slot_offset, P_local,
                                                  NBINS=NBINS, BLOCK=BLOCK)
    return sorted_pairs, block_slot


if triton is not None:

    @triton.jit
    def _e8m0_to_f32(s):
        """uint8 e8m0 exponent bytes -> 2^(s - 127) in fp32 (byte 0 gives 0, not 2^-127: far below
        any real weight scale; 255 = NaN in e8m0 never occurs in a checkpoint)."""
        return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_to_e4m3(b):
        """Packed e2m1 bytes -> (even, odd) elements as float8e4nv holding value * 2^-6, exactly:
        the code's 3 magnitude bits (e1 e0 m) become e4m3's low exponent bits and top mantissa bit
        (code 1 = 0.5 lands on the e4m3 subnormal 2^-7), the sign bit moves to bit 7."""
        lo = ((b & 0x7) << 2) | ((b & 0x8) << 4)
        hi = ((b >> 2) & 0x1C) | (b & 0x80)
        return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _fp4_scale_f16(s):
        """uint8 e8m0 scale bytes -> fp16 2^(s - 127) * 64, the factor the e4m3 values of
        _fp4_to_e4m3 need: fp16 bits (s - 106) << 10, s clamped to [107, 136] (fp16's normal
        exponents: scales 2^-20 .. 2^9; trained weights sit far inside, and a scale byte 0 (masked
        tail) only ever multiplies zero weights)."""
        e = tl.minimum(tl.maximum(s.to(tl.int32), 107), 136) - 106
        return (e << 10).to(tl.int16).to(tl.float16, bitcast=True)

    # _fp4_to_e4m3 and the scale multiply on 4 packed bytes (8 values) per instance, in 32-bit
    # registers. Inputs: $4 = 4 weight bytes w0..w3; $5 $6 = their 4 scales as fp16 (from
    # _fp4_scale_f16), f16x2 pairs (w0, w1) and (w2, w3): one scale per byte, so the result does not
    # depend on which tile axis Triton packs the 4 elements along. Outputs: $0 $1 = the even
    # (low-nibble) values of (w0, w1), (w2, w3) as f16x2; $2 $3 = the odd (high-nibble) ones.
    # 9 integer ops give the 8 e4m3 bytes (value * 2^-6; ptxas fuses the and/or pairs into lop3),
    # 4 cvt make f16x2 pairs (sm_89+; byte 0 of a pair -> the low half), 4 mul.f16x2 scale them
    # (exact: a power of two times an e4m3 value, rounded once where it lands below fp16's normals,
    # as the fp32 -> fp16 cast of the plain path does). tests/test_quant.py runs this text through
    # a small emulator of these PTX instructions over every byte and scale.
    _FP4_F16_ASM = tl.constexpr("""
    {
    .reg .b32 lo, hi, t;
    .reg .b16 l0, l1, h0, h1;
    shl.b32 t, $4, 2;
    and.b32 lo, t, 0x1C1C1C1C;
    shl.b32 t, $4, 4;
    and.b32 t, t, 0x80808080;
    or.b32 lo, lo, t;
    shr.b32 t, $4, 2;
    and.b32 hi, t, 0x1C1C1C1C;
    and.b32 t, $4, 0x80808080;
    or.b32 hi, hi, t;
    mov.b32 {l0, l1}, lo;
    mov.b32 {h0, h1}, hi;
    cvt.rn.f16x2.e4m3x2 $0, l0;
    cvt.rn.f16x2.e4m3x2 $1, l1;
    cvt.rn.f16x2.e4m3x2 $2, h0;
    cvt.rn.f16x2.e4m3x2 $3, h1;
    mul.rn.f16x2 $0, $0, $5;
    mul.rn.f16x2 $1, $1, $6;
    mul.rn.f16x2 $2, $2, $5;
    mul.rn.f16x2 $3, $3, $6;
    }
    """)

    @triton.jit
    def _group_bytes(sg, KAXIS: tl.constexpr):
        """Per-group values [G, BN] (KAXIS 0) or [BN, G] (KAXIS 1) -> one per packed byte of the
        group (16 bytes = 32 inputs) along KAXIS: [G*16, BN] or [BN, G*16]."""
        if KAXIS == 0:
            G: tl.constexpr = sg.shape[0]
            BN: tl.constexpr = sg.shape[1]
            return tl.reshape(tl.broadcast_to(sg[:, None, :], [G, 16, BN]), [G * 16, BN])
        else:
            BN: tl.constexpr = sg.shape[0]
            G: tl.constexpr = sg.shape[1]
            return tl.reshape(tl.broadcast_to(sg[:, :, None], [BN, G, 16]), [BN, G * 16])

    @triton.jit
    def _fp4_tile(b, scale_groups, DOT: tl.constexpr, ASM: tl.constexpr, KAXIS: tl.constexpr = 0):
        """Packed e2m1 tile b uint8 [BK/2, BN] and its e8m0 scale bytes per 16-byte group
        [BK/32, BN] -> (even inputs, odd inputs) as DOT [BK/2, BN] each. KAXIS 1: the same with
        K along axis 1 (b [BN, BK/2], scale_groups [BN, BK/32]; the swapped dots).

        ASM (fp16 on a GPU): _FP4_F16_ASM; otherwise plain Triton (the interpreter; the
        definition), the same values through fp32."""
        if ASM:
            sh = _group_bytes(_fp4_scale_f16(scale_groups), KAXIS)  # fp16, converted once per group
            even, odd = tl.inline_asm_elementwise(
                _FP4_F16_ASM, "=r,=r,=r,=r,r,r,r", [b, sh], dtype=(tl.float16, tl.float16),
                is_pure=True, pack=4)
        else:
            sf = _group_bytes(_e8m0_to_f32(scale_groups) * 64.0, KAXIS)
            lo, hi = _fp4_to_e4m3(b)
            even = (lo.to(tl.float32) * sf).to(DOT)
            odd = (hi.to(tl.float32) * sf).to(DOT)
        return even, odd

    @triton.jit
    def _fp4_tile_pairs(b16, scale_groups):
        """_fp4_tile's ASM path on byte pairs, K along axis 1: b16 int16 [BN, BK/4] (bytes 2i, 2i+1 of a
        row: inputs 4i..4i+3), scale_groups [BN, BK/32] -> (even, odd) fp16 [BN, BK/2]. An MMA operand
        register holds the pair (2i, 2i+1) of even (or odd) inputs, which is exactly what one int16 gives:
        each pair is loaded with one 16-bit load and converted in place. Bytes one by one, Triton unpacks
        and repacks every byte (sm_90 SASS: PRMT 154 -> 55 per 128 values, 4.88 -> 4.49 instructions)."""
        s2 = _fp4_scale_pairs(scale_groups, b16.shape[1])  # [BN, BK/4] f16x2 (s, s)
        even2, odd2 = tl.inline_asm_elementwise(
            _FP4_F16_ASM, "=r,=r,=r,=r,r,r,r", [b16, s2], dtype=(tl.int32, tl.int32), is_pure=True, pack=2)
        return _f16x2_to_pairs(even2), _f16x2_to_pairs(odd2)

    @triton.jit
    def _fp4_scale_pairs(scale_groups, P: tl.constexpr):
        """e8m0 scale bytes [BN, G] -> int32 [BN, P]: for each of the tile's P byte pairs (P / G per scale
        group) its group's _fp4_scale_f16 twice, as the f16x2 operand of _FP4_F16_ASM."""
        BN: tl.constexpr = scale_groups.shape[0]
        G: tl.constexpr = scale_groups.shape[1]
        sh = _fp4_scale_f16(scale_groups).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF  # [BN, G]
        return tl.reshape(tl.broadcast_to((sh | (sh << 16))[:, :, None], [BN, G, P // G]), [BN, P])

    @triton.jit
    def _f16x2_to_pairs(x):
        """int32 [BN, P] holding f16x2 -> fp16 [BN, 2P], each register's two halves side by side."""
        BN: tl.constexpr = x.shape[0]
        P: tl.constexpr = x.shape[1]
        lo = (x & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [BN, 2 * P])

    @triton.jit
    def _qdot(acc, acc2, a_rows, a_ok, sa_rows, part_q, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n,
              n_ok, N, K, FMT: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              PRECISION: tl.constexpr, ASM: tl.constexpr, TWO: tl.constexpr, VAR: tl.constexpr):
        """acc [BM, BN] += A [BM, K] @ dequant(w[slot, offs_n, :])^T, dequantised in registers; with
        TWO also acc2 += A @ dequant(w2[slot, offs_n, :])^T in the same K loop (w1 and w3 share
        every A tile). -> (acc, acc2). VAR (bits, see _variant_code): 1 = swapped dots (_qdot_t),
        2 = fp4 through tl.dot_scaled (A rows in natural order, not split), 4 = fp4 on the fp8 tensor
        cores (_qdot_f8: A split into two e4m3 parts in one scale; sa_rows [BM, 1] the scale rows, part_q
        the stride from part 0 to part 1; unused by the other variants)."""
        if VAR // 4 % 2 == 1:
            acc, acc2 = _qdot_f8(acc, acc2, a_rows, a_ok, sa_rows, part_q, w_ptr, s_ptr, w2_ptr, s2_ptr,
                                 slot, offs_n, n_ok, N, K, BLOCK_K, EVEN_K, ASM, TWO)
        elif VAR % 2 == 1:
            acc, acc2 = _qdot_t(acc, acc2, a_rows, a_ok, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n, n_ok, N, K,
                                FMT, BLOCK_K, EVEN_K, PRECISION, ASM, TWO, VAR // 2 % 2 == 1)
        else:
            acc, acc2 = _qdot_n(acc, acc2, a_rows, a_ok, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n, n_ok, N, K,
                                FMT, BLOCK_K, EVEN_K, PRECISION, ASM, TWO, VAR // 2 % 2 == 1)
        return acc, acc2

    @triton.jit
    def _qdot_n(acc, acc2, a_rows, a_ok, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n, n_ok, N, K,
                FMT: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                ASM: tl.constexpr, TWO: tl.constexpr, SCALED: tl.constexpr):
        """_qdot with the activations as the dot's first operand: A [BM, BK] @ W^T [BK, BN].

        a_rows [BM, 1]: pointers to the A rows (x or h, in the dot dtype), a_ok [BM];
        FMT 1: w fp8 e4m3 [P_local, N, K], s [P_local, N/128, K/128] (BLOCK_K divides 128, so a
        tile has one scale per column: applied to the fp32 partial product for few rows, to the
        weights for many); A rows in natural order.
        FMT 2: w packed e2m1 uint8 [P_local, N, K/2], s [P_local, N, K/32]: even and odd inputs are
        two dots over the low and high nibbles, so A rows are stored split: [even inputs | odd inputs]
        (no interleave in registers; BLOCK_K must be a multiple of 32); with SCALED one
        tl.dot_scaled on natural-order rows instead. EVEN_K: K % BLOCK_K == 0 (no K masks)."""
        slot64 = slot.to(tl.int64)
        n64 = offs_n.to(tl.int64)[None, :]  # [1, BN]
        if FMT == 1:
            SK = (K + 127) // 128
            w_off = slot64 * N * K + n64 * K  # [1, BN]
            s_off = slot64 * ((N + 127) // 128) * SK + (n64 // 128) * SK  # [1, BN]
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k  # [BK]
                k_ok = (k < K) | EVEN_K
                a = tl.load(a_rows + k[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & n_ok[None, :]
                acc = _fp8_step(acc, a, w_ptr + w_off + k[:, None], s_ptr + s_off + k0 // 128, w_mask, n_ok,
                                PRECISION)
                if TWO:
                    acc2 = _fp8_step(acc2, a, w2_ptr + w_off + k[:, None], s2_ptr + s_off + k0 // 128, w_mask,
                                     n_ok, PRECISION)
        else:
            KH, SK = K // 2, K // 32
            w_off = slot64 * N * KH + n64 * KH  # [1, BN] packed rows
            s_off = slot64 * N * SK + n64 * SK  # [1, BN]
            offs_j = tl.arange(0, BLOCK_K // 2)  # byte j holds inputs 2j (low nibble), 2j+1 (high)
            offs_g = tl.arange(0, BLOCK_K // 32)  # scale groups of the tile
            if not SCALED:  # scales one K tile ahead, as in _qdot_t (prefill at T = 8192: 11.75 -> 11.24 ms, H200)
                s_mask = (offs_g < SK)[:, None] & n_ok[None, :]  # [BK/32, BN]
                sg = tl.load(s_ptr + s_off + offs_g[:, None], mask=s_mask, other=0)
                sg2 = sg
                if TWO:
                    sg2 = tl.load(s2_ptr + s_off + offs_g[:, None], mask=s_mask, other=0)
            for k0 in range(0, K, BLOCK_K):
                j = k0 // 2 + offs_j  # [BK/2]
                j_ok = (j < KH) | EVEN_K
                g = k0 // 32 + offs_g  # [BK/32]
                w_mask = j_ok[:, None] & n_ok[None, :]  # [BK/2, BN]
                if SCALED:
                    k = k0 + tl.arange(0, BLOCK_K)  # [BK] natural order
                    a = tl.load(a_rows + k[None, :], mask=a_ok[:, None] & ((k < K) | EVEN_K)[None, :], other=0.0)
                    s_mask = n_ok[:, None] & ((g < SK) | EVEN_K)[None, :]  # [BN, BK/32]
                    acc = _fp4_scaled_step(acc, a, w_ptr + w_off + j[:, None], s_ptr + tl.trans(s_off) + g[None, :],
                                           w_mask, s_mask, False)
                    if TWO:
                        acc2 = _fp4_scaled_step(acc2, a, w2_ptr + w_off + j[:, None], s2_ptr + tl.trans(s_off) + g[None, :],
                                                w_mask, s_mask, False)
                else:
                    a_mask = a_ok[:, None] & j_ok[None, :]
                    a_even = tl.load(a_rows + j[None, :], mask=a_mask, other=0.0)  # [BM, BK/2]
                    a_odd = tl.load(a_rows + KH + j[None, :], mask=a_mask, other=0.0)
                    gn = g + BLOCK_K // 32  # [BK/32] the next tile's scale groups
                    sn_mask = (gn < SK)[:, None] & n_ok[None, :]
                    sg_n = tl.load(s_ptr + s_off + gn[:, None], mask=sn_mask, other=0)  # [BK/32, BN]
                    acc = _fp4_step(acc, a_even, a_odd, w_ptr + w_off + j[:, None], sg,
                                    w_mask, PRECISION, ASM)
                    sg2_n = sg_n
                    if TWO:
                        sg2_n = tl.load(s2_ptr + s_off + gn[:, None], mask=sn_mask, other=0)
                        acc2 = _fp4_step(acc2, a_even, a_odd, w2_ptr + w_off + j[:, None],
                                         sg2, w_mask, PRECISION, ASM)
                    sg, sg2 = sg_n, sg2_n
        return acc, acc2

    @triton.jit
    def _qdot_t(acc, acc2, a_rows, a_ok, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n, n_ok, N, K,
                FMT: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                ASM: tl.constexpr, TWO: tl.constexpr, SCALED: tl.constexpr):
        """_qdot swapped: acc^T [BN, BM] += W [BN, BK] @ A^T [BK, BM], the dequantised weights the
        dot's FIRST operand (Hopper's wgmma takes A from registers: no trip through shared memory
        for the dequantised tile) and the few activation rows the second (N = BM may be 8).
        Same operands and layouts as _qdot_n; the result is transposed back once per output tile."""
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        a_cols = tl.trans(a_rows)  # [1, BM] A row pointers
        slot64 = slot.to(tl.int64)
        n64 = offs_n.to(tl.int64)[:, None]  # [BN, 1]
        acc_t = tl.zeros([BN, BM], dtype=tl.float32)
        acc2_t = tl.zeros([BN, BM], dtype=tl.float32)
        if FMT == 1:
            SK = (K + 127) // 128
            w_off = slot64 * N * K + n64 * K  # [BN, 1]
            s_off = slot64 * ((N + 127) // 128) * SK + (n64 // 128) * SK  # [BN, 1]
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k  # [BK]
                k_ok = (k < K) | EVEN_K
                a_t = tl.load(a_cols + k[:, None], mask=k_ok[:, None] & a_ok[None, :], other=0.0)  # [BK, BM]
                w_mask = n_ok[:, None] & k_ok[None, :]  # [BN, BK]
                acc_t = _fp8_step_t(acc_t, a_t, w_ptr + w_off + k[None, :], s_ptr + s_off + k0 // 128, w_mask,
                                    n_ok, PRECISION)
                if TWO:
                    acc2_t = _fp8_step_t(acc2_t, a_t, w2_ptr + w_off + k[None, :], s2_ptr + s_off + k0 // 128,
                                         w_mask, n_ok, PRECISION)
        else:
            KH, SK = K // 2, K // 32
            w_off = slot64 * N * KH + n64 * KH  # [BN, 1] packed rows
            s_off = slot64 * N * SK + n64 * SK  # [BN, 1]
            if EVEN_K:  # SK is a multiple of the tile's BK/32 scale groups: one vector load per row
                s_off = tl.multiple_of(s_off, [BLOCK_K // 32, 1])
            offs_j = tl.arange(0, BLOCK_K // 2)
            offs_g = tl.arange(0, BLOCK_K // 32)
            if SCALED:
                for k0 in range(0, K, BLOCK_K):
                    j = k0 // 2 + offs_j  # [BK/2]
                    g = k0 // 32 + offs_g  # [BK/32]
                    s_mask = n_ok[:, None] & ((g < SK) | EVEN_K)[None, :]  # [BN, BK/32]
                    w_mask = n_ok[:, None] & ((j < KH) | EVEN_K)[None, :]  # [BN, BK/2]
                    k = k0 + tl.arange(0, BLOCK_K)  # [BK] natural order
                    a_t = tl.load(a_cols + k[:, None], mask=((k < K) | EVEN_K)[:, None] & a_ok[None, :],
                                  other=0.0)  # [BK, BM]
                    acc_t = _fp4_scaled_step(acc_t, a_t, w_ptr + w_off + j[None, :], s_ptr + s_off + g[None, :],
                                             w_mask, s_mask, True)
                    if TWO:
                        acc2_t = _fp4_scaled_step(acc2_t, a_t, w2_ptr + w_off + j[None, :], s2_ptr + s_off + g[None, :],
                                                  w_mask, s_mask, True)
            else:
                # The scales are read one K tile ahead: unlike the weights (cp.async through shared memory,
                # several tiles in flight), their small loads are plain global loads, and a warp would wait
                # out their whole latency in the tile that uses them (ncu: 34% of the stall cycles).
                s_rows = s_ptr + s_off  # [BN, 1]
                s2_rows = s2_ptr + s_off
                s_mask = n_ok[:, None] & (offs_g < SK)[None, :]  # [BN, BK/32]
                sg = tl.load(s_rows + offs_g[None, :], mask=s_mask, other=0)  # [BN, BK/32] this tile's scales
                sg2 = sg
                if TWO:
                    sg2 = tl.load(s2_rows + offs_g[None, :], mask=s_mask, other=0)
                for k0 in range(0, K, BLOCK_K):
                    j = k0 // 2 + offs_j  # [BK/2]
                    g_next = (k0 + BLOCK_K) // 32 + offs_g  # [BK/32] the next tile's scale groups
                    next_mask = n_ok[:, None] & (g_next < SK)[None, :]
                    sg_next = tl.load(s_rows + g_next[None, :], mask=next_mask, other=0)
                    a_mask = ((j < KH) | EVEN_K)[:, None] & a_ok[None, :]
                    a_even = tl.load(a_cols + j[:, None], mask=a_mask, other=0.0)  # [BK/2, BM]
                    a_odd = tl.load(a_cols + KH + j[:, None], mask=a_mask, other=0.0)
                    acc_t = _fp4_step_t(acc_t, a_even, a_odd, w_ptr + w_off, k0, KH, n_ok, sg, BLOCK_K, EVEN_K,
                                        PRECISION, ASM)
                    sg2_next = sg_next
                    if TWO:
                        sg2_next = tl.load(s2_rows + g_next[None, :], mask=next_mask, other=0)
                        acc2_t = _fp4_step_t(acc2_t, a_even, a_odd, w2_ptr + w_off, k0, KH, n_ok, sg2, BLOCK_K,
                                             EVEN_K, PRECISION, ASM)
                    sg, sg2 = sg_next, sg2_next
        return acc + tl.trans(acc_t), acc2 + tl.trans(acc2_t)

    @triton.jit
    def _fp8_step(acc, a, w_ptrs, s_ptrs, w_mask, n_ok, PRECISION: tl.constexpr):
        """One K tile of an fp8 weight: w_ptrs [BK, BN] e4m3, s_ptrs [1, BN] its block scales."""
        DOT = a.dtype
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BK, BN]
        scale = _e8m0_to_f32(tl.load(s_ptrs, mask=n_ok[None, :], other=0))  # [1, BN]
        if acc.shape[0] <= 16:  # decode: scaling the [BM, BN] partial product is cheapest
            acc += tl.dot(a, w.to(DOT), input_precision=PRECISION) * scale
        else:  # prefill: scale the weights, so the MMA keeps accumulating in place
            acc = tl.dot(a, w.to(DOT) * scale.to(DOT), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _fp8_step_t(acc_t, a_t, w_ptrs, s_ptrs, w_mask, n_ok, PRECISION: tl.constexpr):
        """_fp8_step swapped: acc_t [BN, BM] += (W [BN, BK] @ a_t [BK, BM]) * scale [BN, 1]."""
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BN, BK]
        scale = _e8m0_to_f32(tl.load(s_ptrs, mask=n_ok[:, None], other=0))  # [BN, 1]
        return acc_t + tl.dot(w.to(a_t.dtype), a_t, input_precision=PRECISION) * scale

    @triton.jit
    def _fp4_step(acc, a_even, a_odd, w_ptrs, sg, w_mask, PRECISION: tl.constexpr, ASM: tl.constexpr):
        """One K tile of a packed fp4 weight: w_ptrs [BK/2, BN] bytes, sg [BK/32, BN] their scales."""
        b = tl.load(w_ptrs, mask=w_mask, other=0)  # [BK/2, BN] uint8
        even, odd = _fp4_tile(b, sg, a_even.dtype, ASM)
        acc = tl.dot(a_even, even, acc, input_precision=PRECISION)
        return tl.dot(a_odd, odd, acc, input_precision=PRECISION)

    @triton.jit
    def _fp4_step_t(acc_t, a_even, a_odd, w_rows, k0, KH, n_ok, sg, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
        """_fp4_step swapped: the K tile at input k0 of packed rows w_rows [BN, 1] (KH bytes each), sg
        [BN, BK/32] its scale bytes, a_even / a_odd [BK/2, BM]; acc_t [BN, BM] += even [BN, BK/2] @ a_even +
        odd @ a_odd. ASM reads the bytes as int16 pairs (_fp4_tile_pairs: 6% faster on the H200)."""
        if ASM:
            i = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # [BK/4] byte pairs of the tile
            ok = n_ok[:, None] & ((i < KH // 2) | EVEN_K)[None, :]
            b16 = tl.load(w_rows.to(tl.pointer_type(tl.int16), bitcast=True) + i[None, :], mask=ok, other=0)
            even, odd = _fp4_tile_pairs(b16, sg)
        else:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] bytes of the tile
            ok = n_ok[:, None] & ((j < KH) | EVEN_K)[None, :]
            b = tl.load(w_rows + j[None, :], mask=ok, other=0)  # [BN, BK/2] uint8
            even, odd = _fp4_tile(b, sg, a_even.dtype, ASM, 1)
        acc_t = tl.dot(even, a_even, acc_t, input_precision=PRECISION)
        return tl.dot(odd, a_odd, acc_t, input_precision=PRECISION)

    @triton.jit
    def _fp4_scaled_step(acc, a, w_ptrs, s_ptrs, w_mask, s_mask, SWAP: tl.constexpr):
        """One K tile through tl.dot_scaled (fp16 activations x e2m1 weights with ue8m0 scales per
        32 inputs; Triton picks the dequantisation). s_ptrs [BN, BK/32] either way;
        SWAP: w_ptrs [BN, BK/2], a [BK, BM], acc [BN, BM]; else w_ptrs [BK/2, BN], a [BM, BK], acc [BM, BN]."""
        b = tl.load(w_ptrs, mask=w_mask, other=0)  # packed along K
        sg = tl.load(s_ptrs, mask=s_mask, other=0)  # [BN, BK/32]
        if SWAP:
            return tl.dot_scaled(b, sg, "e2m1", a, None, "fp16", acc)
        else:
            return tl.dot_scaled(a, None, "fp16", b, sg, "e2m1", acc)

    # _fp4_to_e4m3 alone (no fp16, no scale) on 4 packed bytes per instance: $2 = bytes w0..w3 ->
    # $0 = the e4m3 bytes (value * 2^-6) of their low nibbles (even inputs), $1 of their high nibbles
    # (odd inputs), byte i of each output from byte i of $2. Shifts move no bit into a neighbouring
    # byte's kept bits (the masks drop them). The fp8 tensor cores take these bytes as they are.
    _FP4_E4M3_ASM = tl.constexpr("""
    {
    .reg .b32 t;
    shl.b32 t, $2, 2;
    and.b32 $0, t, 0x1C1C1C1C;
    shl.b32 t, $2, 4;
    and.b32 t, t, 0x80808080;
    or.b32 $0, $0, t;
    shr.b32 t, $2, 2;
    and.b32 $1, t, 0x1C1C1C1C;
    and.b32 t, $2, 0x80808080;
    or.b32 $1, $1, t;
    }
    """)

    @triton.jit
    def _fp4_tile_e4m3(b, ASM: tl.constexpr):
        """Packed e2m1 bytes b uint8 [BN, BK/2] -> [BN, BK] float8e4nv (value * 2^-6) in the stored K order:
        each 32-input scale group as [16 even inputs | 16 odd inputs]. A thread holding bytes 4q..4q+3 of
        a group gets K positions 4q.. and 16+4q.. of it: an e4m3 wgmma's A fragment, no shuffles."""
        BN: tl.constexpr = b.shape[0]
        G: tl.constexpr = b.shape[1] // 16
        if ASM:
            lo, hi = tl.inline_asm_elementwise(_FP4_E4M3_ASM, "=r,=r,r", [b], dtype=(tl.uint8, tl.uint8),
                                               is_pure=True, pack=4)
            lo = lo.to(tl.float8e4nv, bitcast=True)
            hi = hi.to(tl.float8e4nv, bitcast=True)
        else:
            lo, hi = _fp4_to_e4m3(b)
        w = tl.reshape(tl.join(lo, hi), [BN, G, 16, 2])  # [BN, G, 16, 2]
        return tl.reshape(tl.permute(w, (0, 1, 3, 2)), [BN, G * 32])  # [BN, G, 2, 16] -> [BN, BK]

    @triton.jit
    def _fp4_f8_step(acc_t, b_hi, b_lo, s_a, w_ptrs, s_ptrs, w_mask, s_mask, ASM: tl.constexpr):
        """One K tile of G = BK/32 scale groups on the fp8 tensor cores: acc_t [BN, BM] += s_a *
        sum_g 64 scale[:, g] * (W_g @ (hi_g + lo_g)). w_ptrs [BN, BK/2] packed bytes, s_ptrs [BN, G] their
        e8m0 scales, s_a [1, BM] the activations' (shared) scale; b_hi / b_lo [BK, G * BM] e4m3 are
        block-diagonal: column (g, m) holds row m's part on group g's 32 K rows and zeros elsewhere, so
        one dot yields every group's partial products side by side (the MMA never mixes two groups,
        whose scales differ) and both parts accumulate in it. Each scale meets an fp32 product."""
        BN: tl.constexpr = acc_t.shape[0]
        BM: tl.constexpr = acc_t.shape[1]
        G: tl.constexpr = s_ptrs.shape[1]
        w = _fp4_tile_e4m3(tl.load(w_ptrs, mask=w_mask, other=0), ASM)  # [BN, BK] e4m3
        t = tl.dot(w, b_lo)  # [BN, G * BM] fp32; the small part first
        t = tl.reshape(tl.dot(w, b_hi, t), [BN, G, BM])
        # 2^(s - 127) * 64 in one integer op: exponent field s + 6 (a checkpoint's scale bytes sit far below
        # 249, where it would overflow; a masked byte 0 gives 2^-121 times zero weights)
        sw = ((tl.load(s_ptrs, mask=s_mask, other=0).to(tl.int32) + 6) << 23).to(tl.float32, bitcast=True)  # [BN, G]
        return acc_t + tl.sum(t * sw[:, :, None], axis=1) * s_a  # [BN, BM]

    @triton.jit
    def _qdot_f8(acc, acc2, a_rows, a_ok, sa_rows, part_q, w_ptr, s_ptr, w2_ptr, s2_ptr, slot, offs_n,
                 n_ok, N, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr, TWO: tl.constexpr):
        """_qdot for fp4 weights on the fp8 tensor cores, swapped like _qdot_t (acc^T [BN, BM]): the nibbles
        become e4m3 bytes by bit placement only (_FP4_E4M3_ASM, no fp16, no per-value scale) and the
        scales multiply fp32 partial products (_fp4_f8_step).
        A: a_rows [BM, 1] e4m3 rows of part 0 (part 1 at + part_q), stored in each group's K order
        [even | odd] (_h_column), split per 128-input block in one scale (fp8x_act_split with
        shared_scale: a ~= s (hi + lo)); sa_rows [BM, 1] fp32 rows of those scales [K/128]. BLOCK_K divides 128."""
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        G: tl.constexpr = BLOCK_K // 32
        NB: tl.constexpr = G * BM  # B columns (group, row), row fastest
        s_cols = tl.trans(sa_rows)  # [1, BM]
        b_cols = tl.reshape(tl.broadcast_to(tl.trans(a_rows)[:, None, :], [1, G, BM]), [1, NB])  # [1, NB]
        b_ok = tl.reshape(tl.broadcast_to(a_ok[None, :], [G, BM]), [NB])  # [NB]
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        diag = (offs_k // 32)[:, None] == (tl.arange(0, NB) // BM)[None, :]  # [BK, NB]: group g's rows and columns
        slot64 = slot.to(tl.int64)
        n64 = offs_n.to(tl.int64)[:, None]  # [BN, 1]
        KH, SK = K // 2, K // 32
        w_off = slot64 * N * KH + n64 * KH + tl.arange(0, BLOCK_K // 2)[None, :]  # [BN, BK/2] packed bytes
        s_row = slot64 * N * SK + n64 * SK  # [BN, 1]
        if EVEN_K:  # K % BLOCK_K == 0: a row's G scales of a K tile are G-aligned (one async copy when G = 4)
            s_row = tl.multiple_of(s_row, [G, 1])
        s_off = s_row + tl.arange(0, G)[None, :]  # [BN, G]
        acc_t = tl.zeros([BN, BM], dtype=tl.float32)
        acc2_t = tl.zeros([BN, BM], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            s_a = tl.load(s_cols + k0 // 128, mask=a_ok[None, :], other=0.0)  # [1, BM]
            k_ok = ((k0 + offs_k) < K) | EVEN_K  # [BK]
            b_mask = diag & k_ok[:, None] & b_ok[None, :]
            b_hi = tl.load(b_cols + (k0 + offs_k)[:, None], mask=b_mask, other=0.0)  # [BK, NB] e4m3
            b_lo = tl.load(b_cols + part_q + (k0 + offs_k)[:, None], mask=b_mask, other=0.0)
            w_mask = n_ok[:, None] & ((k0 // 2 + tl.arange(0, BLOCK_K // 2) < KH) | EVEN_K)[None, :]
            s_mask = n_ok[:, None] & ((k0 // 32 + tl.arange(0, G) < SK) | EVEN_K)[None, :]
            acc_t = _fp4_f8_step(acc_t, b_hi, b_lo, s_a, w_ptr + w_off + k0 // 2, s_ptr + s_off + k0 // 32, w_mask,
                                 s_mask, ASM)
            if TWO:
                acc2_t = _fp4_f8_step(acc2_t, b_hi, b_lo, s_a, w2_ptr + w_off + k0 // 2, s2_ptr + s_off + k0 // 32,
                                      w_mask, s_mask, ASM)
        return acc + tl.trans(acc_t), acc2 + tl.trans(acc2_t)

    @triton.jit
    def _h_column(offs_n, I, FMT: tl.constexpr, VAR: tl.constexpr):
        """Where feature n of h is stored: in place, or for fp4's down projection split into
        [even features | odd features] (see _qdot_n; not for tl.dot_scaled, VAR bit 2), or with
        VAR bit 4 (_qdot_f8) the same split inside each 32-feature scale group."""
        if FMT == 2 and VAR // 4 % 2 == 1:
            return offs_n // 32 * 32 + (offs_n % 2) * 16 + offs_n % 32 // 2
        elif FMT == 2 and VAR // 2 % 2 == 0:
            return (offs_n % 2) * (I // 2) + offs_n // 2
        else:
            return offs_n

    @triton.jit
    def _swiglu_tile(x_ptr, stride_xt, xs_ptr, x_part_q, w1_ptr, w3_ptr, s1_ptr, s3_ptr, rw_ptr, pair,
                     pair_ok, slot, offs_n, w_off, n_ok, offs_k, D, I, top_k, limit, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                     FMT: tl.constexpr, ASM: tl.constexpr, VAR: tl.constexpr):
        """One up-projection tile: silu(min(x w1, limit)) * clamp(x w3, +-limit) * routing weight
        for BM pairs (pair [BM], token = pair // top_k) x BN features of one slot (w_off [BK, BN]
        = the slot's w1/w3 rows, transposed; quantised formats (FMT 1 fp8, 2 fp4) use slot, offs_n
        and the scales instead; VAR bit 4: x split, xs_ptr its scales, see _qdot_f8): [BM, BN] fp32."""
        tok = tl.where(pair_ok, pair // top_k, 0)
        a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
        b1_ptrs = w1_ptr + w_off  # [BK, BN] = w1[slot, n, k]^T
        b3_ptrs = w3_ptr + w_off
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if FMT != 0:
            a_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xt  # [BM, 1]
            sa_rows = xs_ptr + tok.to(tl.int64)[:, None] * tl.cdiv(D, 128)  # [BM, 1] (VAR bit 4 only)
            acc_g, acc_u = _qdot(acc_g, acc_u, a_rows, pair_ok, sa_rows, x_part_q, w1_ptr, s1_ptr,
                                 w3_ptr, s3_ptr, slot, offs_n, n_ok, I, D, FMT, BLOCK_K, EVEN_K, PRECISION, ASM,
                                 True, VAR)
        else:
            for k0 in range(0, D, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=pair_ok[:, None], other=0.0)
                    b1 = tl.load(b1_ptrs, mask=n_ok[None, :], other=0.0)
                    b3 = tl.load(b3_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k + k0 < D
                    a = tl.load(a_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
                    b1 = tl.load(b1_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    b3 = tl.load(b3_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_g = tl.dot(a, b1, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(a, b3, acc_u, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b1_ptrs += BLOCK_K
                b3_ptrs += BLOCK_K
        return _swiglu_weighted(acc_g, acc_u, rw_ptr, pair, pair_ok, limit)

    @triton.jit
    def _swiglu_weighted(acc_g, acc_u, rw_ptr, pair, pair_ok, limit):
        """silu(min(g, limit)) * clamp(u, +-limit) * routing weight of each pair: acc_g, acc_u [BM, BN]
        fp32 (x w1, x w3), pair [BM] -> [BM, BN] fp32 (the routing weight is applied before w2)."""
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        rw = tl.load(rw_ptr + pair, mask=pair_ok, other=0.0)  # [BM]
        return g / (1.0 + tl.exp(-g)) * u * rw[:, None]

    @triton.jit
    def _down_tile(a_ptrs, b_ptrs, pair_ok, n_ok, offs_k, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        """One down-projection tile: h rows (a_ptrs [BM, BK]) @ the slot's w2^T (b_ptrs [BK, BN]),
        summed over I: [BM, BN] fp32."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=pair_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k + k0 < I
                a = tl.load(a_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        return acc

    @triton.jit
    def _sorted_tile(pid, num_n, slot_ptr):
        """Align-path program id -> (row block, column tile, the block's slot; < 0: padding). The column
        tiles of one row block are adjacent in launch order, so its gathered rows are read once into L2."""
        pid_m = pid // num_n
        return pid_m, pid % num_n, tl.load(slot_ptr + pid_m)

    @triton.jit
    def _block_pairs(pid_m, pairs_ptr, N, BLOCK_M: tl.constexpr):
        """A row block of the sorted order -> (offs_m [BM], pair [BM] (token, k) ids, pair_ok [BM])."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(pairs_ptr + offs_m)
        return offs_m, pair, pair < N

    @triton.jit
    def _moe_up_kernel(x_ptr, stride_xt, xs_ptr, x_part_q, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, rw_ptr, pairs_ptr,
                       slot_ptr,
                       N, D, I, top_k, limit, num_n,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FMT: tl.constexpr,
                       ASM: tl.constexpr, VAR: tl.constexpr):
        pid_m, pid_n, slot = _sorted_tile(tl.program_id(0), num_n, slot_ptr)
        if slot < 0:  # a padding block of the align step
            return
        offs_m, pair, pair_ok = _block_pairs(pid_m, pairs_ptr, N, BLOCK_M)  # [BM] rows of the sorted order
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate features
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        w_off = slot.to(tl.int64) * I * D + offs_n.to(tl.int64)[None, :] * D + offs_k[:, None]
        h = _swiglu_tile(x_ptr, stride_xt, xs_ptr, x_part_q, w1_ptr, w3_ptr, s1_ptr, s3_ptr, rw_ptr,
                         pair, pair_ok, slot, offs_n,
                         w_off, n_ok, offs_k, D, I, top_k, limit, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION,
                         FMT, ASM, VAR)
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + _h_column(offs_n, I, FMT, VAR)[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_kernel(h_ptr, hs_ptr, h_part_q, w2_ptr, s2_ptr, y_ptr, pairs_ptr, slot_ptr, N, D, I, num_n,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, PRECISION: tl.constexpr, FMT: tl.constexpr,
                         ASM: tl.constexpr, VAR: tl.constexpr):
        pid_m, pid_n, slot = _sorted_tile(tl.program_id(0), num_n, slot_ptr)
        if slot < 0:  # a padding block of the align step
            return
        offs_m, pair, pair_ok = _block_pairs(pid_m, pairs_ptr, N, BLOCK_M)  # [BM] rows of the sorted order
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden features
        n_ok = offs_n < D
        offs_k = tl.arange(0, BLOCK_K)  # [BK] over I
        a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_k[None, :]  # [BM, BK]
        b_ptrs = (w2_ptr + slot.to(tl.int64) * D * I + offs_n.to(tl.int64)[None, :] * I
                  + offs_k[:, None])  # [BK, BN] = w2[slot, n, k]^T
        if FMT == 0:
            acc = _down_tile(a_ptrs, b_ptrs, pair_ok, n_ok, offs_k, I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION)
        else:
            h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * I  # [BM, 1]
            hs_rows = hs_ptr + offs_m.to(tl.int64)[:, None] * tl.cdiv(I, 128)  # [BM, 1] (VAR bit 4 only)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc, _ = _qdot(acc, acc, h_rows, pair_ok, hs_rows, h_part_q, w2_ptr, s2_ptr, w2_ptr, s2_ptr,
                           slot, offs_n, n_ok, D, I, FMT, BLOCK_K, EVEN_K, PRECISION, ASM, False, VAR)
        y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * D + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=pair_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _slot_rank(ids_ptr, N, sid, NP: tl.constexpr):
        """Scan all N pair ids for slot id `sid`: (rank [NP] of each pair among the slot's pairs
        in flat order, -1 elsewhere; count)."""
        offs_p = tl.arange(0, NP)
        mine = (tl.load(ids_ptr + offs_p, mask=offs_p < N, other=-1) == sid) & (offs_p < N)
        mine_i = mine.to(tl.int32)
        rank = tl.where(mine, tl.cumsum(mine_i, 0) - 1, -1)
        return rank, tl.sum(mine_i)

    @triton.jit
    def _chunk_pairs(rank, m0, N, NP: tl.constexpr, BLOCK_M: tl.constexpr):
        """Pairs of ranks m0 .. m0+BLOCK_M-1 (N where the slot has fewer): [BM] int32."""
        offs_p = tl.arange(0, NP)
        want = m0 + tl.arange(0, BLOCK_M)  # [BM]
        sel = rank[None, :] == want[:, None]  # [BM, NP] at most one hit per row
        pair = tl.sum(tl.where(sel, offs_p[None, :] + 1, 0), axis=1) - 1  # [BM] -1: none
        return tl.where(pair >= 0, pair, N)

    @triton.jit
    def _moe_up_scan_kernel(x_ptr, stride_xt, xs_ptr, x_part_q, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, rw_ptr, ids_ptr,
                            N, D, I, top_k, limit, slot_offset, num_n,
                            NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                            PRECISION: tl.constexpr, FMT: tl.constexpr, ASM: tl.constexpr, VAR: tl.constexpr):
        # program = (slot, I-tile); the slot's pairs found by scanning ids; h indexed by pair
        pid = tl.program_id(0)
        slot = pid // num_n
        pid_n = pid % num_n
        rank, cnt = _slot_rank(ids_ptr, N, slot + slot_offset, NP)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate features
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        w_off = slot.to(tl.int64) * I * D + offs_n.to(tl.int64)[None, :] * D + offs_k[:, None]
        for m0 in range(0, cnt, BLOCK_M):
            pair = _chunk_pairs(rank, m0, N, NP, BLOCK_M)  # [BM]
            pair_ok = pair < N
            h = _swiglu_tile(x_ptr, stride_xt, xs_ptr, x_part_q, w1_ptr, w3_ptr, s1_ptr, s3_ptr, rw_ptr,
                             pair, pair_ok, slot, offs_n,
                             w_off, n_ok, offs_k, D, I, top_k, limit, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                             PRECISION, FMT, ASM, VAR)
            h_ptrs = h_ptr + pair.to(tl.int64)[:, None] * I + _h_column(offs_n, I, FMT, VAR)[None, :]
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_scan_kernel(h_ptr, hs_ptr, h_part_q, w2_ptr, s2_ptr, y_ptr, ids_ptr, N, D, I, slot_offset, num_n,
                              NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                              PRECISION: tl.constexpr, FMT: tl.constexpr, ASM: tl.constexpr, VAR: tl.constexpr):
        pid = tl.program_id(0)
        slot = pid // num_n
        pid_n = pid % num_n
        rank, cnt = _slot_rank(ids_ptr, N, slot + slot_offset, NP)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden features
        n_ok = offs_n < D
        offs_k = tl.arange(0, BLOCK_K)  # [BK] over I
        w_off = slot.to(tl.int64) * D * I + offs_n.to(tl.int64)[None, :] * I + offs_k[:, None]
        for m0 in range(0, cnt, BLOCK_M):
            pair = _chunk_pairs(rank, m0, N, NP, BLOCK_M)  # [BM]
            pair_ok = pair < N
            a_ptrs = h_ptr + pair.to(tl.int64)[:, None] * I + offs_k[None, :]  # [BM, BK]
            b_ptrs = w2_ptr + w_off  # [BK, BN] = w2[slot, n, k]^T
            if FMT == 0:
                acc = _down_tile(a_ptrs, b_ptrs, pair_ok, n_ok, offs_k, I, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                                 PRECISION)
            else:
                h_rows = h_ptr + pair.to(tl.int64)[:, None] * I  # [BM, 1]
                hs_rows = hs_ptr + pair.to(tl.int64)[:, None] * tl.cdiv(I, 128)  # [BM, 1] (VAR bit 4 only)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc, _ = _qdot(acc, acc, h_rows, pair_ok, hs_rows, h_part_q, w2_ptr, s2_ptr, w2_ptr,
                               s2_ptr, slot, offs_n, n_ok, D, I, FMT, BLOCK_K, EVEN_K, PRECISION, ASM, False, VAR)
            y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * D + offs_n[None, :]
            tl.store(y_ptrs, acc, mask=pair_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, D, top_k, slot_lo, slot_hi,
                        BLOCK_N: tl.constexpr):
        t = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(top_k):
            pair = t.to(tl.int64) * top_k + k
            sid = tl.load(ids_ptr + pair + tl.zeros([BLOCK_N], tl.int64))  # [BN] same id
            here = n_ok & (sid >= slot_lo) & (sid < slot_hi)  # other ranks' pairs: never written
            acc += tl.load(y_ptr + pair * D + offs_n, mask=here, other=0.0)
        tl.store(out_ptr + t.to(tl.int64) * D + offs_n, acc, mask=n_ok)


SCAN_MAX_PAIRS = 2048  # decode path (no align step) up to this many (token, k) pairs
SCAN_MAX_TILE = 16384  # ... and while a BLOCK_M x next_pow2(N) compaction tile stays this small
_FMT_CODE = {"bf16": 0, "fp8": 1, "fp4": 2}  # the kernels' FMT constexpr
# Quantised block configs: (BLOCK_N, BLOCK_K, warps) per GEMM. fp8 needs BLOCK_K | 128 (one scale
# per partial product); fp4's BLOCK_K counts unpacked inputs (BLOCK_K / 2 bytes per row per step).
# Picked on the H200 (bench/bench_kernels.py --only qmoe, QMOE_SWEEP; triton 3.6): decode "swaps" the dot
# (dequantised weights as its first operand, the few activation rows as its second: BLOCK_M 8 = wgmma's
# narrowest N) — fp4 1.35 ms vs 1.63 unswapped at BLOCK_M 16, fp8 1.17 vs 1.22; fp8 prefill on the fp8
# tensor cores (fp8_act: x and h split into that many e4m3 parts; 0: off) with 3 pipeline stages, the two
# parts in one scale (fp8_shared: their dots chain in one accumulator) — 6.86 ms vs 7.66 with a scale each.
# fp4 decode "fp8_mma" (VAR bit 4, _qdot_f8: e2m1 -> e4m3 by bit placement, e4m3 x e4m3 dots on x / h split in
# two parts): ~half the SASS per weight value of "swap" in the sm_90 AOT count (bench/aot_sass.py --var 5),
# yet slower on the H200 (1.97-2.41 ms vs 1.34): off; QMOE_SWEEP keeps timing it. fp4 decode (1.27 -> 1.03 ms):
# capped at 128 registers per thread (168 uncapped; 4 blocks per SM instead of 3), its scales read a tile
# ahead (_qdot_t; ncu: a warp issued every 7.0 cycles, 34% of them waiting on the scale loads), and the align
# step's sorted blocks instead of the scan path ("scan": False): its conversion-heavy blocks cannot hide
# each block scanning all pair ids first, which the bf16 and fp8 weight streams do.
QUANT_CFG = {
    "fp8": dict(decode=dict(BLOCK_M=8, up=(128, 128, 4), down=(128, 128, 4), swap=True),
                mid=dict(BLOCK_M=64, up=(64, 64, 4), down=(128, 64, 4)),
                prefill=dict(BLOCK_M=128, up=(128, 64, 8), down=(128, 64, 8), fp8_act=2, stages=3,
                             fp8_shared=True)),
    "fp4": dict(decode=dict(BLOCK_M=8, up=(64, 128, 4), down=(64, 256, 4), swap=True, dot_scaled=False,
                            maxnreg=128, scan=False),
                mid=dict(BLOCK_M=64, up=(64, 64, 4), down=(128, 64, 4)),
                prefill=dict(BLOCK_M=128, up=(128, 128, 8), down=(128, 128, 8))),  # 11.8 ms vs 13.4 at 128 x 64
}


def _moe_config(N: int, P_local: int, elem_size: int, I: int = 2048, fmt: str = "bf16"):
    """Block sizes by pairs per slot: decode (few rows per slot) is a weight stream, so a small
    BLOCK_M keeps padding cheap and the scan path skips the align step (unless the config has
    "scan": False, as fp4's decode does); prefill uses 128-row tiles for the tensor cores.
    (BLOCK_N, BLOCK_K, warps) per GEMM."""
    per_slot = N / max(P_local, 1)
    phase = "decode" if per_slot <= 32 else "mid" if per_slot <= 64 else "prefill"
    if fmt != "bf16":
        cfg = {k: v for k, v in QUANT_CFG[fmt][phase].items()}
    elif phase == "decode":  # a weight stream; a narrow up tile where a wide one leaves SMs idle
        cfg = dict(BLOCK_M=16, up=(32 if P_local * I < 64 * 1024 else 64, 256, 4),
                   down=(64, 128, 4))
    elif phase == "mid":
        cfg = dict(BLOCK_M=64, up=(64, 64, 4), down=(128, 64, 4))
    else:
        cfg = dict(BLOCK_M=128, up=(128, 64, 8), down=(128, 64, 8))
    cfg["scan"] = cfg.get("scan", True) and N <= SCAN_MAX_PAIRS and cfg["BLOCK_M"] * _next_pow2(N) <= SCAN_MAX_TILE
    cfg["elem_size"] = elem_size
    return cfg


def _stages(BLOCK_M, BLOCK_N, BLOCK_K, mats, elem_size, weight_size=None):
    """Pipeline depth that fits ~160 KB of shared memory (H200 has 227 KB per block).
    weight_size: bytes per weight value when it differs from the activations' (fp8 1, fp4 0.5)."""
    weight_size = elem_size if weight_size is None else weight_size
    per_stage = BLOCK_M * BLOCK_K * elem_size + mats * BLOCK_K * BLOCK_N * weight_size
    return max(2, min(4, int(160_000 // per_stage)))


def _checkexpert_shapes(x, w1, w3, w2, scales, fmt):
    """-> (P_local, I) after checking every expert tensor against x [T, d] and the format."""
    D = x.shape[1]
    P_local, I = w1.shape[0], w1.shape[1]
    for name, w, rows, cols in (("w1", w1, I, D), ("w3", w3, I, D), ("w2", w2, D, I)):
        w_shape, s_shape = expert_shapes(fmt, rows, cols)
        if tuple(w.shape) != (P_local, *w_shape):
            raise ValueError(f"moe_experts: {fmt} {name} must be {[P_local, *w_shape]}, got {list(w.shape)}")
        if s_shape is not None:
            s = scales[("w1", "w3", "w2").index(name)]
            if tuple(s.shape) != (P_local, *s_shape) or s.dtype != torch.uint8:
                raise ValueError(f"moe_experts: {fmt} {name} scale must be uint8 {[P_local, *s_shape]}, "
                                 f"got {s.dtype} {list(s.shape)}")
    return P_local, I


def expert_shapes(fmt, rows, cols):
    """Per-slot (weight, scale | None) shapes of a [rows, cols] expert matrix (as dsv4_mini stores it)."""
    if fmt == "fp4":
        if cols % checkpoint.FP4_BLOCK:
            raise ValueError(f"fp4 experts need input dims divisible by {checkpoint.FP4_BLOCK}, got {cols}")
        return (rows, cols // 2), (rows, cols // checkpoint.FP4_BLOCK)
    if fmt == "fp8":
        b = checkpoint.FP8_BLOCK
        return (rows, cols), (-(-rows // b), -(-cols // b))
    return (rows, cols), None


def _regs(cfg) -> dict:
    """Launch options from a config's "maxnreg" (a register cap per thread: more blocks per SM; None: none)."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _contiguous(*tensors):
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _variant_code(cfg, fmt, dot_dtype, fp8_dots: bool = True) -> int:
    """The kernels' VAR constexpr from a config's variant keys: bit 1 "swap" (quantised only: the
    dequantised weights are the dot's first operand, see _qdot_t), bit 2 "dot_scaled" (fp4:
    tl.dot_scaled does the dequantisation; ignored for fp32 activations), bit 4 "fp8_mma" (fp4 on the
    fp8 tensor cores with activations split into two e4m3 parts, see _qdot_f8; implies the swapped
    orientation; ignored for fp32 activations and where fp8 dots are not supported: fp8_dots False)."""
    swap, scaled = bool(cfg.get("swap", False)), bool(cfg.get("dot_scaled", False))
    f8 = bool(cfg.get("fp8_mma", False))
    if swap and fmt == "bf16":
        raise ValueError("moe_experts: config swap=True is for quantised experts")
    if (scaled or f8) and fmt != "fp4":
        raise ValueError(f"moe_experts: config {'dot_scaled' if scaled else 'fp8_mma'}=True is for fp4 experts")
    if scaled and f8:
        raise ValueError("moe_experts: config dot_scaled and fp8_mma are two different fp4 dots; pick one")
    scaled = scaled and dot_dtype == torch.float16  # fp32 activations (exact path): the plain dots
    f8 = f8 and dot_dtype == torch.float16 and fp8_dots
    return int(swap or f8) | 2 * int(scaled) | 4 * int(f8)


def _fp4_rows(x, var):
    """x [T, d] -> its rows in the input order the fp4 dots read (see _variant_code for var): split
    [even inputs | odd inputs] (_qdot_n / _qdot_t), natural (dot_scaled), or each 32-input scale group as
    [even | odd] (fp8_mma, _qdot_f8; a permutation inside each 128-block, so its split scales are unchanged)."""
    T, D = x.shape
    if var & 4:
        return x.reshape(T, D // 32, 16, 2).transpose(2, 3).reshape(T, D)
    if var & 2:
        return x
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def _split_args(a, var):
    """The kernels' activation arguments for a [R, K] contiguous a: (a, a, 0) (no split; the scale
    pointer unused), or for fp8_mma (var bit 4) fp8x_act_split(a, 2, shared_scale=True) as (q part 0,
    its scales, the part stride)."""
    if not var & 4:
        return a, a, 0
    q, s = fp8x_act_split(a, 2, shared_scale=True)  # [2, R, K] e4m3, [2, R, K/128] fp32 (s[1] = s[0])
    return q, s[0], q.stride(0)


def moe_experts_triton(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0, scales=None, *, config=None):
    """Triton twin of moe_experts_torch (same signature and results; fp32 out).

    Quantised experts (fp8 / fp4, from w1.dtype, scales = (s1, s3, s2)) are dequantised in registers
    tile by tile; their dots run in fp16 for 16-bit activations (e4m3 and scaled e2m1 values are
    exact in fp16, and so is a bf16 activation in fp16's normal range) and in fp32 for fp32 ones.
    config: optional dict like _moe_config's result, to override block sizes (benchmarks);
    its "scan" key (default: from _moe_config) picks the decode path, "stages" / "maxnreg" the pipeline
    depth / a register cap per thread (default: _stages / none), "swap" / "dot_scaled" the
    quantised dot formulation (see _variant_code; defaults in QUANT_CFG; "fp8_mma": fp4 on the fp8 tensor cores,
    x, h in two e4m3 parts: twin moe_experts_torch(act_parts=2, act_shared_scale=True)). fp8 experts outside the scan
    path with 16-bit activations on sm_89+ (or the interpreter) take the fp8 tensor-core path
    (_moe_fp8x_prefill) when the config's "fp8_act" is 1 or 2 (default 2 at prefill, with "fp8_shared": both
    parts in one scale, twin act_shared_scale=True; 0: the path above).
    Host work: output + scratch allocations and 3 launches (the scan path) or 5 (align: scan, scatter, up, down, sum); no sync.
    """
    fmt = _check_scales(w1, scales)
    T, D = x.shape
    K = ids.shape[1]
    P_local, I = _checkexpert_shapes(x, w1, w3, w2, scales, fmt)
    dev = x.device
    out = torch.empty((T, D), dtype=torch.float32, device=dev)  # [T, d]
    if T == 0:
        return out
    if K == 0 or P_local == 0:
        return out.zero_()
    w1, w3, w2 = _contiguous(w1, w3, w2)
    s1, s3, s2 = _contiguous(*scales) if scales is not None else (w1, w3, w2)  # unused when bf16
    if fmt == "bf16":
        dot_dtype = w1.dtype
    else:
        dot_dtype = torch.float32 if x.dtype == torch.float32 else torch.float16
    if x.dtype != dot_dtype:
        x = x.to(dot_dtype)
    esize = torch.empty((), dtype=dot_dtype).element_size()
    cfg = _moe_config(T * K, P_local, esize, I, fmt)
    if config:
        cfg = {**cfg, **config}
    var = _variant_code(cfg, fmt, dot_dtype, not cfg.get("fp8_mma") or fp8_dots_supported(dev))
    if fmt == "fp4":
        x = _fp4_rows(x, var)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()  # [T, K] routing weights
    if ids.dtype != torch.int32 or not ids.is_contiguous():
        ids = ids.to(torch.int32).contiguous()
    N = T * K
    wsize = {"bf16": esize, "fp8": 1, "fp4": 0.5}[fmt]  # bytes per weight value, for the pipeline depth
    BM = cfg["BLOCK_M"]
    scan = cfg["scan"] and N <= SCAN_MAX_PAIRS
    precision = "ieee" if dot_dtype == torch.float32 else "tf32"  # exact fp32; ignored for 16-bit
    y = torch.empty((N, D), dtype=torch.float32, device=dev)  # [T*K, d] per-pair outputs
    limit = float(swiglu_limit)
    BN, BK, warps = cfg["up"]
    BN2, BK2, warps2 = cfg["down"]
    if (fmt == "fp8" or var & 4) and (128 % BK or 128 % BK2):  # one weight / activation scale per K tile
        raise ValueError(f"{'fp8_mma' if var & 4 else 'fp8 experts'} need BLOCK_K dividing 128, got {BK}, {BK2}")
    num_n, num_n2 = -(-I // BN), -(-D // BN2)
    FMT = _FMT_CODE[fmt]
    # fp4 dequantises with inline PTX on the GPU (cvt from e4m3 needs sm_89+; the interpreter cannot run it)
    asm = (fmt == "fp4" and dot_dtype == torch.float16 and x.is_cuda and not _interpreting()
           and torch.cuda.get_device_capability(dev) >= (8, 9) and cfg.get("asm", True)
           and os.environ.get("DSV4_FP4_ASM", "1") != "0")  # config / env: force the plain-Triton path
    if fmt == "fp4" and (BK % 32 or BK2 % 32):
        raise ValueError(f"fp4 experts need BLOCK_K a multiple of 32, got {BK}, {BK2}")
    # fp8_mma: x (and h between the GEMMs) go to the kernels split into two e4m3 parts; h is written in
    # fp32 and split like x (as the twin moe_experts_torch(act_parts=2) rounds it)
    xa = _split_args(x, var)  # (x or its part 0, scales, part strides)
    h_dtype = torch.float32 if var & 4 else dot_dtype
    h_new = torch.zeros if var & 4 else torch.empty  # split whole: rows no pair writes must not hold NaN bits
    asize, asize2 = (BK // 16, BK2 // 16) if var & 4 else (esize, esize)  # stage bytes: 2 block-diagonal parts
    stages_up = cfg.get("stages") or _stages(BM, BN, BK, 2, asize, wsize)  # config: pipeline depth, register cap
    stages_down = cfg.get("stages") or _stages(BM, BN2, BK2, 1, asize2, wsize)
    regs = _regs(cfg)
    if scan:
        NP = max(16, _next_pow2(N))
        h = h_new((N, I), dtype=h_dtype, device=dev)  # [T*K, I] by pair
        _moe_up_scan_kernel[(P_local * num_n,)](
            xa[0], xa[0].stride(-2), *xa[1:], w1, w3, s1, s3, h, weights, ids, N, D, I, K, limit, slot_offset, num_n,
            NP=NP, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, EVEN_K=D % BK == 0, PRECISION=precision, FMT=FMT, ASM=asm, VAR=var,
            num_warps=warps, num_stages=stages_up, **regs)
        _moe_down_scan_kernel[(P_local * num_n2,)](
            *_split_args(h, var), w2, s2, y, ids, N, D, I, slot_offset, num_n2,
            NP=NP, BLOCK_M=BM, BLOCK_N=BN2, BLOCK_K=BK2, EVEN_K=I % BK2 == 0,
            PRECISION=precision, FMT=FMT, ASM=asm, VAR=var, num_warps=warps2, num_stages=stages_down, **regs)
    elif fmt == "fp8" and cfg.get("fp8_act") and dot_dtype == torch.float16 and fp8_dots_supported(dev):
        _moe_fp8x_prefill(x, weights, ids, w1, w3, w2, (s1, s3, s2), limit, slot_offset, cfg, y)
    else:
        sorted_pairs, block_slot = _moe_align(ids, slot_offset, P_local, BM)
        num_blocks = block_slot.shape[0]
        h = h_new((num_blocks * BM, I), dtype=h_dtype, device=dev)  # [rows, I] sorted
        _moe_up_kernel[(num_blocks * num_n,)](
            xa[0], xa[0].stride(-2), *xa[1:], w1, w3, s1, s3, h, weights, sorted_pairs, block_slot, N, D, I, K,
            limit, num_n, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, EVEN_K=D % BK == 0,
            PRECISION=precision, FMT=FMT, ASM=asm, VAR=var, num_warps=warps, num_stages=stages_up, **regs)
        _moe_down_kernel[(num_blocks * num_n2,)](
            *_split_args(h, var), w2, s2, y, sorted_pairs, block_slot, N, D, I, num_n2,
            BLOCK_M=BM, BLOCK_N=BN2, BLOCK_K=BK2, EVEN_K=I % BK2 == 0, PRECISION=precision, FMT=FMT, ASM=asm, VAR=var,
            num_warps=warps2, num_stages=stages_down, **regs)
    SUM_N = min(1024, _next_pow2(D))
    _moe_sum_kernel[(T, -(-D // SUM_N))](
        y, ids, out, D, K, slot_offset, slot_offset + P_local, BLOCK_N=SUM_N, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Experts: fp8 tensor-core prefill (fp8 experts, activations split into two e4m3 parts)
# ---------------------------------------------------------------------------------------------
# For fp8 experts at prefill (128-row slot tiles, not the scan path) the dots run on the fp8 tensor
# cores (sm_89+; Hopper wgmma): weights go from memory into the dot as e4m3, with no dequantisation
# in registers. Activations (x, and h between the GEMMs) are split per (row, 128-input block) into
# a ~= s_hi * hi + s_lo * lo, both e4m3 with power-of-two scales and lo holding hi's rounding error:
# ~2^-8 relative error per element, near bf16 (hi alone, PARTS = 1, is plain activation-quantised
# fp8: ~2^-4). Per 128-wide K block both parts' dots go to a fresh fp32 tile (lo's first, rescaled by
# s_lo / s_hi) that is scaled by the activation scales [BM] and the weight block's scale and added to
# the accumulator (DeepGEMM-style promotion: the fp8 MMA never accumulates more than one 128-block, and
# no scale meets e4m3's range). sm_90 AOT (triton 3.9 on a CPU, 128 x 128 tiles, 8 warps): wgmma
# m64n128k32 e4m3 x e4m3; the two-part up kernel sits at 255 registers with a 56-byte spill.
# BLOCK_K is 128 (one weight scale per K block); BLOCK_N divides 128 (one per tile); the up kernel's
# BLOCK_N is 128, so each of its tiles holds whole 128-blocks of h and writes them already split.
# Twin: moe_experts_torch(..., act_parts=PARTS) with fp8x_act_split_torch.
if triton is not None:

    @triton.jit
    def _pow2_for_e4m3(amax):
        """amax [BM] fp32 >= 0 -> (s, 1/s) [BM]: powers of two with amax / s in (224, 448] (s = 1
        where amax is 0), from amax's exponent bits as _pow2_for_e4m3_torch."""
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        e = tl.where(amax > 0, tl.minimum(tl.maximum(e, 1), 253), 127)
        return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_e4m3(v):
        """fp32 v (|v| <= 448) -> the nearest e4m3 value (ties to even), still in fp32: adding and
        subtracting 1.5 * 2^(E + 20) (E: v's exponent, at least e4m3's smallest normal -6) rounds at
        e4m3's spacing 2^(E - 3). The cast to e4m3 after it is exact, so the result does not depend
        on the cast's rounding (the Triton 3.9 interpreter's fp32 -> e4m3 cast drops a mantissa carry:
        -1.97 -> -1.0)."""
        e = tl.maximum((v.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)
        c = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
        return (v + c) - c

    @triton.jit
    def _fp8x_store(q_ptr, s_ptr, rows, row_ok, cols, col_ok, kb, part_q, part_s, K, KB, a, PARTS: tl.constexpr,
                    SHARED: tl.constexpr = False):
        """Split a [BR, 128] fp32 (block kb of each row; zero outside col_ok) and store it: parts
        q [PARTS, R, K] e4m3 (part stride part_q), scales s [PARTS, R, KB] fp32 (stride part_s);
        SHARED: part 1 in part 0's scale (fp8x_act_split_torch's shared_scale)."""
        mask = row_ok[:, None] & col_ok[None, :]
        q_ptrs = q_ptr + rows[:, None] * K + cols[None, :]  # [BR, 128]
        s_ptrs = s_ptr + rows * KB + kb  # [BR]
        s_hi, inv_hi = _pow2_for_e4m3(tl.max(tl.abs(a), axis=1))
        hi = _round_e4m3(a * inv_hi[:, None])
        tl.store(q_ptrs, hi.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptrs, s_hi, mask=row_ok)
        if PARTS == 2:
            r = a - hi * s_hi[:, None]  # exact: hi * s_hi is a rounding of a
            if SHARED:
                s_lo, inv_lo = s_hi, inv_hi
            else:
                s_lo, inv_lo = _pow2_for_e4m3(tl.max(tl.abs(r), axis=1))
            lo = _round_e4m3(r * inv_lo[:, None])
            tl.store(q_ptrs + part_q, lo.to(tl.float8e4nv), mask=mask)
            tl.store(s_ptrs + part_s, s_lo, mask=row_ok)

    @triton.jit
    def _fp8x_split_kernel(a_ptr, stride_a, q_ptr, s_ptr, R, K, KB, part_q, part_s,
                           PARTS: tl.constexpr, BLOCK_R: tl.constexpr, SHARED: tl.constexpr):
        # program = (BLOCK_R rows, one 128-block of inputs)
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
        kb = tl.program_id(1)
        cols = kb * 128 + tl.arange(0, 128)  # [128]
        row_ok = rows < R
        col_ok = cols < K
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        _fp8x_store(q_ptr, s_ptr, rows, row_ok, cols, col_ok, kb, part_q, part_s, K, KB, a, PARTS, SHARED)

    @triton.jit
    def _fp8x_load_a(q_ptr, s_ptr, rows, row_ok, k, k_ok, kb, part_q, part_s, K, KB, PARTS: tl.constexpr):
        """Block kb of split activation rows (rows [BM] int64): (hi, lo [BM, 128] e4m3, s_hi, s_lo [BM])
        (lo, s_lo = hi, s_hi, unused, for PARTS = 1)."""
        mask = row_ok[:, None] & k_ok[None, :]
        q_ptrs = q_ptr + rows[:, None] * K + k[None, :]  # [BM, 128]
        s_ptrs = s_ptr + rows * KB + kb  # [BM]
        hi = tl.load(q_ptrs, mask=mask, other=0.0)
        s_hi = tl.load(s_ptrs, mask=row_ok, other=1.0)  # 1: no 0 / 0 in s_lo / s_hi for absent rows
        if PARTS == 2:
            lo = tl.load(q_ptrs + part_q, mask=mask, other=0.0)
            s_lo = tl.load(s_ptrs + part_s, mask=row_ok, other=1.0)
        else:
            lo = hi
            s_lo = s_hi
        return hi, lo, s_hi, s_lo

    @triton.jit
    def _fp8x_mma(acc, hi, lo, s_hi, s_lo, w, w_scale, PARTS: tl.constexpr, SHARED: tl.constexpr):
        """acc [BM, BN] += (s_hi * hi @ w + s_lo * lo @ w) * w_scale for one 128-wide K block
        (s_lo / s_hi may underflow only where lo is negligible next to hi):
        hi, lo [BM, 128] e4m3, s_hi, s_lo [BM], w [128, BN] e4m3, w_scale a scalar (fp32).
        SHARED (s_lo = s_hi): both dots chain in one accumulator, no rescale pass between them."""
        if PARTS == 2 and SHARED:
            t = tl.dot(lo, w, tl.dot(hi, w))
        elif PARTS == 2:  # one fp32 temporary: lo's dot, rescaled to hi's scale, seeds hi's (fewer registers)
            t = tl.dot(lo, w) * (s_lo / s_hi)[:, None]
            t = tl.dot(hi, w, t)
        else:
            t = tl.dot(hi, w)
        return acc + t * (s_hi * w_scale)[:, None]

    @triton.jit
    def _moe_up_fp8x_kernel(xq_ptr, xs_ptr, x_part_q, x_part_s, w1_ptr, w3_ptr, s1_ptr, s3_ptr,
                            hq_ptr, hs_ptr, h_part_q, h_part_s, rw_ptr, pairs_ptr, slot_ptr,
                            N, D, I, top_k, limit, num_n,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
                            SHARED: tl.constexpr):
        # as _moe_up_kernel; x split (xq [PARTS, T, D], xs [PARTS, T, D/128]); h written split
        # (hq [PARTS, rows, I], hs [PARTS, rows, I/128]); BLOCK_N = 128: this tile is h's block pid_n
        pid_m, pid_n, slot = _sorted_tile(tl.program_id(0), num_n, slot_ptr)
        if slot < 0:  # a padding block of the align step
            return
        offs_m, pair, pair_ok = _block_pairs(pid_m, pairs_ptr, N, BLOCK_M)  # [BM] rows of the sorted order
        tok = tl.where(pair_ok, pair // top_k, 0).to(tl.int64)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate features
        n_ok = offs_n < I
        KB = tl.cdiv(D, 128)
        w_rows = slot.to(tl.int64) * I * D + offs_n.to(tl.int64)[None, :] * D  # [1, BN]
        s_row = (slot.to(tl.int64) * tl.cdiv(I, 128) + pid_n * BLOCK_N // 128) * KB  # this tile's scales
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, KB):
            k = kb * 128 + tl.arange(0, 128)  # [128]
            k_ok = k < D
            hi, lo, s_hi, s_lo = _fp8x_load_a(xq_ptr, xs_ptr, tok, pair_ok, k, k_ok, kb, x_part_q, x_part_s,
                                              D, KB, PARTS)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w1 = tl.load(w1_ptr + w_rows + k[:, None], mask=w_mask, other=0.0)  # [128, BN] = w1[slot, n, k]^T
            acc_g = _fp8x_mma(acc_g, hi, lo, s_hi, s_lo, w1, _e8m0_to_f32(tl.load(s1_ptr + s_row + kb)), PARTS,
                              SHARED)
            w3 = tl.load(w3_ptr + w_rows + k[:, None], mask=w_mask, other=0.0)
            acc_u = _fp8x_mma(acc_u, hi, lo, s_hi, s_lo, w3, _e8m0_to_f32(tl.load(s3_ptr + s_row + kb)), PARTS,
                              SHARED)
        h = tl.where(n_ok[None, :], _swiglu_weighted(acc_g, acc_u, rw_ptr, pair, pair_ok, limit), 0.0)  # [BM, BN]
        _fp8x_store(hq_ptr, hs_ptr, offs_m.to(tl.int64), pair_ok, offs_n, n_ok, pid_n, h_part_q, h_part_s,
                    I, tl.cdiv(I, 128), h, PARTS, SHARED)

    @triton.jit
    def _moe_down_fp8x_kernel(hq_ptr, hs_ptr, h_part_q, h_part_s, w2_ptr, s2_ptr, y_ptr, pairs_ptr, slot_ptr,
                              N, D, I, num_n,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
                              SHARED: tl.constexpr):
        pid_m, pid_n, slot = _sorted_tile(tl.program_id(0), num_n, slot_ptr)
        if slot < 0:  # a padding block of the align step
            return
        offs_m, pair, pair_ok = _block_pairs(pid_m, pairs_ptr, N, BLOCK_M)  # [BM] rows of the sorted order
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden features
        n_ok = offs_n < D
        KB = tl.cdiv(I, 128)
        w_rows = slot.to(tl.int64) * D * I + offs_n.to(tl.int64)[None, :] * I  # [1, BN]
        s_row = (slot.to(tl.int64) * tl.cdiv(D, 128) + pid_n * BLOCK_N // 128) * KB  # BLOCK_N divides 128
        rows = offs_m.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, KB):
            k = kb * 128 + tl.arange(0, 128)  # [128] over I
            k_ok = k < I
            hi, lo, s_hi, s_lo = _fp8x_load_a(hq_ptr, hs_ptr, rows, pair_ok, k, k_ok, kb, h_part_q, h_part_s,
                                              I, KB, PARTS)
            w2 = tl.load(w2_ptr + w_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [128, BN]
            acc = _fp8x_mma(acc, hi, lo, s_hi, s_lo, w2, _e8m0_to_f32(tl.load(s2_ptr + s_row + kb)), PARTS, SHARED)
        y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * D + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=pair_ok[:, None] & n_ok[None, :])


FP8X_SPLIT_ROWS = 32  # rows per _fp8x_split_kernel program


def fp8_dots_supported(dev) -> bool:
    """Whether Triton can run e4m3 dots on dev: the interpreter, or a CUDA device of sm_89+."""
    if _interpreting():
        return True
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)


def fp8x_act_split(a, parts: int = 2, shared_scale: bool = False):
    """a [R, K] (fp16/bf16/fp32, unit stride along K) -> (q [parts, R, K] float8_e4m3fn,
    s [parts, R, ceil(K/128)] fp32): Triton twin of fp8x_act_split_torch (bitwise)."""
    R, K = a.shape
    KB = -(-K // FP8X_BLOCK)
    q = torch.empty((parts, R, K), dtype=torch.float8_e4m3fn, device=a.device)
    s = torch.empty((parts, R, KB), dtype=torch.float32, device=a.device)
    if R and K:
        _fp8x_split_kernel[(-(-R // FP8X_SPLIT_ROWS), KB)](
            a, a.stride(0), q, s, R, K, KB, R * K, R * KB, PARTS=parts, BLOCK_R=FP8X_SPLIT_ROWS,
            SHARED=shared_scale, num_warps=4)
    return q, s


def _moe_fp8x_prefill(x, weights, ids, w1, w3, w2, scales, limit, slot_offset, cfg, y):
    """The fp8 tensor-core prefill path of moe_experts_triton: fills y [T*K, d] fp32 (per-pair outputs).
    cfg: BLOCK_M, up/down (BLOCK_N, ignored BLOCK_K, warps), fp8_act (parts: 1 or 2), optional stages,
    optional fp8_shared (two parts in one scale: their dots chain in one accumulator)."""
    T, D = x.shape
    P_local, I = w1.shape[0], w1.shape[1]
    N = ids.numel()
    parts = int(cfg["fp8_act"])
    BM = cfg["BLOCK_M"]
    BN, _, warps = cfg["up"]
    BN2, _, warps2 = cfg["down"]
    if parts not in (1, 2) or BN != FP8X_BLOCK or FP8X_BLOCK % BN2:
        raise ValueError(f"fp8 prefill path: fp8_act must be 1 or 2, up BLOCK_N {FP8X_BLOCK}, down BLOCK_N "
                         f"dividing {FP8X_BLOCK}; got {parts}, {BN}, {BN2}")
    s1, s3, s2 = scales
    shared = bool(cfg.get("fp8_shared", False)) and parts == 2
    xq, xs = fp8x_act_split(x, parts, shared)  # [parts, T, d], [parts, T, d/128]
    sorted_pairs, block_slot = _moe_align(ids, slot_offset, P_local, BM)
    R = block_slot.shape[0] * BM  # rows of the sorted order
    IB = -(-I // FP8X_BLOCK)
    hq = torch.empty((parts, R, I), dtype=torch.float8_e4m3fn, device=x.device)  # h split, sorted rows
    hs = torch.empty((parts, R, IB), dtype=torch.float32, device=x.device)
    num_n, num_n2 = -(-I // BN), -(-D // BN2)
    stages = cfg.get("stages")
    _moe_up_fp8x_kernel[(block_slot.shape[0] * num_n,)](
        xq, xs, T * D, T * xs.shape[2], w1, w3, s1, s3, hq, hs, R * I, R * IB, weights, sorted_pairs, block_slot,
        N, D, I, ids.shape[1], limit, num_n, BLOCK_M=BM, BLOCK_N=BN, PARTS=parts, SHARED=shared, num_warps=warps,
        num_stages=stages or _stages(BM, BN, FP8X_BLOCK, 2, parts, 1))
    _moe_down_fp8x_kernel[(block_slot.shape[0] * num_n2,)](
        hq, hs, R * I, R * IB, w2, s2, y, sorted_pairs, block_slot, N, D, I, num_n2,
        BLOCK_M=BM, BLOCK_N=BN2, PARTS=parts, SHARED=shared, num_warps=warps2,
        num_stages=stages or _stages(BM, BN2, FP8X_BLOCK, 1, parts, 1))


# ---------------------------------------------------------------------------------------------
# mHC (manifold-constrained hyper-connections): Triton
# ---------------------------------------------------------------------------------------------
# The torch twins are dsv4_mini.hc_pre (with dsv4_mini.sinkhorn) and dsv4_mini.hc_post: the
# model's readable definition and the CPU path. Called twice per layer on [T, n, n] mixing
# matrices, they are ~100 (hc_pre, ~80 of them the Sinkhorn loop) and ~5 (hc_post) tiny kernels
# each; here hc_pre is the caller's cuBLAS GEMM plus one kernel and hc_post is one kernel.
# n (streams, hc_mult) is padded to NP = next power of two; the padding is masked to 0.
if triton is not None:

    @triton.jit
    def _hc_pre_kernel(h_ptr, mixes_ptr, scale_ptr, base_ptr, x_ptr, post_ptr, comb_ptr,
                       n, D, iters, hc_eps, norm_eps,
                       NP: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per token: the row's RMS factor needs all n*d values before anything else
        t = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, NP)  # [NP] stream index (rows of comb: j, columns: k)
        s_ok = s < n
        ss_ok = s_ok[:, None] & s_ok[None, :]  # [NP, NP]
        cols = tl.arange(0, BLOCK_D)  # [BD]
        h_row = h_ptr + t * n * D + s.to(tl.int64)[:, None] * D  # [NP, 1] stream starts
        # pass 1: sum of squares of the whole row in fp32 (torch: h.float().square().mean())
        sq = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = d0 + cols < D
            v = tl.load(h_row + d0 + cols[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            sq += v * v
        rs = tl.rsqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / (n * D) + norm_eps)
        # mixes [(2+n)*n] = pre [n] | post [n] | comb [n, n]; m * rs * scale + base like torch
        m_row = mixes_ptr + t * (2 + n) * n
        cc = s[:, None] * n + s[None, :]  # [NP, NP] offset of comb[j, k]
        m_pre = tl.load(m_row + s, mask=s_ok, other=0.0)
        m_post = tl.load(m_row + n + s, mask=s_ok, other=0.0)
        m_comb = tl.load(m_row + 2 * n + cc, mask=ss_ok, other=0.0)
        b_pre = tl.load(base_ptr + s, mask=s_ok, other=0.0)
        b_post = tl.load(base_ptr + n + s, mask=s_ok, other=0.0)
        b_comb = tl.load(base_ptr + 2 * n + cc, mask=ss_ok, other=0.0)
        # scale has exactly 3 entries (checked by the wrapper): scalar loads
        pre = tl.sigmoid(m_pre * rs * tl.load(scale_ptr) + b_pre) + hc_eps  # [NP]
        post = 2.0 * tl.sigmoid(m_post * rs * tl.load(scale_ptr + 1) + b_post)  # [NP]
        comb = m_comb * rs * tl.load(scale_ptr + 2) + b_comb  # [NP, NP]
        # Sinkhorn (dsv4_mini.sinkhorn) in registers: softmax over k, + eps, then columns once
        # and (rows, columns) iters-1 times, each x / (sum + eps). Padded rows/columns are 0 from
        # here on, so every sum sees only the n x n block.
        comb = tl.where(s_ok[None, :], comb, float("-inf"))
        e = tl.exp(comb - tl.max(comb, axis=1)[:, None])
        comb = e / tl.sum(e, axis=1)[:, None]
        comb = tl.where(ss_ok, comb + hc_eps, 0.0)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
        for _ in range(iters - 1):
            comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)
            comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
        tl.store(post_ptr + t * n + s, post, mask=s_ok)
        tl.store(comb_ptr + t * n * n + cc, comb, mask=ss_ok)
        # pass 2: x = sum_k pre_k * h_k (fp32; the row is L1/L2-hot from pass 1)
        pre = tl.where(s_ok, pre, 0.0)
        for d0 in range(0, D, BLOCK_D):
            d_ok = d0 + cols < D
            v = tl.load(h_row + d0 + cols[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            xs = tl.sum(v * pre[:, None], axis=0)  # [BD]
            tl.store(x_ptr + t * D + d0 + cols, xs.to(x_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _hc_post_kernel(x_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, n, D,
                        NP: tl.constexpr, BLOCK_D: tl.constexpr):
        # program = (token, d chunk): every output stream k of that chunk at once, so each
        # residual stream j is read once
        t = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, NP)  # [NP] output streams
        k_ok = k < n
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
        d_ok = cols < D
        acc = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
        for j in range(n):  # out_k += comb[j, k] * residual_j: row j of comb, used transposed
            c_j = tl.load(comb_ptr + (t * n + j) * n + k, mask=k_ok, other=0.0)  # [NP]
            r_j = tl.load(res_ptr + (t * n + j) * D + cols, mask=d_ok, other=0.0).to(tl.float32)
            acc += c_j[:, None] * r_j[None, :]
        # then + post_k * x, like torch's einsum(...).addcmul_(post, x)
        xv = tl.load(x_ptr + t * D + cols, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
        p = tl.load(post_ptr + t * n + k, mask=k_ok, other=0.0)  # [NP]
        acc += p[:, None] * xv[None, :]
        out_ptrs = out_ptr + (t * n + k.to(tl.int64))[:, None] * D + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


HC_PRE_TILE = 2048  # elements of an [NP, BLOCK_D] tile in _hc_pre_kernel (d=4096, n=4: 8 chunks)
HC_POST_BLOCK_D = 256  # d chunk per _hc_post program: d=4096 -> 16 programs per token (decode);
                       # not tuned on a GPU yet


def _f32c(t):
    """fp32 and contiguous, without a copy when it already is."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def hc_pre_triton(h, mixes, scale, base, iters, hc_eps, norm_eps, *, block_d=None):
    """Fused mHC collapse after the caller's GEMM (Triton twin of dsv4_mini.hc_pre, flattened).

    h [T, n, d] (bf16/fp16/fp32), mixes [T, (2+n)*n] fp32 = F.linear(h.flatten(-2).float(), fn)
    (not yet scaled by the RMS factor), scale [3] fp32, base [(2+n)*n] fp32
    -> (x [T, d] h.dtype, post [T, n] fp32, comb [T, n, n] fp32). One launch, no sync.
    block_d: override the d chunk (tests: several chunks at a small d).
    """
    T, n, d = h.shape
    if mixes.shape != (T, (2 + n) * n) or base.numel() != (2 + n) * n or scale.numel() != 3:
        raise ValueError(f"hc_pre_triton: h {tuple(h.shape)} needs mixes [T, {(2 + n) * n}], "
                         f"base [{(2 + n) * n}], scale [3]; got {tuple(mixes.shape)}, "
                         f"{tuple(base.shape)}, {tuple(scale.shape)}")
    dev = h.device
    x = torch.empty((T, d), dtype=h.dtype, device=dev)  # [T, d]
    post = torch.empty((T, n), dtype=torch.float32, device=dev)  # [T, n]
    comb = torch.empty((T, n, n), dtype=torch.float32, device=dev)  # [T, n, n]
    if T == 0 or d == 0:
        return x, post, comb
    if not h.is_contiguous():
        h = h.contiguous()
    NP = _next_pow2(n)
    BLOCK_D = block_d or max(16, min(_next_pow2(d), HC_PRE_TILE // NP))
    _hc_pre_kernel[(T,)](
        h, _f32c(mixes), _f32c(scale), _f32c(base), x, post, comb,
        n, d, int(iters), float(hc_eps), float(norm_eps), NP=NP, BLOCK_D=BLOCK_D, num_warps=4)
    return x, post, comb


def hc_post_triton(x, residual, post, comb, *, block_d=None):
    """Fused mHC expand (Triton twin of dsv4_mini.hc_post, flattened).

    x [T, d], residual [T, n, d], post [T, n] fp32, comb [T, n, n] fp32
    -> out [T, n, d] residual.dtype: out[t, k] = post[t, k] * x[t] + sum_j comb[t, j, k] * residual[t, j]
    (fp32 math). One launch, no sync. block_d: override the d chunk (tests).
    """
    T, n, d = residual.shape
    if x.shape != (T, d) or post.shape != (T, n) or comb.shape != (T, n, n):
        raise ValueError(f"hc_post_triton: residual {tuple(residual.shape)} needs x [T, d], post "
                         f"[T, n], comb [T, n, n]; got {tuple(x.shape)}, {tuple(post.shape)}, "
                         f"{tuple(comb.shape)}")
    out = torch.empty((T, n, d), dtype=residual.dtype, device=residual.device)  # [T, n, d]
    if T == 0 or d == 0:
        return out
    if not residual.is_contiguous():
        residual = residual.contiguous()
    if not x.is_contiguous():
        x = x.contiguous()
    BLOCK_D = block_d or max(16, min(_next_pow2(d), HC_POST_BLOCK_D))
    _hc_post_kernel[(T, -(-d // BLOCK_D))](
        x, residual, _f32c(post), _f32c(comb), out, n, d,
        NP=_next_pow2(n), BLOCK_D=BLOCK_D, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# GPU clock: time a stretch of device work with no host sync, also inside a CUDA graph
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gpu_clock_kernel(t0_ptr, total_ptr, STOP: tl.constexpr):
        """One program: start stores the GPU's global nanosecond clock in t0; stop adds now - t0 to
        total. Stream-ordered like any kernel, so it brackets the kernels launched between the two."""
        now = tl.extra.cuda.globaltimer()
        if STOP:
            tl.store(total_ptr, tl.load(total_ptr) + (now - tl.load(t0_ptr)))
        else:
            tl.store(t0_ptr, now)


def gpu_clock(t0, total, stop: bool) -> None:
    """t0, total: int64 [1] CUDA tensors (fixed addresses: a captured graph re-reads them on replay).
    start (stop=False): t0 = now; stop: total += now - t0 (nanoseconds, the GPU's %globaltimer)."""
    _gpu_clock_kernel[(1,)](t0, total, STOP=stop, num_warps=1)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def _use_triton(tensor) -> bool:
    """Triton for CUDA tensors, torch otherwise; env DSV4_KERNELS=torch|triton forces one."""
    mode = os.environ.get("DSV4_KERNELS", "").strip().lower()
    if mode == "torch":
        return False
    if mode == "triton":
        if triton is None:
            raise RuntimeError("DSV4_KERNELS=triton but triton is not installed")
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"DSV4_KERNELS must be torch, triton or auto, got {mode!r}")
    return triton is not None and tensor.is_cuda


def hash_topk(router_logits, input_ids, tid2eid, routed_scaling_factor,
              log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Hash routing (see hash_topk_torch): -> (weights [T, K] fp32, ids [T, K] int32)."""
    fn = hash_topk_triton if _use_triton(router_logits) else hash_topk_torch
    return fn(router_logits, input_ids, tid2eid, routed_scaling_factor,
              log2phy, logcnt, load, num_valid_tokens)


def score_topk(router_logits, bias, top_k, routed_scaling_factor,
               log2phy=None, logcnt=None, load=None, num_valid_tokens=None):
    """Score routing (see score_topk_torch): -> (weights [T, K] fp32, ids [T, K] int32)."""
    fn = score_topk_triton if _use_triton(router_logits) else score_topk_torch
    return fn(router_logits, bias, top_k, routed_scaling_factor,
              log2phy, logcnt, load, num_valid_tokens)


def moe_experts(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0, scales=None):
    """Routed experts (see moe_experts_torch): -> [T, d] fp32. The format follows w1.dtype
    (expert_format); quantised experts take scales=(s1, s3, s2)."""
    fn = moe_experts_triton if _use_triton(x) else moe_experts_torch
    return fn(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset, scales)
