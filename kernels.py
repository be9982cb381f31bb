"""Routing and expert kernels for dsv4-mini: each Triton kernel has a plain-torch twin.

The torch twins are the readable definition of the semantics and the CPU production path; the
Triton kernels are the CUDA path and must match them (ids exactly, floats to fp32 rounding).
Public functions dispatch: Triton for CUDA tensors, torch otherwise; env `DSV4_KERNELS=torch|triton`
forces one (Triton on CPU tensors needs `TRITON_INTERPRET=1` set before triton is imported).

Shapes: T tokens, E logical experts, K top-k, V vocab, P physical slots, X max replicas per expert,
d hidden, I expert intermediate size, P_local slots held by this rank.
"""
import os

import torch
import torch.nn.functional as F

try:  # the torch twins work without triton (e.g. a CPU-only install)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = [
    "replica_index", "hash_topk", "score_topk", "moe_experts",
    "hash_topk_torch", "hash_topk_triton", "score_topk_torch", "score_topk_triton",
    "moe_experts_torch", "moe_experts_triton",
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


def _map_and_count(experts, log2phy, logcnt, load, num_valid_tokens):
    """Logical experts [T, K] -> physical ids [T, K] int32 (replica by hash); count valid tokens."""
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
        nv = T if num_valid_tokens is None else max(0, min(int(num_valid_tokens), T))
        counted = ids[:nv].flatten()  # [nv*K]; rows >= nv are padding
        load.index_add_(0, counted, torch.ones_like(counted, dtype=load.dtype))
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


def moe_experts_torch(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0):
    """Routed experts over physical slots: sum_k weights[t,k] * expert(ids[t,k])(x[t]).

    x [T, d], weights [T, K] fp32, ids [T, K] int32, w1/w3 [P_local, I, d], w2 [P_local, d, I]
    -> [T, d] fp32. ids outside [slot_offset, slot_offset + P_local) contribute nothing (they live
    on another expert-parallel rank). Loops only over slots that have tokens.
    """
    T, K = ids.shape
    P_local = w1.shape[0]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # [T, d]
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
        tok = pairs // K  # [n]
        xs = x[tok].to(w1.dtype)  # [n, d]
        g = (xs @ w1[slot].T).float()  # [n, I]
        u = (xs @ w3[slot].T).float()  # [n, I]
        h = _swiglu(g, u, flat_w[pairs].unsqueeze(1), swiglu_limit)  # [n, I]
        out.index_add_(0, tok, (h.to(w2.dtype) @ w2[slot].T).float())  # [n, d]
    return out


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
                      log2phy_ptr, X, logcnt_ptr, load_ptr, weights_ptr, ids_ptr,
                      T, E, num_valid, scale,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, HASH: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_MAP: tl.constexpr, COUNT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        row_ok = rows < T
        kcol = tl.arange(0, KP)  # [KP]
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
            picked = _sqrtsoftplus_tl(tl.load(row_base + expert, mask=ok, other=0.0))  # [BT, KP]
        else:
            ecol = tl.arange(0, BLOCK_E)  # [BE]
            e_ok = row_ok[:, None] & (ecol[None, :] < E)  # [BT, BE]
            choice = _sqrtsoftplus_fast(tl.load(row_base + ecol[None, :], mask=e_ok, other=0.0))
            if HAS_BIAS:
                choice += tl.load(bias_ptr + ecol, mask=ecol < E, other=0.0)[None, :]
            choice = tl.where(e_ok, choice, float("-inf"))  # [BT, BE]
            expert = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
            for j in tl.static_range(K):  # K rounds of argmax; ties -> lowest expert id
                e_j = tl.argmax(choice, axis=1, tie_break_left=True)  # [BT]
                choice = tl.where(ecol[None, :] == e_j[:, None], float("-inf"), choice)
                expert = tl.where(kcol[None, :] == j, e_j[:, None], expert)
            ok = k_ok & (expert < E)
            # weights from the K picked logits (L1/L2-hot), with the accurate score
            picked = _sqrtsoftplus_tl(tl.load(row_base + expert, mask=ok, other=0.0))  # [BT, KP]
        picked = tl.where(ok, picked, 0.0)
        total = tl.sum(picked, axis=1)  # [BT]
        total = tl.where(tl.max(ok.to(tl.int32), axis=1) > 0, total, 1.0)  # no 0/0 on masked rows
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
            counted = ok & (rows < num_valid)[:, None] & (phys >= 0)
            tl.atomic_add(load_ptr + phys, tl.full([BLOCK_T, KP], 1, tl.int32), mask=counted,
                          sem="relaxed")


def _route_triton(router_logits, K, routed_scaling_factor, log2phy, logcnt, load,
                  num_valid_tokens, input_ids=None, tid2eid=None, bias=None):
    """Launch _route_kernel: hash mode when tid2eid is given, else top-K of s + bias."""
    _check_maps(log2phy, logcnt)
    T, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(T, K, dtype=torch.float32, device=dev)  # [T, K]
    ids = torch.empty(T, K, dtype=torch.int32, device=dev)  # [T, K]
    if T == 0 or K == 0:
        return weights, ids
    logits = router_logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    hash_mode = tid2eid is not None
    dummy = ids  # stands in for pointers a variant does not read
    KP = _next_pow2(K)
    BLOCK_E = _next_pow2(E)
    # hash reads K scores per row; score holds a [BLOCK_T, BLOCK_E] tile (~4K elements) per program
    BLOCK_T = 128 if hash_mode else max(1, min(128, 4096 // BLOCK_E))
    nv = T if num_valid_tokens is None else max(0, min(int(num_valid_tokens), T))
    grid = (triton.cdiv(T, BLOCK_T),)
    _route_kernel[grid](
        logits, logits.stride(0),
        input_ids.contiguous() if hash_mode else dummy,
        tid2eid.contiguous() if hash_mode else dummy,
        tid2eid.shape[0] if hash_mode else 0,
        bias.float().contiguous() if bias is not None else dummy,
        log2phy.contiguous() if log2phy is not None else dummy,
        log2phy.shape[1] if log2phy is not None else 1,
        logcnt.contiguous() if logcnt is not None else dummy,
        load if load is not None else dummy,
        weights, ids, T, E, nv, float(routed_scaling_factor),
        K=K, KP=KP, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, HASH=hash_mode,
        HAS_BIAS=bias is not None, HAS_MAP=log2phy is not None, COUNT=load is not None,
        num_warps=4)
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
# 1. align (torch, no host sync): sort the T*K pairs by local slot and pad every slot's run to a
#    multiple of BLOCK_M, so each block of BLOCK_M rows belongs to one slot;
# 2. up kernel: per (block, I-tile) h = swiglu(x @ w1[s]^T, x @ w3[s]^T) * weight, weights read
#    once per slot-block; 3. down kernel: y[pair] = h @ w2[s]^T (fp32);
# 4. sum kernel: out[t] = sum over k of y[t, k] for local pairs (deterministic, no atomics).
def _moe_align(ids, slot_offset: int, P_local: int, BLOCK_M: int):
    """ids [T, K] -> (sorted_pairs [num_blocks*BLOCK_M] int32, block_slot [num_blocks] int32).

    sorted_pairs holds flat pair indices t*K + k grouped by slot (N = T*K marks padding);
    block_slot[b] is the slot of rows b*BLOCK_M.. (or -1: block unused). num_blocks is the upper
    bound cdiv(N, BLOCK_M) + min(N, P_local), so nothing here waits on the device.
    """
    N = ids.numel()
    dev = ids.device
    local = ids.flatten().long() - slot_offset  # [N]
    local = torch.where((local >= 0) & (local < P_local), local, P_local)  # P_local = not here
    counts = torch.zeros(P_local + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, local, torch.ones_like(local))  # [P_local + 1]
    order = torch.argsort(local, stable=True)  # [N] pairs grouped by slot
    slot_of = local[order]  # [N]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [P_local + 1]
    padded[P_local] = 0
    pad_end = torch.cumsum(padded, 0)  # [P_local + 1]
    num_blocks = triton.cdiv(N, BLOCK_M) + min(N, P_local)
    size = num_blocks * BLOCK_M
    rank = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[slot_of]  # [N]
    dest = torch.where(slot_of < P_local, (pad_end - padded)[slot_of] + rank, size)  # [N]
    sorted_pairs = torch.full((size + 1,), N, dtype=torch.int32, device=dev)  # +1: dump row
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=dev) * BLOCK_M  # [num_blocks]
    block_slot = torch.searchsorted(pad_end[:P_local], starts, right=True)  # [num_blocks]
    block_slot = torch.where(block_slot < P_local, block_slot, -1).to(torch.int32)
    return sorted_pairs[:size], block_slot


if triton is not None:

    @triton.jit
    def _moe_up_kernel(x_ptr, stride_xt, w1_ptr, w3_ptr, h_ptr, rw_ptr, pairs_ptr, slot_ptr,
                       N, D, I, top_k, limit, num_n,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        # I-tiles of one block are adjacent in launch order: x rows are gathered once into L2
        pid = tl.program_id(0)
        pid_m = pid // num_n
        pid_n = pid % num_n
        slot = tl.load(slot_ptr + pid_m)
        if slot < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of the sorted order
        pair = tl.load(pairs_ptr + offs_m)  # [BM]
        pair_ok = pair < N
        tok = tl.where(pair_ok, pair // top_k, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate features
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        a_ptrs = x_ptr + tok.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
        w_off = slot.to(tl.int64) * I * D + offs_n.to(tl.int64)[None, :] * D + offs_k[:, None]
        b1_ptrs = w1_ptr + w_off  # [BK, BN] = w1[slot, n, k]^T
        b3_ptrs = w3_ptr + w_off
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        rw = tl.load(rw_ptr + pair, mask=pair_ok, other=0.0)  # [BM] routing weight, before w2
        h = g / (1.0 + tl.exp(-g)) * u * rw[:, None]  # silu(g) * u * w, fp32
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _moe_down_kernel(h_ptr, w2_ptr, y_ptr, pairs_ptr, slot_ptr, N, D, I, num_n,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        pid_m = pid // num_n
        pid_n = pid % num_n
        slot = tl.load(slot_ptr + pid_m)
        if slot < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pair = tl.load(pairs_ptr + offs_m)  # [BM]
        pair_ok = pair < N
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden features
        n_ok = offs_n < D
        offs_k = tl.arange(0, BLOCK_K)  # [BK] over I
        a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_k[None, :]  # [BM, BK]
        b_ptrs = (w2_ptr + slot.to(tl.int64) * D * I + offs_n.to(tl.int64)[None, :] * I
                  + offs_k[:, None])  # [BK, BN] = w2[slot, n, k]^T
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


def _moe_config(N: int, P_local: int, elem_size: int):
    """Block sizes by pairs per slot: decode (few rows per slot) is a weight stream, so a small
    BLOCK_M keeps padding cheap; prefill uses 128-row tiles for the tensor cores."""
    per_slot = N / max(P_local, 1)
    if per_slot <= 16:
        cfg = dict(BLOCK_M=16, up=(64, 128, 4), down=(64, 128, 4))  # (BLOCK_N, BLOCK_K, warps)
    elif per_slot <= 32:
        cfg = dict(BLOCK_M=32, up=(64, 128, 4), down=(64, 128, 4))
    elif per_slot <= 64:
        cfg = dict(BLOCK_M=64, up=(64, 64, 4), down=(128, 64, 4))
    else:
        cfg = dict(BLOCK_M=128, up=(64, 64, 8), down=(128, 64, 8))
    cfg["elem_size"] = elem_size
    return cfg


def _stages(BLOCK_M, BLOCK_N, BLOCK_K, mats, elem_size):
    """Pipeline depth that fits ~160 KB of shared memory (H200 has 227 KB per block)."""
    per_stage = (BLOCK_M * BLOCK_K + mats * BLOCK_K * BLOCK_N) * elem_size
    return max(2, min(4, 160_000 // per_stage))


def moe_experts_triton(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0, *, config=None):
    """Triton twin of moe_experts_torch (same signature and results; fp32 out).

    config: optional dict like _moe_config's result, to override block sizes (benchmarks).
    """
    T, D = x.shape
    K = ids.shape[1]
    P_local, I, _ = w1.shape
    out = torch.empty(T, D, dtype=torch.float32, device=x.device)  # [T, d]
    if T == 0:
        return out
    if K == 0 or P_local == 0:
        return out.zero_()
    w1, w3, w2 = w1.contiguous(), w3.contiguous(), w2.contiguous()  # no-ops for stacked weights
    x = x.to(w1.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    N = T * K
    cfg = config or _moe_config(N, P_local, w1.element_size())
    BM = cfg["BLOCK_M"]
    precision = "ieee" if w1.dtype == torch.float32 else "tf32"  # exact fp32; ignored for 16-bit
    sorted_pairs, block_slot = _moe_align(ids, slot_offset, P_local, BM)
    num_blocks = block_slot.numel()
    rw = weights.float().contiguous()  # [T, K] routing weights
    ids_c = ids.to(torch.int32).contiguous()
    h = torch.empty(num_blocks * BM, I, dtype=w1.dtype, device=x.device)  # [rows, I] sorted order
    y = torch.empty(N, D, dtype=torch.float32, device=x.device)  # [T*K, d] per-pair outputs
    BN, BK, warps = cfg["up"]
    num_n = triton.cdiv(I, BN)
    _moe_up_kernel[(num_blocks * num_n,)](
        x, x.stride(0), w1, w3, h, rw, sorted_pairs, block_slot, N, D, I, K,
        float(swiglu_limit), num_n, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, EVEN_K=D % BK == 0,
        PRECISION=precision, num_warps=warps,
        num_stages=_stages(BM, BN, BK, 2, w1.element_size()))
    BN, BK, warps = cfg["down"]
    num_n = triton.cdiv(D, BN)
    _moe_down_kernel[(num_blocks * num_n,)](
        h, w2, y, sorted_pairs, block_slot, N, D, I, num_n,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, EVEN_K=I % BK == 0, PRECISION=precision,
        num_warps=warps, num_stages=_stages(BM, BN, BK, 1, w1.element_size()))
    SUM_N = min(1024, _next_pow2(D))
    _moe_sum_kernel[(T, triton.cdiv(D, SUM_N))](
        y, ids_c, out, D, K, slot_offset, slot_offset + P_local, BLOCK_N=SUM_N, num_warps=4)
    return out


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


def moe_experts(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset=0):
    """Routed experts (see moe_experts_torch): -> [T, d] fp32."""
    fn = moe_experts_triton if _use_triton(x) else moe_experts_torch
    return fn(x, weights, ids, w1, w3, w2, swiglu_limit, slot_offset)
