"""Routed experts kept quantised (fp8 e4m3 / packed fp4 e2m1 with ue8m0 scales): the Triton kernels
(TRITON_INTERPRET=1, CPU tensors) against their torch twins, the model / checkpoint paths, and EPLB
moving quantised slots bitwise. Tiny shapes: the interpreter runs every program in numpy."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # conftest.py sets it too, before any module imports triton

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

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


def test_config_register_cap_becomes_a_launch_option_and_fp4_decode_takes_the_align_path():
    # "maxnreg" becomes the launch's register cap only when set; fp4's decode config sets it and "scan": False
    # (test_quantised_triton_default_configs runs that config)
    assert kernels._regs({}) == {} and kernels._regs(dict(maxnreg=None)) == {}
    assert kernels._regs(dict(maxnreg=128)) == {"maxnreg": 128}
    fp4, fp8 = (kernels._moe_config(64 * 6, 256, 2, fmt=f) for f in ("fp4", "fp8"))
    assert fp4["maxnreg"] == 128 and not fp4["scan"] and fp8["scan"]


VARIANTS = [  # fmt, activation dtype, config variant keys (see kernels._variant_code)
    ("fp4", torch.float32, dict(swap=True)),
    ("fp8", torch.float32, dict(swap=True)),
    ("fp4", torch.float16, dict(swap=True)),
    ("fp8", torch.float16, dict(swap=True)),
    ("fp4", torch.float16, dict(dot_scaled=True)),
    ("fp4", torch.float16, dict(dot_scaled=True, swap=True)),
]


@pytest.mark.parametrize("fmt,dtype,variant", VARIANTS)
@pytest.mark.parametrize("scan,BM", [(True, 16), (True, 8), (False, 16)])
def test_quantised_variants_match_twin(fmt, dtype, variant, scan, BM):
    # the alternative dot formulations: K tails (d 96, I 160 with BLOCK_K 64), N tails (I 160 with
    # BLOCK_N 32 / 64), several BLOCK_M chunks per slot, a slot no pair reaches (local slot 2) and
    # pairs on other ranks (ids outside slots 1..4)
    gen = torch.Generator().manual_seed(11)
    T, K, P, d, I, offset = 13, 2, 4, 96, 160, 1
    (w1, w3, w2), scales, _ = random_experts(P, d, I, fmt, gen)
    x = torch.randn(T, d, generator=gen).to(dtype)
    ids = torch.randint(-1, 6, (T, K), generator=gen, dtype=torch.int32)
    ids[ids == offset + 2] = offset + 1
    weights = torch.rand(T, K, generator=gen)
    cfg = dict(BLOCK_M=BM, up=(32, 64, 4), down=(64, 64, 4), scan=scan, **variant)
    a = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset, scales)
    b = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales, config=cfg)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b, a, **tol)


def test_variant_keys_checked():
    # swap is for quantised experts, dot_scaled for fp4; dot_scaled on fp32 activations falls back
    assert kernels._variant_code({}, "fp4", torch.float16) == 0
    assert kernels._variant_code(dict(swap=True, dot_scaled=True), "fp4", torch.float16) == 3
    assert kernels._variant_code(dict(dot_scaled=True), "fp4", torch.float32) == 0
    with pytest.raises(ValueError, match="swap"):
        kernels._variant_code(dict(swap=True), "bf16", torch.bfloat16)
    with pytest.raises(ValueError, match="dot_scaled"):
        kernels._variant_code(dict(dot_scaled=True), "fp8", torch.float16)


# ------------------------------------------------------------- fp8 tensor-core prefill (split activations)
def fp8x_edge_rows():
    """[5, 200] fp32: random rows over 9 decades, a zero row, a zero first block, e4m3 rounding ties
    (1.9375 carries into the next binade), subnormal ties, amax on 448 * 2^k and just above 1.75 * 2^k;
    K = 200 leaves a masked tail block of 72."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(5, 200, generator=gen) * torch.logspace(-6, 3, 200)[None, :].float()
    a[1] = 0
    a[2, :128] = 0
    a[3, :10] = torch.tensor([1.9375, -1.9375, 1.8125, 2 ** -10, 3 * 2 ** -11, 5 * 2 ** -11, -0.0, 1.8, 0.0, 0.0])
    a[4, :2] = torch.tensor([448.0 * 4, -1.76 * 2 ** 20])
    a[4, 130] = -448.0 * 2 ** 12
    return a


@pytest.mark.parametrize("parts", [1, 2])
def test_fp8x_split_triton_equals_torch_and_error_bound(parts):
    a = fp8x_edge_rows()
    q, s = kernels.fp8x_act_split(a, parts)  # Triton (interpreter)
    q2, s2 = kernels.fp8x_act_split_torch(a, parts)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (parts, 5, 200) and s.shape == (parts, 5, 2)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)  # values (a zero's sign may differ)
    assert torch.equal(torch.log2(s).round(), torch.log2(s))  # powers of two
    back = kernels.fp8x_act_dequant_torch(q2, s2)
    amax = torch.nn.functional.pad(a.abs(), (0, 56)).view(5, 2, 128).amax(-1).repeat_interleave(128, 1)[:, :200]
    bound = 2.0 ** -4 if parts == 1 else 2.0 ** -8  # relative to the block's amax
    assert ((back - a).abs() <= bound * amax).all()
    assert torch.equal(back[1], a[1]) and torch.equal(back[2, :128], a[2, :128])
    # each block's largest value lands in e4m3's top range: |q| in [224, 448] (zero blocks aside)
    qmax = torch.nn.functional.pad(q[0].float().abs(), (0, 56)).view(5, 2, 128).amax(-1)
    assert ((qmax >= 224) & (qmax <= 448) | (qmax == 0)).all() and (qmax == 448).any()


def test_fp8x_split_shared_scale_triton_equals_torch_and_error_bound():
    # the fp4 fp8_mma path's split: part 1 in part 0's scale; error per element <= max(2^-8 |a|, 2^-10 s)
    a = fp8x_edge_rows()
    q, s = kernels.fp8x_act_split(a, 2, shared_scale=True)  # Triton (interpreter)
    q2, s2 = kernels.fp8x_act_split_torch(a, 2, shared_scale=True)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2) and torch.equal(s[1], s[0])
    assert q[1].float().abs().max() <= 16  # the remainder: half an e4m3 step of part 0 at most
    back = kernels.fp8x_act_dequant_torch(q2, s2)
    scale = s2[0].repeat_interleave(128, 1)[:, :200]
    assert ((back - a).abs() <= torch.maximum(2.0 ** -8 * a.abs(), 2.0 ** -10 * scale)).all()
    assert torch.equal(back[1], a[1]) and torch.equal(back[2, :128], a[2, :128])


def fp8x_case(T, K, P, d, I, offset, seed):
    """fp8 experts and an fp16 prefill-like batch where slot offset + 1 gets no rows."""
    gen = torch.Generator().manual_seed(seed)
    (w1, w3, w2), scales, dense = random_experts(P, d, I, "fp8", gen)
    x = torch.randn(T, d, generator=gen).half()
    ids = torch.randint(-1, offset + P + 1, (T, K), generator=gen, dtype=torch.int32)
    ids[ids == offset + 1] = offset  # an empty slot
    weights = torch.rand(T, K, generator=gen)
    return x, weights, ids, (w1, w3, w2, scales), dense


def max_rel(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("parts,shared", [(1, False), (2, False), (2, True)], ids=["one", "two", "two_shared"])
@pytest.mark.parametrize("T,K,P,d,I,offset", [(40, 2, 4, 96, 160, 0), (23, 3, 3, 136, 64, 2)])
def test_fp8x_prefill_matches_twin_and_stays_at_bf16_noise(parts, shared, T, K, P, d, I, offset):
    # forced at BLOCK_M 16 (several row blocks per slot); d and I leave masked tail blocks.
    # shared: both parts in one scale (config fp8_shared), the two dots chained in one accumulator
    x, weights, ids, (w1, w3, w2, scales), (d1, d3, d2) = fp8x_case(T, K, P, d, I, offset, T + d + parts)
    if parts == 2:  # an outlier: its block's other inputs sit far below a shared scale, so the twins differ
        x[1, 5] = 2000 * x.abs().max()  # (~5e-5 apart) and only the matching one passes the 1e-5 check
    cfg = dict(BLOCK_M=16, up=(128, 64, 4), down=(64, 64, 4), scan=False, fp8_act=parts, fp8_shared=shared)
    out = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales, config=cfg)
    twin = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset, scales, act_parts=parts,
                                     act_shared_scale=shared)
    assert max_rel(out, twin) < 1e-5  # same split; fp32 summation order only
    ref = kernels.moe_experts_torch(x.float(), weights, ids, d1, d3, d2, 2.0, offset)  # dequantised, fp32
    bf16 = kernels.moe_experts_torch(x.bfloat16(), weights, ids, d1.bfloat16(), d3.bfloat16(), d2.bfloat16(),
                                     2.0, offset)  # bf16 experts holding the dequantised weights
    err, err_bf16 = max_rel(out, ref), max_rel(bf16, ref)
    if parts == 2:
        assert err < min(err_bf16, 2.0 ** -8)
    else:  # activation-quantised fp8: an order of magnitude coarser
        assert err > 4 * err_bf16


def test_fp8x_prefill_is_the_default_for_16_bit_fp8_prefill():
    cfg = kernels._moe_config(500 * 4, 4, 2, fmt="fp8")
    assert cfg["fp8_act"] == 2 and cfg["fp8_shared"] and not cfg["scan"] and cfg["BLOCK_M"] == 128
    assert kernels.fp8_dots_supported(torch.device("cpu"))  # the interpreter runs e4m3 dots
    x, weights, ids, (w1, w3, w2, scales), _ = fp8x_case(150, 2, 2, 64, 128, 0, 1)  # 150 pairs per slot
    out = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, 0, scales)
    twin = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, 0, scales, act_parts=2, act_shared_scale=True)
    assert max_rel(out, twin) < 1e-5
    old = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, 0, scales)  # fp16 dequantised path
    assert max_rel(old, twin) > 1e-4  # (so the check above tells the paths apart)


def test_fp8x_prefill_refuses_tiles_without_whole_scale_blocks():
    x, weights, ids, (w1, w3, w2, scales), _ = fp8x_case(8, 2, 2, 64, 128, 0, 2)
    with pytest.raises(ValueError, match="fp8 prefill path"):
        kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, 0, scales,
                                   config=dict(BLOCK_M=16, up=(64, 64, 4), down=(64, 64, 4), scan=False, fp8_act=2))


# ------------------------------------------------------------- fp4 inline PTX, emulated on the CPU
class PtxEmu:
    """Just enough of PTX to run kernels._FP4_F16_ASM on numpy uint32 registers (one lane per case):
    bitwise ops, shifts, u16x2 min/max, prmt, vector mov, cvt e4m3x2 -> f16x2, mul f16x2. An
    instruction it does not know fails the test, so a change to the asm has to teach it first."""
    E4M3_F16 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16) \
        .view(torch.int16).numpy().view(np.uint16)

    def __init__(self, operands):
        self.r = {f"${i}": np.asarray(v, dtype=np.uint32) for i, v in operands.items()}

    def val(self, tok):
        tok = tok.strip()
        if tok in self.r:
            return self.r[tok]
        return np.uint32(int(tok, 0))

    @staticmethod
    def lanes(x):
        return x & np.uint32(0xFFFF), x >> np.uint32(16)

    @staticmethod
    def join(lo, hi):
        return (lo.astype(np.uint32) & np.uint32(0xFFFF)) | (hi.astype(np.uint32) << np.uint32(16))

    def f16x2(self, x):
        lo, hi = self.lanes(x)
        return lo.astype(np.uint16).view(np.float16), hi.astype(np.uint16).view(np.float16)

    def run(self, text):
        body = text.strip()
        assert body.startswith("{") and body.endswith("}")
        for line in body[1:-1].split(";"):
            line = line.strip()
            if not line or line.startswith(".reg"):
                continue
            op, args = line.split(None, 1)
            if op == "mov.b32" and args.lstrip().startswith("{"):  # unpack into two b16
                dst, src = args.split("}")
                a, b = (t.strip() for t in dst.strip(" {").split(","))
                x = self.val(src.strip(" ,"))
                self.r[a], self.r[b] = self.lanes(x)
                continue
            d, *srcs = (t.strip() for t in args.split(","))
            s = [self.val(t) for t in srcs]
            u32 = np.uint32
            if op == "mov.b32":
                out = s[0] + u32(0)
            elif op == "and.b32":
                out = s[0] & s[1]
            elif op == "or.b32":
                out = s[0] | s[1]
            elif op == "shl.b32":
                out = (s[0].astype(np.uint64) << np.uint64(int(s[1]))).astype(np.uint64) & np.uint64(0xFFFFFFFF)
            elif op == "shr.b32" or op == "shr.u32":
                out = s[0] >> u32(s[1])
            elif op in ("add.u32", "sub.u32"):
                x = s[0].astype(np.int64) + (1 if op == "add.u32" else -1) * np.int64(s[1])
                out = x & 0xFFFFFFFF
            elif op in ("max.u16x2", "min.u16x2"):
                f = np.maximum if op.startswith("max") else np.minimum
                (a0, a1), (b0, b1) = self.lanes(s[0] + u32(0)), self.lanes(s[1] + u32(0))
                out = self.join(f(a0, b0), f(a1, b1))
            elif op == "prmt.b32":
                a, b, sel = s[0] + u32(0), s[1] + u32(0), int(s[2])
                src64 = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
                out = np.zeros_like(a, dtype=np.uint64)
                for i in range(4):
                    k = (sel >> (4 * i)) & 0xF
                    assert k < 8, "prmt sign-replicate mode not emulated"
                    out |= ((src64 >> np.uint64(8 * k)) & np.uint64(0xFF)) << np.uint64(8 * i)
            elif op == "cvt.rn.f16x2.e4m3x2":  # byte 0 -> low half, byte 1 -> high half
                x = s[0] + u32(0)
                out = self.join(self.E4M3_F16[x & u32(0xFF)], self.E4M3_F16[(x >> u32(8)) & u32(0xFF)])
            elif op == "mul.rn.f16x2":
                (a0, a1), (b0, b1) = self.f16x2(s[0] + u32(0)), self.f16x2(s[1] + u32(0))
                out = self.join((a0 * b0).view(np.uint16), (a1 * b1).view(np.uint16))
            else:
                raise AssertionError(f"PtxEmu: unknown instruction {op!r}")
            self.r[d] = np.asarray(out).astype(np.uint32)
        return self.r


@triton.jit
def _scale_f16_kernel(s_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    sh = kernels._fp4_scale_f16(tl.load(s_ptr + offs))
    tl.store(out_ptr + offs, sh)


def fp4_scale_f16_table():
    """kernels._fp4_scale_f16 of every scale byte (interpreter) -> uint16 fp16 bits [256]."""
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256, dtype=torch.float16)
    _scale_f16_kernel[(1,)](s, out, BLOCK=256)
    return out.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)


def test_fp4_scale_f16_is_scale_times_64_in_range():
    sh = fp4_scale_f16_table().astype(np.uint16).view(np.float16).astype(np.float64)
    s = np.arange(256)
    inside = (s >= 107) & (s <= 136)
    assert np.array_equal(sh[inside], np.ldexp(1.0, s[inside] - 127 + 6))
    assert np.all(np.isfinite(sh)) and np.all(sh > 0)


def test_fp4_asm_emulated_matches_dequantise_every_byte_and_scale():
    # each of the 4 bytes of an instance gets its own byte and scale: every byte value x every
    # scale in fp16's range at every position (a per-position bijection of the case index)
    sh = fp4_scale_f16_table()
    scales = np.arange(107, 137)
    bi, si = np.meshgrid(np.arange(256), np.arange(len(scales)), indexing="ij")
    bi, si = bi.ravel(), si.ravel()
    byte = [(bi + 67 * p) % 256 for p in range(4)]
    scale = [scales[(si + 11 * p) % len(scales)] for p in range(4)]
    ops = {4: sum(byte[p].astype(np.uint32) << (8 * p) for p in range(4)),
           5: sh[scale[0]] | (sh[scale[1]] << 16), 6: sh[scale[2]] | (sh[scale[3]] << 16)}
    r = PtxEmu(ops).run(kernels._FP4_F16_ASM.value)
    lanes = lambda x: [x & 0xFFFF, x >> 16]
    even = lanes(r["$0"]) + lanes(r["$1"])  # fp16 bits of the even value of bytes 0..3
    odd = lanes(r["$2"]) + lanes(r["$3"])
    for p in range(4):
        packed = torch.zeros(len(bi), 16, dtype=torch.uint8)
        packed[:, 0] = torch.from_numpy(byte[p].astype(np.uint8))
        s = torch.from_numpy(scale[p].astype(np.uint8))[:, None]
        ref = checkpoint.dequantize_fp4_packed(packed, s, torch.float32)[:, :2].to(torch.float16)
        ref = ref.view(torch.int16).numpy().view(np.uint16)
        got_even = even[p].astype(np.uint16)
        got_odd = odd[p].astype(np.uint16)
        bad = np.flatnonzero(got_even != ref[:, 0])
        assert bad.size == 0, (f"position {p}: even of byte {byte[p][bad[0]]:#04x} scale {scale[p][bad[0]]}: "
                               f"{got_even[bad[0]]:#06x} != {ref[bad[0], 0]:#06x} ({bad.size} wrong)")
        bad = np.flatnonzero(got_odd != ref[:, 1])
        assert bad.size == 0, (f"position {p}: odd of byte {byte[p][bad[0]]:#04x} scale {scale[p][bad[0]]}: "
                               f"{got_odd[bad[0]]:#06x} != {ref[bad[0], 1]:#06x} ({bad.size} wrong)")


def test_fp4_asm_emulated_zero_weights_stay_zero_for_any_scale():
    # masked tails load weight byte 0 and scale byte 0: the product must be 0, never NaN
    sh = fp4_scale_f16_table()
    s = np.arange(256)
    ops = {4: np.full(256, 0x80008800, dtype=np.uint32), 5: sh[s] | (sh[s] << 16), 6: sh[s] | (sh[s] << 16)}
    r = PtxEmu(ops).run(kernels._FP4_F16_ASM.value)
    for k in ("$0", "$1", "$2", "$3"):
        assert np.all((r[k] & 0x7FFF7FFF) == 0)


@triton.jit
def _pairs_probe_kernel(x_ptr, s_ptr, out_ptr, s2_ptr, P: tl.constexpr, G: tl.constexpr):
    rows = tl.arange(0, 4)[:, None]
    x = tl.load(x_ptr + rows * P + tl.arange(0, P)[None, :])  # [4, P] int32
    tl.store(out_ptr + rows * 2 * P + tl.arange(0, 2 * P)[None, :], kernels._f16x2_to_pairs(x))
    sg = tl.load(s_ptr + rows * G + tl.arange(0, G)[None, :])  # [4, G] uint8
    tl.store(s2_ptr + rows * P + tl.arange(0, P)[None, :], kernels._fp4_scale_pairs(sg, P))


def test_fp4_byte_pair_path_helpers():
    """The plain-Triton halves of the GPU's byte-pair path (_fp4_tile_pairs, whose PTX is emulated above):
    f16x2 registers become side-by-side fp16 values, and each byte pair gets its group's scale twice."""
    P, G = 8, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31 - 1, (4, P), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = torch.randint(0, 256, (4, G), generator=gen, dtype=torch.int64).to(torch.uint8)
    out = torch.empty(4, 2 * P, dtype=torch.float16)
    s2 = torch.empty(4, P, dtype=torch.int32)
    _pairs_probe_kernel[(1,)](x, scales, out, s2, P=P, G=G)
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))  # little-endian: low half first
    sh = torch.from_numpy(fp4_scale_f16_table().astype(np.int64))[scales.long()]  # [4, G] fp16 bits
    want = (sh | (sh << 16)).repeat_interleave(P // G, dim=1)  # [4, P]
    assert torch.equal(s2.to(torch.int64) & 0xFFFFFFFF, want)


def test_fp4_e4m3_asm_emulated_matches_dequantise_every_byte():
    # the fp8_mma variant's integer-only PTX: every byte value at every position of the 4-byte instance
    # -> e4m3 bytes holding exactly the dequantised value * 2^-6 (scale byte 127 = 1)
    b = np.arange(256, dtype=np.uint32)
    byte = [(b + 67 * p) % 256 for p in range(4)]
    r = PtxEmu({2: sum(byte[p] << (8 * p) for p in range(4))}).run(kernels._FP4_E4M3_ASM.value)
    for p in range(4):
        packed = torch.zeros(256, 16, dtype=torch.uint8)
        packed[:, 0] = torch.from_numpy(byte[p].astype(np.uint8))
        ref = checkpoint.dequantize_fp4_packed(packed, torch.full((256, 1), 127, dtype=torch.uint8),
                                               torch.float32)[:, :2] / 64  # [256, (even, odd)]
        for out, col in (("$0", 0), ("$1", 1)):
            got = torch.from_numpy(((r[out] >> np.uint32(8 * p)) & np.uint32(0xFF)).astype(np.uint8))
            assert torch.equal(got.view(torch.float8_e4m3fn).float(), ref[:, col]), (p, out)
            assert torch.equal(got >> 7, packed[:, 0] >> (3 + 4 * col) & 1)  # the sign too (-0 stays -0)


FP8_MMA_CASES = [  # scan, BLOCK_M, (up, down) = (BLOCK_N, BLOCK_K, warps), T, d, I
    (True, 8, (32, 64, 4), (64, 64, 4), 13, 96, 160),  # K tails of 32 (d 96), N tails (I 160 / 32, d 96 / 64)
    (True, 16, (64, 128, 4), (32, 32, 4), 9, 256, 96),  # two activation blocks per row; BLOCK_K 32
    (False, 16, (32, 64, 4), (64, 64, 4), 21, 96, 160),  # the align path (prefill-style sorted blocks)
]


@pytest.mark.parametrize("scan,BM,up,down,T,d,I", FP8_MMA_CASES)
def test_fp4_fp8_mma_matches_twin_and_stays_near_bf16(scan, BM, up, down, T, d, I):
    # fp4 on the fp8 tensor cores (config fp8_mma): x and h split into two e4m3 parts in one scale; the twin
    # is moe_experts_torch(act_parts=2, act_shared_scale=True). Several BLOCK_M chunks per slot, an empty
    # slot, other ranks' pairs.
    gen = torch.Generator().manual_seed(T + d + I)
    K, P, offset = 2, 4, 1
    (w1, w3, w2), scales, (d1, d3, d2) = random_experts(P, d, I, "fp4", gen)
    x = torch.randn(T, d + 32, generator=gen).half()[:, :d]  # rows with a stride (a view)
    ids = torch.randint(-1, 6, (T, K), generator=gen, dtype=torch.int32)
    ids[ids == offset + 2] = offset + 1
    weights = torch.rand(T, K, generator=gen)
    cfg = dict(BLOCK_M=BM, up=up, down=down, scan=scan, fp8_mma=True)
    out = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales, config=cfg)
    twin = kernels.moe_experts_torch(x, weights, ids, w1, w3, w2, 2.0, offset, scales, act_parts=2,
                                     act_shared_scale=True)
    assert max_rel(out, twin) < 1e-5  # same split; fp32 summation order only
    ref = kernels.moe_experts_torch(x.float(), weights, ids, d1, d3, d2, 2.0, offset)  # dequantised, fp32
    bf16 = kernels.moe_experts_torch(x.bfloat16(), weights, ids, d1.bfloat16(), d3.bfloat16(), d2.bfloat16(),
                                     2.0, offset)  # bf16 experts holding the dequantised weights (exact)
    assert max_rel(out, ref) < min(2 * max_rel(bf16, ref), 2.0 ** -8)
    plain = kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 2.0, offset, scales,
                                       config=dict(cfg, fp8_mma=False, swap=True))
    assert max_rel(plain, twin) > 1e-4  # (the check above tells the paths apart)


def test_fp4_fp8_mma_keys_and_fallbacks():
    assert kernels._variant_code(dict(fp8_mma=True), "fp4", torch.float16) == 5  # implies the swapped dots
    assert kernels._variant_code(dict(fp8_mma=True), "fp4", torch.float32) == 0  # exact path: plain dots
    assert kernels._variant_code(dict(fp8_mma=True), "fp4", torch.float16, fp8_dots=False) == 0
    with pytest.raises(ValueError, match="fp8_mma"):
        kernels._variant_code(dict(fp8_mma=True), "fp8", torch.float16)
    with pytest.raises(ValueError, match="pick one"):
        kernels._variant_code(dict(fp8_mma=True, dot_scaled=True), "fp4", torch.float16)
    assert not kernels.QUANT_CFG["fp4"]["decode"].get("fp8_mma")  # off by default until timed on a GPU
    gen = torch.Generator().manual_seed(4)
    (w1, w3, w2), scales, _ = random_experts(2, 64, 64, "fp4", gen)
    x, ids, wt = torch.randn(3, 64, generator=gen), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)
    with pytest.raises(ValueError, match="dividing 128"):
        kernels.moe_experts_triton(x.half(), wt, ids, w1, w3, w2, 2.0, 0, scales,
                                   config=dict(BLOCK_M=8, up=(32, 256, 4), down=(32, 64, 4), fp8_mma=True))
    # fp32 activations keep the exact plain path
    a = kernels.moe_experts_triton(x, wt, ids, w1, w3, w2, 2.0, 0, scales, config=dict(fp8_mma=True))
    torch.testing.assert_close(a, kernels.moe_experts_torch(x, wt, ids, w1, w3, w2, 2.0, 0, scales),
                               rtol=1e-4, atol=1e-4)


def test_quantised_shapes_are_checked():
    gen = torch.Generator().manual_seed(0)
    (w1, w3, w2), (s1, s3, s2), _ = random_experts(2, 64, 32, "fp4", gen)
    x, ids, wt = torch.zeros(1, 64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    with pytest.raises(ValueError, match="scale"):
        kernels.moe_experts_triton(x, wt, ids, w1, w3, w2, 1.0, 0, (s1, s3, s2[:, :, :0]))
    with pytest.raises(ValueError, match="w2"):
        kernels.moe_experts_triton(x, wt, ids, w1, w3, w2[:, :32], 1.0, 0, (s1, s3, s2))


# --------------------------------------------------------------------------------- model, checkpoints, EPLB
import dsv4_mini  # noqa: E402
import weights  # noqa: E402
from eplb import ExpertLocation, LocalMover, Rebalancer, rebalance_experts  # noqa: E402

TINY = dsv4_mini.ModelConfig.tiny()
IDS = torch.randint(0, TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
G, EXTRA = 2, 4  # virtual EP ranks, redundant slots


@pytest.fixture(scope="module")
def fp4_model():
    return weights.build_model(TINY, seed=0, expert_dtype="fp4")


def dense_copy(model):
    """The same model with its experts dequantised to fp32 (the reference for quantised runs)."""
    dense = weights.build_model(TINY, seed=1)
    weights.load_official_state_dict(dense, weights.official_state_dict(model))
    return dense


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_model_holds_experts_quantised(fmt):
    model = weights.build_model(TINY, seed=0, expert_dtype=fmt)
    e = model.layers[0].ffn.experts
    I, d = TINY.moe_intermediate_size, TINY.hidden_size
    if fmt == "fp4":
        assert e.w1.dtype == torch.uint8 and e.w1.shape == (TINY.n_routed_experts, I, d // 2)
        assert e.w2_scale.shape == (TINY.n_routed_experts, d, I // 32)
    else:
        assert e.w1.dtype == torch.float8_e4m3fn and e.w1.shape == (TINY.n_routed_experts, I, d)
        assert e.w2_scale.shape == (TINY.n_routed_experts, 1, 1)
    assert e.w1_scale.dtype == torch.uint8
    # what EPLB moves: every per-slot tensor, weights and scales, sharing the parameters' storage
    moved = model.expert_weights(0)
    assert len(moved) == 6 and all(t.shape[0] == TINY.n_routed_experts for t in moved)
    assert moved[0].data_ptr() == e.w1.data_ptr() and moved[3].data_ptr() == e.w1_scale.data_ptr()
    assert all(t.dtype == torch.uint8 for t in moved)  # fp8 weights as byte views: plain bytes to movers


def test_quantised_init_is_the_quantised_dense_draw():
    # build_model quantises each expert's fp32 draw: the same bits as loading the dense random
    # state dict into an fp4 model (which quantises on load)
    built = weights.build_model(TINY, seed=2, expert_dtype="fp4")
    loaded = weights.build_model(TINY, seed=9, expert_dtype="fp4")
    weights.load_official_state_dict(loaded, weights.random_official_state_dict(TINY, seed=2))
    for (name, a), b in zip(built.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp4_greedy_tokens_equal_dequantised_fp32_model(fp4_model):
    dense = dense_copy(fp4_model)
    assert dense.expert_dtype == "bf16" and dense.layers[0].ffn.experts.w1.dtype == torch.float32
    assert torch.equal(fp4_model.forward(IDS), dense.forward(IDS))  # the twin dequantises to fp32
    a = dsv4_mini.generate(fp4_model, IDS[:, :6], 6)
    b = dsv4_mini.generate(dense, IDS[:, :6], 6)
    assert torch.equal(a, b)


def test_fp4_model_triton_path_matches_torch(fp4_model, monkeypatch):
    ref = fp4_model.forward(IDS[:1, :5])
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    got = fp4_model.forward(IDS[:1, :5])
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_save_load_round_trip_is_bitwise(fmt, tmp_path):
    from safetensors import safe_open

    model = weights.build_model(TINY, seed=3, expert_dtype=fmt)
    weights.save_pretrained(model, str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the release's on-disk form
        w, s = f.get_tensor("layers.1.ffn.experts.5.w2.weight"), f.get_tensor("layers.1.ffn.experts.5.w2.scale")
        assert "layers.1.ffn.experts.w2" not in f.keys()
    assert w.dtype == (torch.int8 if fmt == "fp4" else torch.float8_e4m3fn)
    assert s.dtype == torch.float8_e8m0fnu
    back = weights.load_model(str(tmp_path), dtype=torch.float32)  # expert_dtype=None: as stored
    assert back.expert_dtype == fmt
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                                  b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name


def test_load_converts_to_the_asked_format(fp4_model, tmp_path):
    weights.save_pretrained(fp4_model, str(tmp_path))
    dense = weights.load_model(str(tmp_path), dtype=torch.float32, expert_dtype="bf16")
    assert torch.equal(dense.layers[2].ffn.experts.w3, dense_copy(fp4_model).layers[2].ffn.experts.w3)
    fp8 = weights.load_model(str(tmp_path), dtype=torch.float32, expert_dtype="fp8")
    assert fp8.expert_dtype == "fp8"
    # e2m1 values times a power of two are exact in e4m3 while the 128x128 block's range allows:
    # the re-quantised weights stay close to the fp4 ones
    e = fp8.layers[2].ffn.experts
    deq = kernels.dequantize_slot(e.w3, e.w3_scale, 4, torch.float32)
    ref = dense.layers[2].ffn.experts.w3[4]
    assert (deq - ref).abs().max() <= 0.07 * ref.abs().max()


def test_read_checkpoint_keeps_only_routed_experts_quantised(tmp_path):
    import checkpoint as ck
    sd = weights.official_state_dict(weights.build_model(TINY, seed=4))
    expert, attn = "layers.0.ffn.experts.1.w1.weight", "layers.0.attn.wq_a.weight"
    disk = ck.quantize_state_dict(sd, fp8=[attn], fp4=[expert])
    ck.write_checkpoint(str(tmp_path), disk)
    kept = ck.read_checkpoint(str(tmp_path), progress=False, keep_quantized_experts=True)
    assert kept[expert].dtype == torch.int8 and torch.equal(kept[expert], disk[expert])
    assert torch.equal(kept[expert[:-len("weight")] + "scale"].view(torch.uint8),
                       disk[expert[:-len("weight")] + "scale"].view(torch.uint8))
    assert kept[attn].dtype == torch.float32 and attn[:-len("weight")] + "scale" not in kept
    plain = ck.read_checkpoint(str(tmp_path), progress=False)
    assert plain[expert].dtype == torch.float32 and expert[:-len("weight")] + "scale" not in plain


def most_slots_target(model):
    L, E, P = TINY.num_hidden_layers, TINY.n_routed_experts, model.num_physical_experts
    loc = ExpertLocation.of_model(model, G)
    weight = torch.exp(2 * torch.randn(L, E, generator=torch.Generator().manual_seed(1)))
    target = ExpertLocation.from_phy2log(rebalance_experts(weight, P, 1, 1, G)[0], E, G, loc.width)
    assert int(target.changed_slots(loc).sum()) > 0.6 * L * P
    return loc, target


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_rebalance_moves_quantised_slots_bitwise(fmt):
    model = weights.build_model(TINY, seed=0, num_physical_experts=TINY.n_routed_experts + EXTRA, expert_dtype=fmt)
    L = TINY.num_hidden_layers
    ref = model.forward(IDS)
    before = [[t.clone() for t in model.expert_weights(layer)] for layer in range(L)]
    old_phy2log = model.phy2log.clone()
    loc, target = most_slots_target(model)
    rebalancer = Rebalancer(model, loc, LocalMover(G))
    rebalancer.begin(target, layers_per_step=1)
    while rebalancer.step():
        assert torch.equal(model.forward(IDS), ref), "logits changed during a layer-by-layer rebalance"
    assert torch.equal(model.forward(IDS), ref)
    slot_bytes = sum(t[0].numel() * t.element_size() for t in model.expert_weights(0))
    assert rebalancer.stats.bytes_moved > 0 and rebalancer.stats.bytes_moved % slot_bytes == 0
    for layer in range(L):
        now = model.expert_weights(layer)
        for p, expert in enumerate(model.phy2log[layer].tolist()):
            src = old_phy2log[layer].tolist().index(expert)  # replicas start identical
            for i, t in enumerate(now):  # weights and scales: exactly the source slot's bytes
                assert torch.equal(t[p], before[layer][i][src]), (layer, p, i)


EP_MOVER_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import dsv4_mini, ep, weights
rank, G = ep.init_expert_parallel(torch.device("cpu"))
group = ep.serving_group(30)
config = dsv4_mini.ModelConfig.tiny()
E, P = config.n_routed_experts, config.n_routed_experts + 4
per = P // G
for fmt in ("fp4", "fp8"):
    model = weights.build_model(config, seed=0, num_physical_experts=P, ep_rank=rank, ep_size=G, expert_dtype=fmt)
    full = weights.build_model(config, seed=0, expert_dtype=fmt)  # slot e holds expert e
    mover = ep.DistributedMover(rank, G, group, chunk_size=3)
    new = torch.randperm(P, generator=torch.Generator().manual_seed(1)) % E  # every expert somewhere
    for layer in range(config.num_hidden_layers):
        old = model.phy2log[layer].clone()
        moved = model.expert_weights(layer)  # weights and scales, uint8 views for fp8
        written = mover.move_layer(moved, old, new)
        assert written % sum(t[0].numel() * t.element_size() for t in moved) == 0
        ref = full.expert_weights(layer)
        for p in range(per):
            for t, r in zip(moved, ref):
                assert torch.equal(t[p], r[int(new[rank * per + p])]), (fmt, layer, p)
print("quantised mover ok", rank)
ep.shutdown(group)
"""


def test_distributed_mover_moves_quantised_slots_between_two_gloo_ranks(tmp_path):
    # real ranks: weights and scales cross gloo as bytes and land bitwise on every slot
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_serve import free_port

    script = tmp_path / "mover.py"
    script.write_text(EP_MOVER_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script), str(root)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("quantised mover ok") == 2
