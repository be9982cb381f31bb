"""checkpoint.py: official formats (FP8 / packed FP4 / I64 tid2eid), sharding, truncation, HF names, errors."""
import json
import os

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import checkpoint as C
import weights

# Official config.json fields of a tiny model with a sliding, a CSA and an HCA layer; layer 0 hash-routed.
# hidden_size 160 is not a multiple of 128 (partial FP8 edge blocks) but is of 32 (FP4 blocks).
TINY = dict(vocab_size=96, hidden_size=160, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            head_dim=64, qk_rope_head_dim=16, q_lora_rank=48, o_groups=2, o_lora_rank=32, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, num_hash_layers=1, compress_ratios=[0, 4, 16, 0],
            sliding_window=8, index_n_heads=2, index_head_dim=32, index_topk=2, hc_mult=4, swiglu_limit=10.0,
            rms_norm_eps=1e-6, hc_eps=1e-6, hc_sinkhorn_iters=20, scoring_func="sqrtsoftplus",
            routed_scaling_factor=1.5, rope_theta=10000.0, compress_rope_theta=160000.0)


def official_state_dict(c=TINY, seed=0) -> dict:
    """A random official-name state dict with the release's tensor set and shapes (§4), unquantised fp32."""
    g = torch.Generator().manual_seed(seed)
    d, V, I, H, D = c["hidden_size"], c["vocab_size"], c["moe_intermediate_size"], c["num_attention_heads"], c["head_dim"]
    n, E, K, q, G, R = c["hc_mult"], c["n_routed_experts"], c["num_experts_per_tok"], c["q_lora_rank"], \
        c["o_groups"], c["o_lora_rank"]
    Di, Hi = c["index_head_dim"], c["index_n_heads"]

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"embed.weight": r(V, d), "head.weight": r(V, d), "norm.weight": r(d),
          "hc_head_fn": r(n, n * d), "hc_head_base": r(n), "hc_head_scale": r(1)}
    for L in range(c["num_hidden_layers"]):
        p = f"layers.{L}."
        for k in ("attn", "ffn"):
            sd |= {p + f"hc_{k}_fn": r((2 + n) * n, n * d), p + f"hc_{k}_base": r((2 + n) * n), p + f"hc_{k}_scale": r(3)}
        sd |= {p + "attn_norm.weight": r(d), p + "ffn_norm.weight": r(d), p + "attn.attn_sink": r(H),
               p + "attn.wq_a.weight": r(q, d), p + "attn.q_norm.weight": r(q), p + "attn.wq_b.weight": r(H * D, q),
               p + "attn.wkv.weight": r(D, d), p + "attn.kv_norm.weight": r(D),
               p + "attn.wo_a.weight": r(G * R, H * D // G), p + "attn.wo_b.weight": r(d, G * R),
               p + "ffn.gate.weight": r(E, d)}
        m = c["compress_ratios"][L]
        if m:
            coff = 2 if m == 4 else 1
            sd |= {p + "attn.compressor.ape": r(m, coff * D), p + "attn.compressor.wkv.weight": r(coff * D, d),
                   p + "attn.compressor.wgate.weight": r(coff * D, d), p + "attn.compressor.norm.weight": r(D)}
        if m == 4:
            pi = p + "attn.indexer."
            sd |= {pi + "compressor.ape": r(4, 2 * Di), pi + "compressor.wkv.weight": r(2 * Di, d),
                   pi + "compressor.wgate.weight": r(2 * Di, d), pi + "compressor.norm.weight": r(Di),
                   pi + "wq_b.weight": r(Hi * Di, q), pi + "weights_proj.weight": r(Hi, d)}
        if L < c["num_hash_layers"]:
            sd[p + "ffn.gate.tid2eid"] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]).int()
        else:
            sd[p + "ffn.gate.bias"] = r(E)
        for e in range(E):
            sd |= {p + f"ffn.experts.{e}.w1.weight": r(I, d), p + f"ffn.experts.{e}.w3.weight": r(I, d),
                   p + f"ffn.experts.{e}.w2.weight": r(d, I)}
        sd |= {p + "ffn.shared_experts.w1.weight": r(I, d), p + "ffn.shared_experts.w3.weight": r(I, d),
               p + "ffn.shared_experts.w2.weight": r(d, I)}
    return sd


FP8_MODULES = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
               "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3")


def release_format(sd):
    """sd -> (on-disk dict in the release's formats, the dequantised reference it must read back as)."""
    fp8 = [k for k in sd if k.endswith(".weight") and k.rsplit(".", 1)[0].split(".", 2)[-1] in FP8_MODULES]
    fp4 = [k for k in sd if ".ffn.experts." in k]
    disk = C.quantize_state_dict(sd, fp8=fp8, fp4=fp4)
    ref = {}
    for k, t in sd.items():
        s = k[: -len("weight")] + "scale"
        if k in fp8:
            ref[k] = C.dequantize_fp8_blockwise(disk[k], disk[s])
        elif k in fp4:
            ref[k] = C.dequantize_fp4_packed(disk[k], disk[s])
        else:
            ref[k] = t.clone()
    return disk, ref, fp8, fp4


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, k
        # bit-identical, including -0.0 and NaN payloads
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


# ------------------------------------------------------------------------------------------ formats

def test_fp8_blockwise_exact_on_representable_weights_and_ceil_blocks():
    g = torch.Generator().manual_seed(1)
    m, n = 200, 300  # 2 x 3 blocks, the last ones partial
    codes = (torch.randn(m, n, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    codes[0, 0] = 448.0  # every block reaches the top code, so its pow2 scale is recovered exactly
    codes[0, 128], codes[0, 256], codes[128, 0], codes[128, 128], codes[128, 256] = 448.0, -448.0, 448, 448, -448
    exps = torch.randint(-20, 20, (2, 3), generator=g).float()
    w = codes * C._block_expand(torch.exp2(exps), (m, n), (128, 128))
    q, s = C.quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    assert torch.equal(s.float(), torch.exp2(exps))
    assert torch.equal(C.dequantize_fp8_blockwise(q, s), w)
    # general weights: relative error of e4m3 (3 mantissa bits), never saturating
    w = torch.randn(130, 129, generator=g) * 7
    q, s = C.quantize_fp8_blockwise(w)
    d = C.dequantize_fp8_blockwise(q, s)
    assert ((d - w).abs() <= w.abs() / 16 + 2.0 ** -9 * s.float().max()).all()


def test_fp4_nibble_layout_table_and_scales():
    # byte 0x2F: low nibble 0xF (= -6) is element 0, high nibble 0x2 (= 1.0) is element 1
    packed = torch.full((1, 16), 0x2F, dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[4.0]]).to(torch.float8_e8m0fnu)
    w = C.dequantize_fp4_packed(packed, scale)
    assert w.shape == (1, 32) and w[0, 0] == -24.0 and w[0, 1] == 4.0
    # every code round-trips, and the scale is a power of two per 32 inputs
    g = torch.Generator().manual_seed(2)
    vals = C.FP4_TABLE[torch.randint(0, 16, (6, 128), generator=g)]
    vals[:, ::32] = 6.0  # each block reaches the top magnitude
    exps = torch.randint(-10, 10, (6, 4), generator=g).float()
    w = vals * torch.exp2(exps).repeat_interleave(32, dim=1)
    q, s = C.quantize_fp4_packed(w)
    assert q.dtype == torch.int8 and q.shape == (6, 64) and s.shape == (6, 4)
    assert torch.equal(s.float(), torch.exp2(exps))
    assert torch.equal(C.dequantize_fp4_packed(q, s), w)
    # torch's own packed-FP4 dtype (what the reference views the int8 storage as) reads the same
    assert torch.equal(C.dequantize("x.weight", q.view(torch.float4_e2m1fn_x2), s), w)
    with pytest.raises(ValueError, match="multiple of 32"):
        C.quantize_fp4_packed(torch.randn(2, 48))


# ------------------------------------------------------------------------------------------ read / write

def test_release_format_sharded_reads_back_the_dequantised_reference_exactly(tmp_path):
    sd = official_state_dict()
    disk, ref, fp8, fp4 = release_format(sd)
    files = C.write_checkpoint(str(tmp_path), disk, max_shard_bytes=40_000)
    assert len(files) > 3 and (tmp_path / C.INDEX_FILE).exists()
    index = json.loads((tmp_path / C.INDEX_FILE).read_text())["weight_map"]
    # some weight / scale pairs sit in different shards, so pairing across shards is exercised
    assert any(index[k] != index[k[:-6] + "scale"] for k in fp8 + fp4)
    assert disk["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    got = C.read_checkpoint(str(tmp_path), progress=False)
    assert_same(got, ref)
    assert got["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    # dtype: everything goes to bf16 except the fp32 group (the model holds these in fp32) and tid2eid
    got16 = C.read_checkpoint(str(tmp_path), dtype=torch.bfloat16, progress=False)
    for k, t in got16.items():
        fp32 = k.split(".")[-1].startswith("hc_") or k.endswith(("attn_sink", ".ape", "gate.bias", "norm.weight"))
        want = torch.int32 if k.endswith("tid2eid") else torch.float32 if fp32 else torch.bfloat16
        assert t.dtype == want, k
        assert torch.equal(t, ref[k].to(want)), k


def test_write_read_bit_identical_single_file_and_sharded(tmp_path):
    sd = official_state_dict(seed=3)
    sd["layers.0.attn.wq_a.weight"][0, :3] = torch.tensor([-0.0, float("inf"), 1e-42])  # -0, inf, subnormal
    for sub, limit in (("one", 1 << 40), ("many", 30_000)):
        files = C.write_checkpoint(str(tmp_path / sub), sd, max_shard_bytes=limit)
        assert (len(files) == 1) == (sub == "one")
        assert_same(C.read_checkpoint(str(tmp_path / sub), progress=False), sd)
    # raw bytes of quantised / e8m0 / int64 tensors are preserved by the writer
    disk, _, _, _ = release_format(sd)
    C.write_checkpoint(str(tmp_path / "raw"), disk)
    assert_same(load_file(str(tmp_path / "raw" / "model.safetensors")), disk)
    # a single file path works as well as its directory
    assert_same(C.read_checkpoint(str(tmp_path / "one" / "model.safetensors"), progress=False), sd)
    # bf16 stays bit-identical when read back as bf16; views into shared storage are written independently
    bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()}
    bf["head.weight"] = bf["embed.weight"][:, :]  # a view sharing storage with another tensor
    C.write_checkpoint(str(tmp_path / "bf"), bf)
    back = C.read_checkpoint(str(tmp_path / "bf"), dtype=torch.bfloat16, progress=False)
    for k in bf:
        want = bf[k].float() if back[k].dtype == torch.float32 else bf[k]
        assert torch.equal(back[k], want), k


def test_truncation_reads_only_the_first_layers(tmp_path, monkeypatch):
    disk, ref, _, _ = release_format(official_state_dict())
    # one shard per layer group, so the later layers can be deleted like an incomplete download
    C.write_checkpoint(str(tmp_path), disk, max_shard_bytes=40_000)
    index = json.loads((tmp_path / C.INDEX_FILE).read_text())["weight_map"]
    requested = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            requested.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(C, "safe_open", Spy)  # checkpoint.py imports safe_open at its top
    got = C.read_checkpoint(str(tmp_path), num_layers=2, progress=False)
    assert_same(got, {k: v for k, v in ref.items() if not k.startswith("layers.2.")})
    assert requested and not [k for k in requested if k.startswith("layers.2.")]
    monkeypatch.undo()
    # shards holding only layer 2 may be absent for a truncated read, not for a full one
    only_l2 = {s for s in set(index.values()) if all(k.startswith("layers.2.") for k, v in index.items() if v == s)}
    assert only_l2
    for s in only_l2:
        os.remove(tmp_path / s)
    assert_same(C.read_checkpoint(str(tmp_path), num_layers=2, progress=False), got)
    with pytest.raises(ValueError, match="missing"):
        C.read_checkpoint(str(tmp_path), progress=False)


def test_mtp_skipped_and_model_prefix_stripped(tmp_path):
    sd = official_state_dict()
    disk = {"model." + k: v for k, v in sd.items()} | {"mtp.0.e_proj.weight": torch.randn(4, 4),
                                                       "mtp.0.hc_head_fn": torch.randn(2)}
    C.write_checkpoint(str(tmp_path), disk)
    assert_same(C.read_checkpoint(str(tmp_path), progress=False), sd)


# ------------------------------------------------------------------------------------------ transformers names

def _hf_model(c=TINY, seed=0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from dsv4_mini import ModelConfig
    hc = DeepseekV4Config(**ModelConfig.from_dict(c).to_hf_dict())
    torch.manual_seed(seed)
    return DeepseekV4ForCausalLM(hc).float()


def test_hf_names_map_both_ways_and_match_transformers(tmp_path):
    c = TINY
    sd = official_state_dict(c)
    model = _hf_model(c)
    hf = C.official_to_hf_state_dict(sd, c)
    # every HF parameter / buffer gets exactly one tensor of the right shape and dtype
    want = model.state_dict()
    assert sorted(hf) == sorted(want)
    for k in want:
        assert hf[k].shape == want[k].shape and hf[k].dtype == want[k].dtype, k
    # HF -> official is the exact inverse (fused experts split, tid2eid back to int32)
    C.write_checkpoint(str(tmp_path / "hf"), hf)
    assert_same(C.read_checkpoint(str(tmp_path / "hf"), progress=False), sd)
    # transformers' own loader maps our official names onto its modules with nothing missing or unexpected
    C.write_checkpoint(str(tmp_path / "off"), sd)
    model.config.save_pretrained(str(tmp_path / "off"))
    from transformers import DeepseekV4ForCausalLM
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "off"), output_loading_info=True,
                                                         dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got = loaded.state_dict()
    for k in want:
        assert torch.equal(got[k], hf[k]), k
    # ...and what its save_pretrained writes (official names + its reverse-map quirks) reads back the same
    loaded.save_pretrained(str(tmp_path / "saved"))
    assert_same(C.read_checkpoint(str(tmp_path / "saved"), progress=False), sd)


# ------------------------------------------------------------------------------------------ errors

def test_errors_are_one_clear_value_error(tmp_path):
    sd = official_state_dict()
    disk, _, _, _ = release_format(sd)

    def case(name, tensors=None, index=None, raw=None):
        d = tmp_path / name
        d.mkdir()
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"))
        if index is not None:
            (d / C.INDEX_FILE).write_text(json.dumps({"weight_map": index}))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        return str(d)

    small = {k: v for k, v in disk.items() if not k.startswith("layers.")}
    w, s = "layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale"
    cases = [
        (str(tmp_path / "nope"), "does not exist"),
        (case("empty"), "no \\*.safetensors"),
        (case("garbage", raw=b"this is not a safetensors file at all"), "not a safetensors file"),
        (case("missing_shard", tensors=small, index={"embed.weight": "model-00002-of-00002.safetensors"}),
         "missing .*model-00002-of-00002"),
        (case("key_not_in_shard", tensors=small, index={"norm.weight": "model.safetensors",
                                                       "layers.0.attn_norm.weight": "model.safetensors"}),
         "layers.0.attn_norm.weight.*missing"),
        (case("scale_without_weight", tensors=small | {s: disk[s]}), "scale .*has no weight"),
        (case("weight_without_scale", tensors=small | {w: disk[w]}), "no layers.0.attn.wq_a.scale"),
        (case("bad_scale_shape", tensors=small | {w: disk[w], s: disk[s][:, :1].contiguous()}),
         "wq_a.weight: FP8 scale shape"),
        (case("unknown_name", tensors=small | {"layers.0.attn.mystery.weight": torch.zeros(2)}),
         "unknown DSV4 tensor name 'layers.0.attn.mystery.weight'"),
        (case("duplicate", tensors=small | {"model.lm_head.weight": sd["head.weight"].clone()}), "two stored tensors"),
        (case("bad_index", tensors=small, index=None, raw=None), None),
    ]
    (tmp_path / "bad_index" / C.INDEX_FILE).write_text("{not json")
    cases[-1] = (str(tmp_path / "bad_index"), "not a safetensors index")
    for path, msg in cases:
        with pytest.raises(ValueError, match=msg):
            C.read_checkpoint(path, progress=False)
    with pytest.raises(ValueError, match="quantised"):
        C.official_to_hf_state_dict(disk)
    with pytest.raises(ValueError, match="experts incomplete"):
        C.official_to_hf_state_dict({k: v for k, v in sd.items() if "experts.3." not in k}, TINY)


# ------------------------------------------------------------------------------------------ with the model

def test_model_save_load_round_trip_gives_bit_identical_logits(tmp_path):
    from dsv4_mini import ModelConfig
    from weights import build_model, load_model
    model = build_model(ModelConfig.tiny(), seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    weights.save_pretrained(model, str(tmp_path))
    back = load_model(str(tmp_path), dtype=torch.float32)
    assert_same(weights.official_state_dict(back), weights.official_state_dict(model))
    assert torch.equal(back.logits(ids), model.logits(ids))


def test_quantised_release_checkpoint_loads_to_the_dequantised_reference(tmp_path):
    from dsv4_mini import ModelConfig
    from weights import build_model, load_model
    config = ModelConfig.tiny()
    sd = {k: v.clone() for k, v in weights.official_state_dict(build_model(config, seed=6)).items()}
    disk, ref, fp8, fp4 = release_format(sd)
    assert fp8 and fp4
    reference = build_model(config, seed=6)
    weights.load_official_state_dict(reference, ref)
    C.write_checkpoint(str(tmp_path), disk, max_shard_bytes=200_000)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    model = load_model(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.logits(ids), reference.logits(ids))
    # the quantisation is real: the reference differs from the unquantised weights
    assert not torch.equal(ref["layers.1.attn.wq_a.weight"], sd["layers.1.attn.wq_a.weight"])
