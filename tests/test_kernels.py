"""Triton kernels (under TRITON_INTERPRET=1, CPU tensors) against their torch twins, and the twins
against plain references. Tiny shapes: the interpreter runs every program in numpy."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before any module imports triton

import pytest
import torch

import dsv4_mini
import weights
import eplb
import kernels

M32 = 0xFFFFFFFF


def test_triton_kernels_are_interpreted():
    # if kernels.py was imported before TRITON_INTERPRET=1, every Triton test below would try to
    # compile for a GPU: fail loudly instead
    assert type(kernels._route_kernel).__name__ == "InterpretedFunction"


# ------------------------------------------------------------------------------------ helpers
def make_maps(E, max_count, gen):
    """log2phy [E, X] int32 (-1 padded), logcnt [E] int32, P: replicas spread over fresh slots."""
    counts = torch.randint(1, max_count + 1, (E,), generator=gen)
    counts[0] = max_count  # at least one expert at the full count
    return maps_from_counts(counts, max_count)


def maps_from_counts(counts, width):
    """Slots 0..E-1 hold experts 0..E-1, then each expert's extra replicas: (log2phy, logcnt, P)."""
    E = counts.numel()
    phy2log = torch.cat([torch.arange(E), torch.arange(E).repeat_interleave(counts - 1)])
    loc = eplb.ExpertLocation.from_phy2log(phy2log[None], E, num_ranks=1, width=width)
    return loc.log2phy[0], loc.logcnt[0], phy2log.numel()


def py_replica(t, k, c):
    """The hash in plain Python integers (the spec the tensor versions must reproduce)."""
    h = ((t * 0x9E3779B1) & M32) ^ k
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h % c


def ref_scores(logits):
    return torch.nn.functional.softplus(logits.double()).sqrt()  # [T, E] float64


# ------------------------------------------------------------------------------------ replica hash
def test_replica_index_matches_python_hash():
    t = torch.tensor([0, 1, 2, 77, 4095, 65535, 1 << 20, (1 << 31) - 1])
    for k in range(8):
        for c in (1, 2, 3, 4, 7, 8):
            got = kernels.replica_index(t, torch.tensor(k), torch.tensor(c)).tolist()
            assert got == [py_replica(int(ti), k, c) for ti in t]


@pytest.mark.parametrize("K", [6, 8])
@pytest.mark.parametrize("c", [2, 3, 4, 8])
def test_replica_choice_is_balanced(c, K):
    # every token picks experts 0..K-1 with expert j always at slot k = j: the worst case for
    # `flat_pos % c` (one replica per expert); a well-mixed hash splits each expert 1/c per replica
    T, E = 16384, K
    log2phy = torch.tensor([[e + E * r for r in range(c)] for e in range(E)], dtype=torch.int32)
    logcnt = torch.full((E,), c, dtype=torch.int32)
    tid2eid = torch.arange(K, dtype=torch.int32).unsqueeze(0)  # [V=1, K]
    logits = torch.randn(T, E)
    input_ids = torch.zeros(T, dtype=torch.long)
    load = torch.zeros(E * c, dtype=torch.int32)
    _, ids = kernels.hash_topk_torch(logits, input_ids, tid2eid, 1.0, log2phy, logcnt, load)
    per_replica = load.view(c, E).T.double()  # [E, c] slot e + E*r
    assert torch.all((per_replica - T / c).abs() <= 0.1 * T / c), per_replica
    if c == 4 and K == 6:  # the Triton kernel chooses the same replicas (same load, same ids)
        load_tl = torch.zeros_like(load)
        _, ids_tl = kernels.hash_topk_triton(logits, input_ids, tid2eid, 1.0, log2phy, logcnt,
                                             load_tl)
        assert torch.equal(ids_tl, ids) and torch.equal(load_tl, load)


# ------------------------------------------------------------------------------------ routing
ROUTING_CASES = [  # T, E, K, maps (max replicas), num_valid, ties
    (0, 8, 2, 0, None, False),
    (1, 8, 1, 0, None, False),
    (1, 5, 5, 2, 0, False),
    (37, 13, 3, 4, 30, False),
    (64, 20, 6, 3, 64, True),
    (130, 33, 4, 4, 100, True),
]


def routing_inputs(T, E, K, maps, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties in logits and bias
        logits = torch.randint(-2, 3, (T, E), generator=gen).float()
        bias = torch.randint(0, 2, (E,), generator=gen).float() * 0.5
    else:
        logits = torch.randn(T, E, generator=gen) * 3
        bias = torch.randn(E, generator=gen)
    log2phy = logcnt = None
    P = E
    if maps:
        log2phy, logcnt, P = make_maps(E, maps, gen)
    load = torch.randint(0, 5, (P,), generator=gen, dtype=torch.int32)  # added to, not overwritten
    return logits, bias, log2phy, logcnt, load


def check_routing(out_a, out_b, load_a, load_b):
    (wa, ia), (wb, ib) = out_a, out_b
    assert ia.dtype == ib.dtype == torch.int32 and wa.dtype == wb.dtype == torch.float32
    assert torch.equal(ia, ib)
    torch.testing.assert_close(wa, wb, rtol=2e-6, atol=1e-6)
    assert torch.equal(load_a, load_b)


def expected_load(ids, nv, load0):
    load = load0.clone().long()
    for p in ids[:nv].flatten().tolist():
        load[p] += 1
    return load.int()


@pytest.mark.parametrize("T,E,K,maps,nv,ties", ROUTING_CASES)
def test_hash_topk_triton_matches_torch(T, E, K, maps, nv, ties):
    logits, _, log2phy, logcnt, load = routing_inputs(T, E, K, maps, ties, seed=T + E)
    V = 11
    gen = torch.Generator().manual_seed(1)
    tid2eid = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(V)]).int()
    input_ids = torch.randint(0, V, (T,), generator=gen)
    load_a, load_b = load.clone(), load.clone()
    a = kernels.hash_topk_torch(logits, input_ids, tid2eid, 1.5, log2phy, logcnt, load_a, nv)
    b = kernels.hash_topk_triton(logits, input_ids, tid2eid, 1.5, log2phy, logcnt, load_b, nv)
    check_routing(a, b, load_a, load_b)
    # the twin against the definition: experts from the table, sum-normalized scaled scores
    experts = tid2eid[input_ids].long()
    s = ref_scores(logits).gather(1, experts)
    torch.testing.assert_close(a[0].double(), s / s.sum(1, keepdim=True) * 1.5)
    if log2phy is None:
        assert torch.equal(a[1].long(), experts)
    else:
        assert torch.equal(torch.tensor([[int(log2phy[e, py_replica(t, k, int(logcnt[e]))])
                                          for k, e in enumerate(row)]
                                         for t, row in enumerate(experts.tolist())]).reshape(T, K),
                           a[1].long())
    assert torch.equal(load_a, expected_load(a[1], T if nv is None else nv, load))


@pytest.mark.parametrize("T,E,K,maps,nv,ties", ROUTING_CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_score_topk_triton_matches_torch(T, E, K, maps, nv, ties, use_bias):
    logits, bias, log2phy, logcnt, load = routing_inputs(T, E, K, maps, ties, seed=T * E + K)
    bias = bias if use_bias else None
    load_a, load_b = load.clone(), load.clone()
    a = kernels.score_topk_torch(logits, bias, K, 2.5, log2phy, logcnt, load_a, nv)
    b = kernels.score_topk_triton(logits, bias, K, 2.5, log2phy, logcnt, load_b, nv)
    check_routing(a, b, load_a, load_b)
    # the twin against the definition: top-k of s + bias, ties to the lower expert id
    s = ref_scores(logits)
    choice = s + (bias.double() if bias is not None else 0)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(choice[t, e]), e))[:K]
        picked = s[t, order]
        torch.testing.assert_close(a[0][t].double(), picked / picked.sum() * 2.5)
        if log2phy is None:
            assert a[1][t].tolist() == order
    assert torch.equal(load_a, expected_load(a[1], T if nv is None else nv, load))


@pytest.mark.parametrize("cfg", [dict(score_hist=True, score_waves=1),
                                 dict(score_key64=True, score_elems=64),
                                 dict(hash_rows=16, waves=1)])
def test_routing_launch_variants(monkeypatch, cfg):
    # the ROUTE_CFG knobs the benchmark sweeps (histogram vs atomics, int64 keys vs argmax,
    # persistent loop over many blocks) all give the twin's results
    monkeypatch.setattr(kernels, "ROUTE_CFG", {**kernels.ROUTE_CFG, **cfg})
    T, E, K = 130, 33, 4
    logits, bias, log2phy, logcnt, load = routing_inputs(T, E, K, 4, True, seed=5)
    la, lb = load.clone(), load.clone()
    a = kernels.score_topk_torch(logits, bias, K, 2.5, log2phy, logcnt, la, 100)
    b = kernels.score_topk_triton(logits, bias, K, 2.5, log2phy, logcnt, lb, 100)
    check_routing(a, b, la, lb)
    tid2eid = torch.stack([torch.randperm(E)[:K] for _ in range(7)]).int()
    input_ids = torch.randint(0, 7, (T,))
    la, lb = load.clone(), load.clone()
    a = kernels.hash_topk_torch(logits, input_ids, tid2eid, 1.5, log2phy, logcnt, la, 100)
    b = kernels.hash_topk_triton(logits, input_ids, tid2eid, 1.5, log2phy, logcnt, lb, 100)
    check_routing(a, b, la, lb)


@pytest.mark.parametrize("nv", [0, 1, 37, 130])
def test_row_count_as_a_tensor_counts_like_the_int(nv):
    # under a CUDA graph the number of real (unpadded) rows is data: a [1] int32 tensor the kernels
    # read at run time; it must count exactly what the same Python int counts, on both kernels
    T, E, K = 130, 33, 4
    logits, bias, log2phy, logcnt, load = routing_inputs(T, E, K, 4, True, seed=11)
    tid2eid = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(i))[:K] for i in range(7)]).int()
    input_ids = torch.randint(0, 7, (T,), generator=torch.Generator().manual_seed(3))
    count = torch.tensor([nv], dtype=torch.int32)
    for torch_fn, triton_fn, args in [
            (kernels.hash_topk_torch, kernels.hash_topk_triton, (logits, input_ids, tid2eid, 1.5)),
            (kernels.score_topk_torch, kernels.score_topk_triton, (logits, bias, K, 2.5))]:
        by_int = load.clone()
        want = torch_fn(*args, log2phy, logcnt, by_int, nv)
        for fn in (torch_fn, triton_fn):
            by_tensor = load.clone()
            got = fn(*args, log2phy, logcnt, by_tensor, count)
            check_routing(want, got, by_int, by_tensor)
        assert torch.equal(by_int, expected_load(want[1], nv, load))


def test_routing_without_load_and_maps_returns_logical_ids():
    logits = torch.randn(9, 6)
    w, ids = kernels.score_topk_triton(logits, None, 2, 1.0)
    assert torch.equal(ids, kernels.score_topk_torch(logits, None, 2, 1.0)[1])
    assert ids.max() < 6


@pytest.mark.parametrize("bad", [-1, 11])
def test_hash_topk_out_of_range_token_ids(bad):
    E, K, V, T = 8, 2, 11, 5
    logits = torch.randn(T, E)
    tid2eid = torch.randint(0, E, (V, K), dtype=torch.int32)
    input_ids = torch.tensor([0, 3, bad, 4, 10])
    for fn in (kernels.hash_topk_torch, kernels.hash_topk_triton, kernels.hash_topk):
        with pytest.raises(ValueError):
            fn(logits, input_ids, tid2eid, 1.0)
    # the kernel itself (what CUDA runs unchecked) never reads the table out of bounds:
    # the bad row comes out as ids -1 / weight 0 and is not counted
    load = torch.zeros(E, dtype=torch.int32)
    w, ids = kernels._route_triton(logits, K, 1.0, None, None, load, None,
                                   input_ids=input_ids, tid2eid=tid2eid)
    assert ids[2].tolist() == [-1] * K and w[2].tolist() == [0.0] * K
    good = [0, 1, 3, 4]
    ref_w, ref_ids = kernels.hash_topk_torch(logits[good], input_ids[good], tid2eid, 1.0)
    assert torch.equal(ids[good], ref_ids)
    torch.testing.assert_close(w[good], ref_w)
    assert int(load.sum()) == len(good) * K


# ------------------------------------------------------------------------------------ experts
def naive_moe(x, weights, ids, w1, w3, w2, limit, slot_offset):
    """Per (t, k) in float64; returns (out [T, d], whether any clamp changed a value)."""
    T, K = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    clamped = False
    for t in range(T):
        for k in range(K):
            s = int(ids[t, k]) - slot_offset
            if not 0 <= s < w1.shape[0]:
                continue
            xt = x[t].double()
            g, u = w1[s].double() @ xt, w3[s].double() @ xt
            clamped |= bool((g > limit).any() or (u.abs() > limit).any())
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
            h = torch.nn.functional.silu(g) * u * float(weights[t, k])
            out[t] += w2[s].double() @ h
    return out, clamped


MOE_CASES = [  # T, K, P_local, d, I, slot_offset, id range, dtype
    (0, 2, 3, 16, 16, 0, 3, torch.float32),
    (1, 1, 3, 16, 32, 0, 3, torch.float32),
    (7, 2, 5, 24, 40, 0, 5, torch.float32),
    (33, 3, 6, 36, 20, 2, 11, torch.float32),  # expert parallelism: slots 2..7 of 0..10
    (20, 4, 4, 48, 24, 0, 4, torch.float16),
]


@pytest.mark.parametrize("T,K,P,d,I,offset,id_range,dtype", MOE_CASES)
def test_moe_experts_triton_matches_torch_and_reference(T, K, P, d, I, offset, id_range, dtype):
    gen = torch.Generator().manual_seed(T + P + d)
    limit = 2.0
    x = torch.randn(T, d, generator=gen).to(dtype)
    w1 = (torch.randn(P, I, d, generator=gen) / d ** 0.5 * 3).to(dtype)  # g, u often beyond limit
    w3 = (torch.randn(P, I, d, generator=gen) / d ** 0.5 * 3).to(dtype)
    w2 = (torch.randn(P, d, I, generator=gen) / I ** 0.5).to(dtype)
    ids = torch.randint(-1, id_range, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    ref, clamped = naive_moe(x, weights, ids, w1, w3, w2, limit, offset)
    assert clamped or T == 0
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, limit, offset)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, limit, offset)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (T, d)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.double(), ref, **tol)
    torch.testing.assert_close(b.double(), ref, **tol)
    if T >= 7:  # the inputs really include pairs of other ranks (or invalid ids)
        off_rank = (ids < offset) | (ids >= offset + P)
        assert off_rank.any()


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("T,K,P,d,I,offset,id_range,dtype",
                         MOE_CASES[1:4] + [(40, 2, 2, 16, 32, 0, 2, torch.float32)])
def test_moe_experts_triton_both_paths(T, K, P, d, I, offset, id_range, dtype, scan):
    # decode path (slot scan in every program, chunks of BLOCK_M rows) and prefill path (Triton
    # align + sorted blocks), forced both ways, with BLOCK_M small enough for several chunks
    gen = torch.Generator().manual_seed(T * 7 + P)
    x = torch.randn(T, d, generator=gen)
    w1, w3 = (torch.randn(P, I, d, generator=gen) / d ** 0.5 * 3 for _ in range(2))
    w2 = torch.randn(P, d, I, generator=gen) / I ** 0.5
    ids = torch.randint(-1, id_range, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    cfg = dict(BLOCK_M=16, up=(16, 16, 4), down=(16, 16, 4), scan=scan)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, config=cfg)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pairs_per_slot", [1, 20, 50, 500])
def test_moe_experts_triton_every_block_config(pairs_per_slot):
    # each decode/prefill block-size branch, with d and I both multiples and not of BLOCK_K
    cfg = kernels._moe_config(pairs_per_slot * 4, 4, 4)
    gen = torch.Generator().manual_seed(pairs_per_slot)
    for d, I in ((128, 64), (72, 136)):
        T, K, P = 24, 2, 4
        x = torch.randn(T, d, generator=gen)
        w1, w3 = (torch.randn(P, I, d, generator=gen) / d ** 0.5 for _ in range(2))
        w2 = torch.randn(P, d, I, generator=gen) / I ** 0.5
        ids = torch.randint(0, P, (T, K), generator=gen, dtype=torch.int32)
        weights = torch.rand(T, K, generator=gen)
        a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 1.0)
        b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 1.0, config=cfg)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_moe_align_groups_pairs_by_slot():
    ids = torch.tensor([[2, 0], [2, 9], [1, 2]], dtype=torch.int32)  # 9 is not local
    pairs, block_slot = kernels._moe_align(ids, 0, 3, 4)
    N = ids.numel()
    assert pairs.numel() == block_slot.numel() * 4
    rows = {}
    for b, s in enumerate(block_slot.tolist()):
        blk = [p for p in pairs[b * 4:(b + 1) * 4].tolist() if p < N]
        if s < 0:
            assert not blk
        else:
            rows.setdefault(s, []).extend(blk)
    # the order of pairs inside a slot is unspecified (atomic cursors on the GPU)
    assert {s: sorted(v) for s, v in rows.items()} == {0: [1], 1: [4], 2: [0, 2, 5]}


# ------------------------------------------------------------------------------------ mHC
HC_EPS = NORM_EPS = 1e-6  # the model's hc_eps and rms_norm_eps


def hc_inputs(T, n, d, dtype, seed):
    """Model-like mHC inputs (random_official_state_dict's init): h [T, n, d] (RMS 2, so the
    norm factor matters), fn [(2+n)n, n*d] ~ N/sqrt(n d), scale [3] ~ 1 + 0.3 N, base ~ 0.5 N."""
    gen = torch.Generator().manual_seed(seed)
    m = (2 + n) * n
    h = (2 * torch.randn(T, n, d, generator=gen)).to(dtype)
    fn = torch.randn(m, n * d, generator=gen) / (n * d) ** 0.5
    scale = 1 + 0.3 * torch.randn(3, generator=gen)
    base = 0.5 * torch.randn(m, generator=gen)
    return h, fn, scale, base


def hc_pre_both(h, fn, scale, base, iters, block_d=None):
    """(torch path of dsv4_mini.hc_pre on [1, T, n, d], hc_pre_triton on [T, n, d])."""
    T, n, d = h.shape
    ref = dsv4_mini.hc_pre(h.view(1, T, n, d), fn, scale, base, iters, HC_EPS, NORM_EPS)
    mixes = torch.nn.functional.linear(h.flatten(-2).float(), fn)  # [T, (2+n)n], the caller's GEMM
    got = kernels.hc_pre_triton(h, mixes, scale, base, iters, HC_EPS, NORM_EPS, block_d=block_d)
    return [r[0] for r in ref], got


@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("n,d", [(4, 16), (4, 40), (4, 128), (2, 40), (3, 24)])
@pytest.mark.parametrize("T", [1, 3, 7])
def test_hc_pre_triton_matches_torch(monkeypatch, T, n, d, iters):
    monkeypatch.delenv("DSV4_KERNELS", raising=False)  # CPU tensors: dsv4_mini.hc_pre = torch
    h, fn, scale, base = hc_inputs(T, n, d, torch.float32, seed=T * 100 + n * 10 + d + iters)
    (x0, post0, comb0), (x1, post1, comb1) = hc_pre_both(h, fn, scale, base, iters)
    assert x1.shape == (T, d) and post1.shape == (T, n) and comb1.shape == (T, n, n)
    assert x1.dtype == h.dtype and post1.dtype == comb1.dtype == torch.float32
    torch.testing.assert_close(post1, post0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb1, comb0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-5)
    if iters == 20:  # the columns are normalised last: sums 1 (to eps), rows nearly so
        assert (comb1.sum(-2) - 1).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,block_d", [(40, 16), (128, 32), (40, None)])
def test_hc_pre_triton_chunks_and_half(monkeypatch, d, block_d, dtype):
    # several d chunks with a masked tail (40 = 16 + 16 + 8); fp16 h: the same fp16 values go
    # into both paths, so post/comb stay fp32-close and only x has its fp16 output rounding
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    h, fn, scale, base = hc_inputs(5, 4, d, dtype, seed=d)
    (x0, post0, comb0), (x1, post1, comb1) = hc_pre_both(h, fn, scale, base, 20, block_d=block_d)
    assert x1.dtype == dtype
    torch.testing.assert_close(post1, post0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb1, comb0, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(x1, x0, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,block_d", [(4, 16, None), (4, 40, None), (4, 128, None),
                                         (4, 40, 16), (2, 40, None), (3, 24, 16)])
@pytest.mark.parametrize("T", [1, 3, 7])
def test_hc_post_triton_matches_torch(monkeypatch, T, n, d, block_d, dtype):
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(T * 100 + n * 10 + d)
    x = torch.randn(T, d, generator=gen).to(dtype)
    residual = torch.randn(T, n, d, generator=gen).to(dtype)
    post = 2 * torch.rand(T, n, generator=gen)
    comb = torch.rand(T, n, n, generator=gen)  # not symmetric: a missed transpose shows
    ref = dsv4_mini.hc_post(x.view(1, T, d), residual.view(1, T, n, d), post.view(1, T, n),
                            comb.view(1, T, n, n))[0]
    got = kernels.hc_post_triton(x, residual, post, comb, block_d=block_d)
    assert got.shape == (T, n, d) and got.dtype == dtype
    # out[t, k] = post[t, k] x[t] + sum_j comb[t, j, k] residual[t, j], in float64
    naive = (post.double()[..., None] * x.double()[:, None, :]
             + torch.einsum("tjk,tjd->tkd", comb.double(), residual.double()))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=4e-3)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got.double(), naive, **tol)


def test_tiny_model_with_triton_kernels_equals_torch(monkeypatch):
    # every Triton kernel the model dispatches to (routing, experts, mHC) under the interpreter
    model = weights.build_model(dsv4_mini.ModelConfig.tiny(), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    ref = model(ids)
    calls = []
    for name in ("hc_pre_triton", "hc_post_triton"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    got = model(ids)
    L = model.config.num_hidden_layers
    assert calls.count("hc_pre_triton") == calls.count("hc_post_triton") == 2 * L
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ dispatch
def test_dispatch_env(monkeypatch):
    monkeypatch.setattr(kernels, "moe_experts_torch", lambda *a: "torch")
    monkeypatch.setattr(kernels, "moe_experts_triton", lambda *a: "triton")
    x = torch.zeros(1, 4)
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    assert kernels.moe_experts(x, None, None, None, None, None, 1.0) == "torch"  # CPU tensors
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    assert kernels.moe_experts(x, None, None, None, None, None, 1.0) == "triton"
    monkeypatch.setenv("DSV4_KERNELS", "torch")
    assert kernels.moe_experts(x, None, None, None, None, None, 1.0) == "torch"
    monkeypatch.setenv("DSV4_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernels.moe_experts(x, None, None, None, None, None, 1.0)
