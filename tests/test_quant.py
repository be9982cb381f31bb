"""Routed experts kept quantised (fp8 e4m3 / packed fp4 e2m1 with ue8m0 scales): the Triton kernels
(TRITON_INTERPRET=1, CPU tensors) against their torch twins, the model / checkpoint paths, and EPLB
moving quantised slots bitwise. Tiny shapes: the interpreter runs every program in numpy."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before any module imports triton

import pytest
import torch

import checkpoint
import kernels


def quantize_slots(w, fmt):
    """[P, rows, cols] float -> (weight, uint8 e8m0 scale) slot-stacked, via checkpoint's quantisers."""
    quantize = checkpoint.quantize_fp4_packed if fmt == "fp4" else checkpoint.quantize_fp8_blockwise
    qs, ss = zip(*(quantize(m) for m in w))
    q = torch.stack(qs)
    return (q.view(torch.uint8) if fmt == "fp4" else q), torch.stack(ss).view(torch.uint8)


def random_experts(P, d, I, fmt, gen, spread=3.0):
    """Quantised (w1, w3, w2, (s1, s3, s2)) and their dequantised fp32 twins (w1, w3, w2)."""
    raw = [torch.randn(P, I, d, generator=gen) / d ** 0.5 * spread,
           torch.randn(P, I, d, generator=gen) / d ** 0.5 * spread,
           torch.randn(P, d, I, generator=gen) / I ** 0.5]
    quant = [quantize_slots(w, fmt) for w in raw]
    weights = tuple(q for q, _ in quant)
    scales = tuple(s for _, s in quant)
    dense = tuple(torch.stack([kernels.dequantize_slot(q, s, p, torch.float32) for p in range(P)])
                  for q, s in quant)
    return weights, scales, dense


# --------------------------------------------------------------------------------- torch twin
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_torch_twin_equals_dequantised_experts(fmt):
    # the quantised twin is the bf16 twin on explicitly dequantised slots: bitwise in fp32
    gen = torch.Generator().manual_seed(0)
    T, K, P, d, I = 9, 2, 5, 64, 32
    (w1, w3, w2), scales, (d1, d3, d2) = random_experts(P, d, I, fmt, gen)
    x = torch.randn(T, d, generator=gen)
    ids = torch.randint(-1, P + 2, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, 1, scales)
    b = kernels.moe_experts_torch(x, weights, ids, d1, d3, d2, 2.0, 1)
    assert torch.equal(a, b)


def test_fp4_dequantise_matches_table():
    # packed layout: even input in the low nibble; scale 2^(byte - 127)
    q = torch.tensor([[0x21, 0xF8] * 16], dtype=torch.uint8)  # [1, 32]: inputs 1,2 | -0,-6 ...
    s = torch.tensor([[127, 128]], dtype=torch.uint8)  # 1 for inputs 0..31, 2 for 32..63
    w = kernels.dequantize_slot(q[None], s[None], 0, torch.float32)[0]
    assert w[:4].tolist() == [0.5, 1.0, -0.0, -6.0]
    assert w[32:36].tolist() == [1.0, 2.0, -0.0, -12.0]


def test_scales_required_for_quantised_and_refused_for_bf16():
    w = torch.zeros(1, 4, 32, dtype=torch.uint8)
    x, ids, wt = torch.zeros(1, 64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    with pytest.raises(ValueError, match="scales"):
        kernels.moe_experts_torch(x, wt, ids, w, w, w, 1.0)
    f = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="scales"):
        kernels.moe_experts_torch(x, wt, ids, f, f, f.transpose(1, 2), 1.0, 0, (w, w, w))


# --------------------------------------------------------------------------------- Triton
QCASES = [  # T, K, P_local, d, I, slot_offset, id range, activation dtype
    (0, 2, 3, 32, 32, 0, 3, torch.float32),
    (1, 1, 3, 64, 32, 0, 3, torch.float32),
    (7, 2, 5, 96, 64, 0, 5, torch.float32),
    (13, 3, 4, 64, 160, 2, 9, torch.float32),  # expert parallelism: slots 2..5 of 0..8; I > 128
    (10, 2, 3, 160, 32, 0, 3, torch.float16),
]


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("T,K,P,d,I,offset,id_range,dtype", QCASES)
def test_quantised_triton_matches_twin(fmt, T, K, P, d, I, offset, id_range, dtype):
    gen = torch.Generator().manual_seed(T + P + d + I)
    (w1, w3, w2), scales, _ = random_experts(P, d, I, fmt, gen)
    x = torch.randn(T, d, generator=gen).to(dtype)
    ids = torch.randint(-1, id_range, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset, scales)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales)
    assert b.dtype == torch.float32 and b.shape == (T, d)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("T,K,P,d,I,offset,id_range", [
    (1, 2, 3, 64, 32, 0, 3), (21, 2, 4, 96, 96, 1, 6), (40, 2, 2, 32, 64, 0, 2)])
def test_quantised_triton_both_paths(fmt, scan, T, K, P, d, I, offset, id_range):
    # decode (scan) and prefill (align + sorted blocks) forced both ways, BLOCK_M small enough for
    # several chunks per slot, K tiles that do not divide d / I
    gen = torch.Generator().manual_seed(T * 7 + P + d)
    (w1, w3, w2), scales, _ = random_experts(P, d, I, fmt, gen)
    x = torch.randn(T, d, generator=gen)
    ids = torch.randint(-1, id_range, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    cfg = dict(BLOCK_M=16, up=(16, 64, 4), down=(32, 64, 4), scan=scan)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset, scales)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales, config=cfg)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("pairs_per_slot", [1, 50, 500])
def test_quantised_triton_default_configs(fmt, pairs_per_slot):
    # the default decode / mid / prefill block configs of each format
    cfg = kernels._moe_config(pairs_per_slot * 4, 4, 4, fmt=fmt)
    gen = torch.Generator().manual_seed(pairs_per_slot)
    T, K, P, d, I = 12, 2, 4, 128, 96
    (w1, w3, w2), scales, _ = random_experts(P, d, I, fmt, gen)
    x = torch.randn(T, d, generator=gen)
    ids = torch.randint(0, P, (T, K), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, K, generator=gen)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 1.0, 0, scales)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 1.0, 0, scales, config=cfg)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_quantised_shapes_are_checked():
    gen = torch.Generator().manual_seed(0)
    (w1, w3, w2), (s1, s3, s2), _ = random_experts(2, 64, 32, "fp4", gen)
    x, ids, wt = torch.zeros(1, 64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    with pytest.raises(ValueError, match="scale"):
        kernels.moe_experts_triton(x, wt, ids, w1, w3, w2, 1.0, 0, (s1, s3, s2[:, :, :0]))
    with pytest.raises(ValueError, match="w2"):
        kernels.moe_experts_triton(x, wt, ids, w1, w3, w2[:, :32], 1.0, 0, (s1, s3, s2))
