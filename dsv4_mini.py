"""dsv4-mini model: DeepSeek-V4 (DSV4) in one readable file.

Read top to bottom: config -> small math helpers (RMSNorm, interleaved RoPE, mHC) -> attention
(sliding window, HCA compressor, CSA compressor + lightning indexer) -> MoE -> block -> model ->
KV cache -> build / load / save / generate.

The math follows DeepSeek's reference `inference/model.py` (see shared/reference/dsv4_architecture.md
§2). Module and parameter names are the official checkpoint names, except the routed experts, which
are slot-stacked per layer (`layers.L.ffn.experts.w1 [P_local, I, d]`) so that expert-parallel load
balancing (eplb.py) can move weights between physical slots in place. Routed experts may stay in the
release's FP4 / FP8 formats (`expert_dtype`, see RoutedExperts), with slot-stacked scales beside them.

Deliberately not modelled:
* QAT simulation (FP8 quant-dequant of the kv nope dims, Hadamard + FP4 of the indexer q/k): the
  math runs in fp32 (or bf16 weights with fp32 norms/softmax). Hugging Face transformers' DSV4 port
  omits it too; it changes quantisation noise only.
* The MTP block (`mtp.*`): not instantiated, its checkpoint keys are ignored (HF ignores it too, and
  the reference's `Transformer.forward` never calls it). Its `compress_ratios` entry is kept in the
  config so that config.json round-trips.

Shapes: B batch rows, S new tokens per row, d hidden, n hc streams, H heads, D head dim, r rope dims,
W sliding window, m compress ratio, N compressed entries, E logical experts, K top-k, P physical
slots, V vocab.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
from eplb import ExpertLocation

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

_FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]  # 43 layers + the MTP block (always sliding)
_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
_HF_KIND_OF_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention"}  # anything else: HCA


@dataclass
class ModelConfig:
    """DSV4 hyper-parameters under the official config.json names. Defaults = DeepSeek-V4-Flash.

    compress_ratios has one entry per layer plus one per MTP block: 0 = sliding window only,
    4 = CSA (overlapping compressor + lightning indexer), any other positive m = HCA (one entry per
    m tokens, all visible). Layers < num_hash_layers route by tid2eid[token]; the rest by score.
    """
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    compress_ratios: list = field(default_factory=lambda: list(_FLASH_RATIOS))
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(_YARN))
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        self.validate()

    # -- presets ----------------------------------------------------------------------------------
    @classmethod
    def flash(cls) -> ModelConfig:
        """The released DeepSeek-V4-Flash sizes (only for loading real checkpoints)."""
        return cls()

    @classmethod
    def mini(cls) -> ModelConfig:
        """The built-in served model: Flash's layer schedule at 1/8 width (tokenizer <= 8192 ids)."""
        return cls(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   head_dim=128, qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128,
                   n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                   num_hash_layers=3, sliding_window=128, index_n_heads=8, index_head_dim=64,
                   index_topk=32, compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128] + [0])

    @classmethod
    def tiny(cls) -> ModelConfig:
        """Unit-test size: one layer of each kind, short window and HCA ratio 8 so that 40-token
        tests cross several windows and compression boundaries. Hash layers: a sliding and a CSA one."""
        return cls(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                   head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=32,
                   n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
                   num_hash_layers=2, sliding_window=8, index_n_heads=4, index_head_dim=32,
                   index_topk=4, compress_ratios=[0, 4, 8, 4] + [0], max_position_embeddings=4096)

    # -- helpers ----------------------------------------------------------------------------------
    def layer_ratio(self, layer_idx: int) -> int:
        return self.compress_ratios[layer_idx]

    def is_hash_layer(self, layer_idx: int) -> bool:
        return layer_idx < self.num_hash_layers

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "sliding_window", "index_n_heads", "index_head_dim",
                     "index_topk", "hc_mult", "hc_sinkhorn_iters"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DSV4 has one shared K=V head")
        need(self.n_shared_experts == 1, "n_shared_experts", "DSV4 has exactly one shared expert")
        need(self.scoring_func == "sqrtsoftplus", "scoring_func", "only sqrtsoftplus is implemented")
        need((self.num_attention_heads * self.head_dim) % self.o_groups == 0, "o_groups",
             "must divide num_attention_heads * head_dim")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups", "must divide num_attention_heads")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be positive and even (interleaved pairs)")
        need(self.qk_rope_head_dim <= self.head_dim, "qk_rope_head_dim", f"must be <= head_dim {self.head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "qk_rope_head_dim",
             f"must be <= index_head_dim {self.index_head_dim} (the indexer ropes its last dims)")
        need(len(self.compress_ratios) == self.num_hidden_layers + self.num_nextn_predict_layers,
             "compress_ratios", f"needs num_hidden_layers + num_nextn_predict_layers = "
             f"{self.num_hidden_layers + self.num_nextn_predict_layers} entries")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios", "entries must be >= 0")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be <= n_routed_experts {self.n_routed_experts}")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             "must be in [0, num_hidden_layers]")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.rope_scaling is None or self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
             == "yarn", "rope_scaling", "only YaRN (or none) is supported")

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Official config.json form."""
        d = asdict(self)
        return {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **d}

    def to_hf_dict(self) -> dict:
        """transformers' DeepseekV4Config form (layer_types, compress_rates, rope_parameters, ...)."""
        n = self.num_hidden_layers
        hca = sorted({r for r in self.compress_ratios[:n] if r not in (0, 4)})
        if len(hca) > 1:
            raise ValueError(f"ModelConfig.compress_ratios: transformers allows one HCA ratio, got {hca}")
        d = {k: v for k, v in asdict(self).items()
             if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling", "topk_method")}
        d["model_type"] = "deepseek_v4"
        d["layer_types"] = [_HF_KIND_OF_RATIO.get(r, "heavily_compressed_attention") for r in self.compress_ratios[:n]]
        d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128}
        d["mlp_layer_types"] = ["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(n)]
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": d["partial_rotary_factor"]}
        if self.rope_scaling:
            compress.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")},
                            rope_type="yarn", attention_factor=1.0)
        d["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                         "partial_rotary_factor": d["partial_rotary_factor"]},
                                "compress": compress}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Official config.json or the transformers variant; unknown keys are ignored."""
        d = dict(d)
        if any(k in d for k in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
                                "partial_rotary_factor")):
            d = _official_from_hf(d)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, directory: str) -> ModelConfig:
        return cls.from_json(os.path.join(directory, "config.json"))

    def truncated(self, num_layers: int) -> ModelConfig:
        """The first num_layers layers (plus the MTP entries of compress_ratios)."""
        n = self.num_hidden_layers
        if not 0 < num_layers <= n:
            raise ValueError(f"num_layers must be in [1, {n}], got {num_layers}")
        d = asdict(self)
        d.update(num_hidden_layers=num_layers, num_hash_layers=min(self.num_hash_layers, num_layers),
                 compress_ratios=self.compress_ratios[:num_layers] + self.compress_ratios[n:])
        return ModelConfig(**d)


def _official_from_hf(d: dict) -> dict:
    """transformers' DeepseekV4Config keys -> official keys (inverse of ModelConfig.to_hf_dict)."""
    n = d["num_hidden_layers"]
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(d.get("compress_rates") or {})}
    if "layer_types" in d and d["layer_types"] is not None:
        ratio = {"sliding_attention": 0, **rates}
        bad = [t for t in d["layer_types"] if t not in ratio]
        if bad:
            raise ValueError(f"ModelConfig.layer_types: unknown layer types {bad}")
        if len(d["layer_types"]) < n:
            raise ValueError(f"ModelConfig.layer_types: needs {n} entries, got {len(d['layer_types'])}")
        d["compress_ratios"] = [ratio[t] for t in d["layer_types"][:n]] + [0] * d.get("num_nextn_predict_layers", 1)
    if d.get("mlp_layer_types") is not None:
        kinds = list(d["mlp_layer_types"][:n])
        num_hash = kinds.count("hash_moe")
        if kinds != ["hash_moe"] * num_hash + ["moe"] * (len(kinds) - num_hash):
            raise ValueError(f"ModelConfig.mlp_layer_types: hash_moe layers must come first, got {kinds}")
        d["num_hash_layers"] = num_hash
    if d.get("partial_rotary_factor") is not None:
        d["qk_rope_head_dim"] = int(round(d["head_dim"] * d["partial_rotary_factor"]))
    rp = d.get("rope_parameters") or {}
    compress = rp.get("compress") if isinstance(rp.get("compress"), dict) else rp
    if isinstance(rp.get("main"), dict) and "rope_theta" in rp["main"]:
        d["rope_theta"] = rp["main"]["rope_theta"]
    if isinstance(rp.get("compress"), dict) and "rope_theta" in compress:
        d["compress_rope_theta"] = compress["rope_theta"]
    if compress.get("rope_type", compress.get("type")) == "yarn":
        d["rope_scaling"] = {"type": "yarn", **{k: compress[k] for k in (
            "factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in compress}}
    elif rp:
        d["rope_scaling"] = None
    return d


# ---------------------------------------------------------------------------------------------------
# Small math: RMSNorm, interleaved partial RoPE, hyper-connections
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))  # fp32 like the reference

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32: one fused kernel on CUDA instead of six
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def rope_inv_freq(rope_dim: int, base: float, yarn: dict | None) -> Tensor:
    """Per-pair angular frequency [r/2]. YaRN as in the reference's precompute_freqs_cis: low
    frequencies are divided by `factor`, high ones kept, a linear ramp between; no mscale."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))  # [r/2]
    if yarn:
        factor, orig = yarn["factor"], yarn["original_max_position_embeddings"]

        def correction_dim(rotations):  # pair index whose wavelength fits `rotations` times in orig
            return rope_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(yarn.get("beta_fast", 32))), 0)
        high = min(math.ceil(correction_dim(yarn.get("beta_slow", 1))), rope_dim - 1)
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_cis(inv_freq: Tensor, positions: Tensor) -> Tensor:
    """cos + i sin of every pair's angle: complex [..., r/2] (computed once per step, shared by all layers)."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., r/2]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, cis: Tensor, inverse: bool = False) -> Tensor:
    """Interleaved RoPE on the LAST r dims of x [..., D]; pairs (2i, 2i+1) rotate by angle i.
    cis (rope_cis) broadcasts against [..., r/2]. inverse=True rotates back (conjugate)."""
    r = cis.shape[-1] * 2
    # a pair (x0, x1) is the complex number x0 + i x1; rotating it by angle a multiplies by cos a + i sin a
    pairs = torch.view_as_complex(x[..., -r:].float().unflatten(-1, (-1, 2)))  # [..., r/2] complex
    rotated = torch.view_as_real(pairs * (cis.conj() if inverse else cis)).flatten(-2)  # [..., r]
    out = x.clone()
    out[..., -r:] = rotated  # (cast back to x's dtype by the copy)
    return out


def hc_pre(h: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float, norm_eps: float):
    """mHC collapse: streams h [B,S,n,d] -> block input [B,S,d], plus post [B,S,n] and comb [B,S,n,n].

    pre/post come from sigmoids, comb from a Sinkhorn projection (softmax start, then alternating
    column/row normalisation) onto (nearly) doubly-stochastic matrices. All fp32.
    Where kernels._use_triton(h) (CUDA): the GEMM, then one fused kernel (kernels.hc_pre_triton).
    The torch code below is the reference and the CPU path.
    """
    n = h.shape[-2]
    if kernels._use_triton(h):
        lead, d = h.shape[:-2], h.shape[-1]
        mixes = F.linear(h.flatten(-2).float(), fn)  # [B,S,(2+n)n]; the kernel applies the RMS factor
        x, post, comb = kernels.hc_pre_triton(h.reshape(-1, n, d), mixes.reshape(-1, mixes.shape[-1]),
                                              scale, base, iters, hc_eps, norm_eps)
        return x.view(*lead, d), post.view(*lead, n), comb.view(*lead, n, n)
    flat = h.flatten(-2).float()  # [B,S,n*d]
    mixes = F.linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)  # [B,S,(2+n)n]
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps  # [B,S,n]
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])  # [B,S,n]
    comb = mixes[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)  # [B,S,n,n]
    comb = sinkhorn(comb, iters, hc_eps)
    x = torch.einsum("bsn,bsnd->bsd", pre, h.float())  # [B,S,d] = sum_k pre_k * h_k, one kernel
    return x.to(h.dtype), post, comb


def sinkhorn(comb: Tensor, iters: int, eps: float) -> Tensor:
    """softmax, then `iters` column and iters-1 row normalisations (x / (sum + eps)), like the reference.

    The CPU decode hot spot: 16 calls per token on [B,S,4,4]. Each normalisation is two ops: a
    batched matmul with a ones vector gives the sums with eps already added (baddbmm's `input`),
    then an in-place divide.
    """
    shape, n = comb.shape, comb.shape[-1]
    comb = comb.softmax(-1).add_(eps).reshape(-1, n, n)  # [T,n,n]
    eps_t = comb.new_full((1, 1, 1), eps)
    ones_col = comb.new_ones(1, n, 1).expand(comb.shape[0], n, 1)  # [T,n,1]: row sums
    ones_row = comb.new_ones(1, 1, n).expand(comb.shape[0], 1, n)  # [T,1,n]: column sums
    comb.div_(torch.baddbmm(eps_t, ones_row, comb))
    for _ in range(iters - 1):
        comb.div_(torch.baddbmm(eps_t, comb, ones_col))
        comb.div_(torch.baddbmm(eps_t, ones_row, comb))
    return comb.view(shape)


def hc_post(x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """mHC expand: out_k = post_k * x + sum_j comb[j, k] * residual_j (note: comb transposed).
    Where kernels._use_triton(residual) (CUDA): one fused kernel
    (kernels.hc_post_triton); the torch code is the reference and the CPU path."""
    if kernels._use_triton(residual):
        n, d = residual.shape[-2:]
        out = kernels.hc_post_triton(x.reshape(-1, d), residual.reshape(-1, n, d), post.reshape(-1, n),
                                     comb.reshape(-1, n, n))
        return out.view(residual.shape)
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, residual.float())  # [B,S,n,d]
    return mixed.addcmul_(post.unsqueeze(-1), x.float().unsqueeze(-2)).to(residual.dtype)


def _linear(dim_in: int, dim_out: int, dtype, device) -> nn.Linear:
    return nn.Linear(dim_in, dim_out, bias=False, dtype=dtype, device=device)


def linear_fp32(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., d_in] @ weight [d_out, d_in]^T in fp32, as F.linear(x.float(), weight.float()).
    For 16-bit x and weight on CUDA, one GEMM with 16-bit operands and an fp32 result (torch.mm's
    out_dtype): the same exact products and fp32 sums, without copying the weight to fp32 on every
    call (for the [V, d] head at released width, 3 GB of traffic and 2 ms of every decode step)."""
    if x.is_cuda and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x.float(), weight.float())


# ---------------------------------------------------------------------------------------------------
# Per-forward context
# ---------------------------------------------------------------------------------------------------

@dataclass
class ForwardContext:
    """What every layer needs to know about this forward step (built once by DSV4Model.forward)."""
    input_ids: Tensor  # [B,S] int64
    positions: Tensor  # [B,S] int64: absolute position of each new token
    start: Tensor  # [B] int64: position of each row's first new token
    start_list: list | None  # the same as Python ints (prefill only: which windows complete)
    seq_bound: int  # static upper bound on start + S over rows: compressed layers look at
                    # entries [0, seq_bound // m) (masked per row); cache.max_seq_len under a CUDA graph
    slot_ids: Tensor  # [B] int64: cache slot of each row
    rope: dict  # "main" | "compress" -> complex cos + i sin [B,S,r/2] at `positions` (rope_cis)
    window_idx: Tensor  # [B,W] ring slots of the W positions before `start` (slot = position mod W)
    window_mask: Tensor  # [B,1,S,W+S] query t sees key p (ring, then this step) iff t-W < p <= t, p >= 0
    window_write: Tensor  # [B,min(S,W)] ring slots the last new tokens go to
    inv_freq: dict  # "main" | "compress" -> [r/2]
    load: Tensor | None  # [L,P] int32 per-step expert counts, or None
    num_valid_tokens: Tensor | None  # [1] int32: only the first rows count in `load`. None: all rows.
                                     # Set by runner.DecodeGraphs, whose padded rows count nothing.
    log2phy: Tensor  # [L,E,X] int32 (the model's buffer)
    logcnt: Tensor  # [L,E] int32
    ep_group: object  # torch.distributed group or None
    moe_timer: "MoETimer | None" = None  # expert parallelism: time spent in this rank's routed experts


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

class Compressor(nn.Module):
    """Pools every m consecutive tokens into one kv entry (softmax-gated per channel).

    HCA (m != 4): entry w pools window w = tokens [w*m, (w+1)*m).
    CSA (m == 4, overlap): entry w pools 2m tokens: window w-1 through channels [0:D] of wkv/wgate
    and window w through channels [D:2D]; window -1 counts as empty (gate -inf).
    The entry is RMS-normed and roped at position w*m. Only complete windows emit an entry.

    Incremental state per cache slot: the raw projections of the last coff*m tokens (ring indexed by
    position mod coff*m), so a window that completes in a later step (or the overlap's previous
    window) can be pooled without recomputation.
    """

    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, dtype, device):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        self.coff = 2 if self.overlap else 1
        width = self.coff * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32, device=device))
        self.wkv = _linear(config.hidden_size, width, dtype, device)
        self.wgate = _linear(config.hidden_size, width, dtype, device)
        self.norm = RMSNorm(head_dim, config.rms_norm_eps, device)

    def forward(self, x: Tensor, ctx: ForwardContext, kv_state: Tensor, gate_state: Tensor, entries: Tensor,
                inv_freq: Tensor) -> None:
        """Fold x [B,S,d] (tokens at ctx.positions) into the state; write completed entries into
        entries [slots, N_max, D] at their window index."""
        B, S, _ = x.shape
        m, c, D = self.ratio, self.coff, self.head_dim
        ring = c * m
        kv = linear_fp32(x, self.wkv.weight)  # [B,S,cD] fp32 like the reference
        gate = linear_fp32(x, self.wgate.weight) + self.ape[ctx.positions % m]  # [B,S,cD]
        if S == 1:
            return self._decode_step(kv[:, 0], gate[:, 0], ctx, kv_state, gate_state, entries, inv_freq)

        # Which windows complete in this step: w in [start//m, (start+S)//m) per row.
        first = [s // m for s in ctx.start_list]
        counts = [(s + S) // m - f for s, f in zip(ctx.start_list, first)]
        num_new = max(counts)
        if num_new > 0:
            # Tokens of the windows to pool, window-aligned per row: from window first-(c-1) on.
            # Positions < start come from the ring, positions in [start, start+S) from this step.
            base = (torch.tensor(first, device=x.device) - (c - 1)) * m  # [B]
            pos = base.unsqueeze(1) + torch.arange((num_new + c - 1) * m, device=x.device)  # [B,J]
            start = ctx.start.unsqueeze(1)  # [B,1]
            old = (pos >= 0) & (pos < start)  # [B,J]
            new = (pos >= start) & (pos < start + S)
            slot = ctx.slot_ids.unsqueeze(1)
            ring_idx = pos.clamp(min=0) % ring
            step_idx = (pos - start).clamp(0, S - 1).unsqueeze(-1).expand(-1, -1, c * D)
            seq_kv = torch.where(old.unsqueeze(-1), kv_state[slot, ring_idx],
                                 torch.where(new.unsqueeze(-1), kv.gather(1, step_idx), 0.0))  # [B,J,cD]
            seq_gate = torch.where(old.unsqueeze(-1), gate_state[slot, ring_idx],
                                   torch.where(new.unsqueeze(-1), gate.gather(1, step_idx), -math.inf))
            seq_kv = seq_kv.unflatten(1, (-1, m))  # [B,windows,m,cD]
            seq_gate = seq_gate.unflatten(1, (-1, m))
            if self.overlap:  # previous window's first half + this window's second half: 2m slots
                pool_kv = torch.cat([seq_kv[:, :-1, :, :D], seq_kv[:, 1:, :, D:]], dim=2)  # [B,num_new,2m,D]
                pool_gate = torch.cat([seq_gate[:, :-1, :, :D], seq_gate[:, 1:, :, D:]], dim=2)
            else:
                pool_kv, pool_gate = seq_kv, seq_gate  # [B,num_new,m,D]
            pooled = (pool_kv * pool_gate.softmax(dim=2)).sum(2)  # [B,num_new,D]
            window = torch.tensor(first, device=x.device).unsqueeze(1) + torch.arange(num_new, device=x.device)
            pooled = apply_rope(self.norm(pooled), rope_cis(inv_freq, window * m))  # entry w: at its first token
            valid = torch.arange(num_new, device=x.device) < torch.tensor(counts, device=x.device).unsqueeze(1)
            rows = ctx.slot_ids.unsqueeze(1).expand(-1, num_new)
            entries[rows[valid], window[valid]] = pooled[valid].to(entries.dtype)

        # Keep the raw projections of the last `ring` tokens for later windows.
        keep = min(S, ring)
        idx = ctx.positions[:, -keep:] % ring  # [B,keep], distinct within a row
        kv_state[ctx.slot_ids.unsqueeze(1), idx] = kv[:, -keep:]
        gate_state[ctx.slot_ids.unsqueeze(1), idx] = gate[:, -keep:]

    def _decode_step(self, kv: Tensor, gate: Tensor, ctx: ForwardContext, kv_state: Tensor, gate_state: Tensor,
                     entries: Tensor, inv_freq: Tensor) -> None:
        """One token per row (kv, gate [B,cD]) with fixed shapes and no host syncs (CUDA-graph safe).

        The token goes into the ring first; then the window it belongs to is pooled straight from
        the ring (for CSA also the previous window, which the ring still holds: ring = 2m), and the
        entry is stored only where this token completes its window; other rows write back the old
        value. After cache.reset, never-written ring gates are -inf, i.e. window -1 is empty.
        """
        m, c, D = self.ratio, self.coff, self.head_dim
        ring = c * m
        pos, slot = ctx.positions[:, 0], ctx.slot_ids  # [B]
        kv_state[slot, pos % ring] = kv
        gate_state[slot, pos % ring] = gate
        w = pos // m  # [B] window of this token
        idx = (((w - (c - 1)) * m).unsqueeze(1) + torch.arange(ring, device=pos.device)) % ring  # [B,cm]
        seq_kv, seq_gate = kv_state[slot.unsqueeze(1), idx], gate_state[slot.unsqueeze(1), idx]  # [B,cm,cD]
        if self.overlap:  # previous window's first half + this window's second half: 2m slots
            seq_kv = torch.cat([seq_kv[:, :m, :D], seq_kv[:, m:, D:]], dim=1)  # [B,2m,D]
            seq_gate = torch.cat([seq_gate[:, :m, :D], seq_gate[:, m:, D:]], dim=1)
        pooled = (seq_kv * seq_gate.softmax(dim=1)).sum(1)  # [B,D]
        pooled = apply_rope(self.norm(pooled), rope_cis(inv_freq, w * m)).to(entries.dtype)  # at its first token
        done = (((pos + 1) % m == 0) & (w < entries.shape[1])).unsqueeze(1)  # [B,1] completes window w
        w = w.clamp(max=entries.shape[1] - 1)  # an incomplete last window may lie past the buffer
        entries[slot, w] = torch.where(done, pooled, entries[slot, w])


class Indexer(nn.Module):
    """Lightning indexer (CSA): score(t, s) = sum_h w_h(t) * relu(q_h(t) . K_s), top-k visible entries.

    Ties are broken by the lowest entry index (stable sort), identically in every path, so cached
    decoding picks exactly what the full forward picks (torch.topk's tie order is unspecified).
    """

    def __init__(self, config: ModelConfig, ratio: int, dtype, device):
        super().__init__()
        self.ratio = ratio
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = _linear(config.q_lora_rank, self.n_heads * self.head_dim, dtype, device)
        self.weights_proj = _linear(config.hidden_size, self.n_heads, dtype, device)
        self.compressor = Compressor(config, ratio, self.head_dim, dtype, device)

    def forward(self, x: Tensor, qr: Tensor, ctx: ForwardContext, cache: LayerCache, num_entries: int) -> Tensor:
        """-> entry indices [B,S,k] (-1 = nothing to pick), k = min(index_topk, num_entries).
        The caller has already folded x into this indexer's compressor (cache.index_entries)."""
        B, S, _ = x.shape
        keys = cache.index_entries[ctx.slot_ids, :num_entries].float()  # [B,N,Di]
        q = apply_rope(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), ctx.rope["compress"].unsqueeze(2))
        weights = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B,S,Hi]
        scores = torch.einsum("bshd,bnd->bshn", q.float(), keys).relu()  # [B,S,Hi,N]
        scores = (scores * weights.unsqueeze(-1)).sum(2)  # [B,S,N]
        visible = _entry_visible(num_entries, self.ratio, ctx.positions)  # [B,S,N]
        scores = scores.masked_fill(~visible, -math.inf)
        picked = indexer_topk(scores, min(self.topk, num_entries))  # [B,S,k]
        return torch.where(visible.gather(-1, picked), picked, -1)


def indexer_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores along the last dim; equal scores: lowest index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _entry_visible(num_entries: int, ratio: int, positions: Tensor) -> Tensor:
    """[B,S,N] bool: entry w (tokens up to (w+1)*m - 1) is visible to the query at position t."""
    w = torch.arange(num_entries, device=positions.device)
    return (w + 1) * ratio <= positions.unsqueeze(-1) + 1


class Attention(nn.Module):
    """Shared-K=V MQA over (sliding window + compressed entries), per-head sink, grouped output."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype, device):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.rope_dim = c.num_attention_heads, c.head_dim, c.qk_rope_head_dim
        self.eps, self.o_groups = c.rms_norm_eps, c.o_groups
        self.ratio = c.layer_ratio(layer_idx)
        self.rope_kind = "compress" if self.ratio else "main"  # compressed layers: compress_rope_theta + YaRN
        self.wq_a = _linear(c.hidden_size, c.q_lora_rank, dtype, device)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, device)
        self.wq_b = _linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, dtype, device)
        self.wkv = _linear(c.hidden_size, c.head_dim, dtype, device)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps, device)
        # grouped low-rank output: wo_a is [g*o_lora, H*D/g], used as g separate [o_lora, H*D/g] maps
        self.wo_a = _linear(c.num_attention_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank, dtype, device)
        self.wo_b = _linear(c.o_groups * c.o_lora_rank, c.hidden_size, dtype, device)
        self.attn_sink = nn.Parameter(torch.zeros(c.num_attention_heads, dtype=torch.float32, device=device))
        self.compressor = Compressor(c, self.ratio, c.head_dim, dtype, device) if self.ratio else None
        self.indexer = Indexer(c, self.ratio, dtype, device) if self.ratio == 4 else None

    def forward(self, x: Tensor, ctx: ForwardContext, cache: LayerCache) -> Tensor:
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        cis = ctx.rope[self.rope_kind]  # [B,S,r/2] complex

        qr = self.q_norm(self.wq_a(x))  # [B,S,q_lora]; the indexer reuses it
        q = self.wq_b(qr).view(B, S, H, D)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)  # weightless
        q = apply_rope(q, cis.unsqueeze(2))  # [B,S,H,D]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cis)  # [B,S,D]: the one K=V head

        # Sliding window: the W positions before this step (from the ring) + this step's tokens.
        slots = ctx.slot_ids.unsqueeze(1)
        win_kv = torch.cat([cache.window[slots, ctx.window_idx], kv.to(cache.window.dtype)], dim=1)  # [B,W+S,D]
        cache.window[slots, ctx.window_write] = win_kv[:, -ctx.window_write.shape[1]:]

        qf = q.float() * D ** -0.5
        scores = [torch.einsum("bshd,bkd->bhsk", qf, win_kv.float()).masked_fill(~ctx.window_mask, -math.inf)]
        values = [win_kv]
        if self.compressor is not None:
            self.compressor(x, ctx, cache.kv_state, cache.gate_state, cache.entries, ctx.inv_freq["compress"])
            if self.indexer is not None:  # the indexer's keys come from its own (smaller) compressor
                self.indexer.compressor(x, ctx, cache.index_kv_state, cache.index_gate_state,
                                        cache.index_entries, ctx.inv_freq["compress"])
            num_entries = ctx.seq_bound // self.ratio  # the most any row can see (masked per row)
            if num_entries > 0:
                entries = cache.entries[ctx.slot_ids, :num_entries]  # [B,N,D]
                if self.indexer is None:  # HCA: every visible entry
                    visible = _entry_visible(num_entries, self.ratio, ctx.positions)  # [B,S,N]
                    s = torch.einsum("bshd,bnd->bhsn", qf, entries.float())
                    scores.append(s.masked_fill(~visible.unsqueeze(1), -math.inf))
                    values.append(entries)
                else:  # CSA: the indexer's top-k entries per query
                    picked = self.indexer(x, qr, ctx, cache, num_entries)  # [B,S,k]
                    sel = entries[torch.arange(B, device=x.device).view(B, 1, 1), picked.clamp(min=0)]  # [B,S,k,D]
                    s = torch.einsum("bshd,bskd->bhsk", qf, sel.float())
                    scores.append(s.masked_fill((picked < 0).unsqueeze(1), -math.inf))
                    values.append(sel)
        # sink: one extra logit per head with a zero value, i.e. it only enlarges the denominator
        sink = self.attn_sink.view(1, H, 1, 1).expand(B, H, S, 1)
        probs = torch.cat(scores + [sink], dim=-1).softmax(-1)  # [B,H,S,*]
        sizes = [s.shape[-1] for s in scores]
        parts = probs[..., :-1].split(sizes, dim=-1)
        o = torch.einsum("bhsk,bkd->bshd", parts[0], values[0].float())
        if len(values) > 1:
            eq = "bhsn,bnd->bshd" if values[1].dim() == 3 else "bhsk,bskd->bshd"
            o = o + torch.einsum(eq, parts[1], values[1].float())
        o = apply_rope(o, cis.unsqueeze(2), inverse=True).to(x.dtype)  # [B,S,H,D]

        g = self.o_groups
        wo_a = self.wo_a.weight.view(g, -1, H * D // g)  # [g, o_lora, H*D/g]
        u = torch.einsum("bsgi,gri->bsgr", o.reshape(B, S, g, -1), wo_a)  # [B,S,g,o_lora]
        return self.wo_b(u.flatten(2))


# ---------------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------------

class Gate(nn.Module):
    """Router: fp32 logits; hash layers carry tid2eid [V,K], score layers a selection-only bias [E]."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype, device):
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=dtype, device=device))
        if config.is_hash_layer(layer_idx):
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.num_experts_per_tok,
                                                        dtype=torch.int32, device=device))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(E, dtype=torch.float32, device=device))


class SharedExpert(nn.Module):
    """The shared expert: SwiGLU with the same clamp as the routed experts (as the official reference does)."""

    def __init__(self, dim: int, inter: int, limit: float, dtype, device):
        super().__init__()
        self.limit = limit
        self.w1 = _linear(dim, inter, dtype, device)
        self.w2 = _linear(inter, dim, dtype, device)
        self.w3 = _linear(dim, inter, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        g = self.w1(x).float().clamp(max=self.limit)
        u = self.w3(x).float().clamp(-self.limit, self.limit)
        return self.w2((F.silu(g) * u).to(x.dtype))


EXPERT_DTYPES = ("bf16", "fp8", "fp4")  # "bf16": unquantised, in the model dtype (fp32 on the CPU)


class RoutedExperts(nn.Module):
    """Routed experts, slot-stacked: slot p of this rank holds physical expert slot_offset + p.

    expert_dtype (the release's formats, kept as stored; kernels.moe_experts dequantises in registers):
    * "bf16": w1, w3 [P_local, I, d], w2 [P_local, d, I] in the model dtype, no scales;
    * "fp8":  the same shapes in float8_e4m3fn, plus w1_scale, w3_scale [P_local, I/128, d/128] and
      w2_scale [P_local, d/128, I/128] (ceil): one ue8m0 scale per 128x128 block;
    * "fp4":  packed e2m1, two values per uint8 (even input in the low nibble): w1, w3 [P_local, I, d/2],
      w2 [P_local, d, I/2], plus w*_scale [P_local, rows, cols/32]: one ue8m0 scale per 32 inputs.
    Scales are uint8 e8m0 exponent bytes (value 2^(byte - 127)), the release's bytes: 4x smaller than
    fp32, and plain bytes to every mover (NCCL, gloo) and to Triton. Nothing here is trainable.
    """

    def __init__(self, num_local_slots: int, dim: int, inter: int, dtype, device, expert_dtype: str = "bf16"):
        super().__init__()
        if expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype must be one of {EXPERT_DTYPES}, got {expert_dtype!r}")
        self.expert_dtype = expert_dtype
        weight_dtype = {"bf16": dtype, "fp8": torch.float8_e4m3fn, "fp4": torch.uint8}[expert_dtype]
        for name, rows, cols in (("w1", inter, dim), ("w3", inter, dim), ("w2", dim, inter)):
            w_shape, s_shape = kernels.expert_shapes(expert_dtype, rows, cols)  # fp4: cols % 32 == 0
            self.register_parameter(name, nn.Parameter(
                torch.empty(num_local_slots, *w_shape, dtype=weight_dtype, device=device), requires_grad=False))
            if s_shape is not None:
                self.register_parameter(f"{name}_scale", nn.Parameter(
                    torch.empty(num_local_slots, *s_shape, dtype=torch.uint8, device=device), requires_grad=False))

    @property
    def scales(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(w1_scale, w3_scale, w2_scale), or None for unquantised experts."""
        return None if self.expert_dtype == "bf16" else (self.w1_scale, self.w3_scale, self.w2_scale)

    def slot_tensors(self) -> list[Tensor]:
        """Every per-slot tensor, slot-stacked along dim 0: w1, w3, w2, then their scales. fp8 weights
        are returned as uint8 views of the same storage: movers copy and send plain bytes."""
        weights = [self.w1, self.w3, self.w2]
        if self.expert_dtype == "fp8":
            weights = [w.view(torch.uint8) for w in weights]
        return weights + list(self.scales or ())


class MoETimer:
    """Seconds spent in this rank's own routed experts: the number that shows a straggler rank
    under expert parallelism.

    CPU: wall clock. CUDA: the GPU's own clock, read by a one-thread kernel before and after the
    experts (kernels.gpu_clock) into a device counter. That needs no host sync and is captured with
    the rest of a decode step, so every replay of a CUDA graph adds its own expert time (CUDA events
    recorded inside a graph cannot be read per replay without a sync). `take_seconds()` returns the
    seconds since the last take as a [1] float64 tensor on the timer's device, without waiting.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds, self._t0 = 0.0, 0.0
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:  # fixed buffers: a captured graph keeps their addresses
            self._clock_t0 = torch.zeros(1, dtype=torch.int64, device=self.device)
            self._clock_total = torch.zeros_like(self._clock_t0)  # ns in experts since start
            self._taken = torch.zeros_like(self._clock_t0)        # _clock_total at the last take
            self.on_gpu = self._clock_works()

    def _clock_works(self) -> bool:
        """A Triton without the global-timer intrinsic must not take the server down: timing is off."""
        try:
            kernels.gpu_clock(self._clock_t0, self._clock_total, stop=False)
            kernels.gpu_clock(self._clock_t0, self._clock_total, stop=True)
            torch.cuda.synchronize(self.device)
            self._clock_total.zero_()
            return True
        except Exception as error:  # noqa: BLE001 - compile or launch failure of the clock kernel
            logging.getLogger("dsv4.model").warning("GPU MoE timer unavailable (%s): per-rank MoE seconds stay 0",
                                                    error)
            return False

    def start(self, device: torch.device) -> None:
        if device.type != "cuda":
            self._t0 = time.perf_counter()
        elif self.on_gpu:
            kernels.gpu_clock(self._clock_t0, self._clock_total, stop=False)

    def stop(self, device: torch.device) -> None:
        if device.type != "cuda":
            self.seconds += time.perf_counter() - self._t0
        elif self.on_gpu:
            kernels.gpu_clock(self._clock_t0, self._clock_total, stop=True)

    def take_seconds(self) -> Tensor:
        """[1] float64 seconds since the last take, on the timer's device (queued, not waited for)."""
        if self.on_gpu:
            delta = (self._clock_total - self._taken).double() / 1e9
            self._taken.copy_(self._clock_total)
            return delta
        seconds, self.seconds = self.seconds, 0.0
        return torch.tensor([seconds], dtype=torch.float64, device=self.device)

    def take(self) -> float:
        """Seconds since the last take (on CUDA this waits for the timed GPU work)."""
        return float(self.take_seconds())


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, num_local_slots: int, slot_offset: int, dtype, device,
                 expert_dtype: str = "bf16"):
        super().__init__()
        self.is_hash = config.is_hash_layer(layer_idx)
        self.top_k, self.scale = config.num_experts_per_tok, config.routed_scaling_factor
        self.limit, self.slot_offset = config.swiglu_limit, slot_offset
        self.gate = Gate(config, layer_idx, dtype, device)
        self.experts = RoutedExperts(num_local_slots, config.hidden_size, config.moe_intermediate_size, dtype, device,
                                     expert_dtype)
        self.shared_experts = SharedExpert(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit, dtype, device)

    def route(self, x: Tensor, ctx: ForwardContext, layer_idx: int, load: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [T,d] -> (weights [T,K] fp32, PHYSICAL slot ids [T,K] int32); adds each valid choice to
        `load` [P] when given. Also what dashboard.RouteRecorder replays (with load=None) to show a
        token's route."""
        logits = linear_fp32(x, self.gate.weight)  # [T,E] fp32
        # the routing kernel is the one place that counts load: each valid (token, k) choice adds 1
        route = (ctx.log2phy[layer_idx], ctx.logcnt[layer_idx], load, ctx.num_valid_tokens)
        if self.is_hash:
            return kernels.hash_topk(logits, ctx.input_ids.reshape(-1), self.gate.tid2eid, self.scale, *route)
        return kernels.score_topk(logits, self.gate.bias, self.top_k, self.scale, *route)

    def forward(self, x: Tensor, ctx: ForwardContext, layer_idx: int) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T,d], T = B*S row-major (the replica hash's token index)
        load = ctx.load[layer_idx] if ctx.load is not None else None  # [P]: this layer's counts
        weights, ids = self.route(x, ctx, layer_idx, load)
        e = self.experts
        if ctx.moe_timer is not None:
            ctx.moe_timer.start(x.device)
        routed = kernels.moe_experts(x, weights, ids, e.w1, e.w3, e.w2, self.limit, slot_offset=self.slot_offset,
                                     scales=e.scales)
        if ctx.moe_timer is not None:
            ctx.moe_timer.stop(x.device)
        if ctx.ep_group is not None:  # each rank summed its own slots' share
            torch.distributed.all_reduce(routed, group=ctx.ep_group)
        return (routed + self.shared_experts(x).float()).to(x.dtype).view(shape)


# ---------------------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, num_local_slots: int, slot_offset: int, dtype, device,
                 expert_dtype: str = "bf16"):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.hc_iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.attn = Attention(config, layer_idx, dtype, device)
        self.ffn = MoE(config, layer_idx, num_local_slots, slot_offset, dtype, device, expert_dtype)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps, device)
        for kind in ("attn", "ffn"):
            self.register_parameter(f"hc_{kind}_fn", nn.Parameter(torch.zeros((2 + n) * n, n * d, device=device)))
            self.register_parameter(f"hc_{kind}_base", nn.Parameter(torch.zeros((2 + n) * n, device=device)))
            self.register_parameter(f"hc_{kind}_scale", nn.Parameter(torch.ones(3, device=device)))

    def forward(self, h: Tensor, ctx: ForwardContext, cache: LayerCache, layer_idx: int) -> Tensor:
        x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                               self.hc_iters, self.hc_eps, self.norm_eps)
        h = hc_post(self.attn(self.attn_norm(x), ctx, cache), h, post, comb)
        x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                               self.hc_iters, self.hc_eps, self.norm_eps)
        return hc_post(self.ffn(self.ffn_norm(x), ctx, layer_idx), h, post, comb)


def slots_split_evenly(num_physical_experts: int, ep_size: int) -> bool:
    """Every rank holds the same number of expert slots (P/G), so slot s lives on rank s // (P/G)."""
    return num_physical_experts % ep_size == 0


class DSV4Model(nn.Module):
    """expert_dtype: how the routed experts are held ("bf16" = the model dtype, "fp8", "fp4": see
    RoutedExperts). Attention, shared experts, router, embeddings stay in `dtype`."""

    def __init__(self, config: ModelConfig, num_physical_experts: int | None = None, ep_rank: int = 0,
                 ep_size: int = 1, dtype=torch.float32, device=None, expert_dtype: str = "bf16"):
        super().__init__()
        c = config
        L, E = c.num_hidden_layers, c.n_routed_experts
        P = E if num_physical_experts is None else num_physical_experts
        if P < E or not slots_split_evenly(P, ep_size) or not 0 <= ep_rank < ep_size:
            raise ValueError(f"need num_physical_experts >= n_routed_experts ({E}), divisible by ep_size "
                             f"({ep_size}), and 0 <= ep_rank < ep_size; got P={P}, ep_rank={ep_rank}")
        self.config, self.num_physical_experts, self.ep_rank, self.ep_size = c, P, ep_rank, ep_size
        self.slots_per_rank = P // ep_size
        self.expert_dtype = expert_dtype
        self.ep_group = None
        self.moe_timer: MoETimer | None = None  # set under expert parallelism (per-rank MoE seconds)
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(c, i, self.slots_per_rank, ep_rank * self.slots_per_rank, dtype, device,
                                          expert_dtype) for i in range(L))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.head = _linear(c.hidden_size, c.vocab_size, dtype, device)
        n = c.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * c.hidden_size, device=device))
        self.hc_head_base = nn.Parameter(torch.zeros(n, device=device))
        self.hc_head_scale = nn.Parameter(torch.ones(1, device=device))
        # expert-location maps (eplb updates them IN PLACE; never reassign)
        self.register_buffer("phy2log", torch.zeros(L, P, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("log2phy", torch.zeros(L, E, P - E + 1, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("logcnt", torch.zeros(L, E, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("inv_freq_main", rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, None).to(device),
                             persistent=False)
        self.register_buffer("inv_freq_compress", rope_inv_freq(c.qk_rope_head_dim, c.compress_rope_theta,
                                                                c.rope_scaling).to(device), persistent=False)
        if device is None or torch.device(device).type != "meta":
            self.reset_expert_maps()

    def reset_expert_maps(self) -> None:
        """Trivial placement (eplb.ExpertLocation.trivial: slot p holds expert p % E), in place."""
        c = self.config
        trivial = ExpertLocation.trivial(c.num_hidden_layers, c.n_routed_experts, self.num_physical_experts,
                                         self.ep_size, device=self.phy2log.device)
        for buffer, value in zip((self.phy2log, self.log2phy, self.logcnt), (trivial.phy2log, trivial.log2phy, trivial.logcnt)):
            buffer.copy_(value)

    def expert_weights(self, layer_idx: int) -> list[Tensor]:
        """Every slot-stacked tensor of the layer's routed experts (weights, then scales if quantised):
        what EPLB moves and fingerprints, so scales always travel with their weights."""
        return self.layers[layer_idx].ffn.experts.slot_tensors()

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        return KVCache(self.config, num_slots, max_seq_len, self.embed.weight.dtype, self.embed.weight.device)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, start_pos: Tensor | None = None, cache: KVCache | None = None,
                slot_ids: Tensor | None = None, load: Tensor | None = None, last_only: bool = False) -> Tensor:
        B, S = input_ids.shape
        device = input_ids.device
        if cache is None:  # stateless full forward = a fresh scratch cache, one slot per row
            if start_pos is not None and bool((start_pos != 0).any()):
                raise ValueError("start_pos must be 0 without a cache")
            cache = self.new_cache(B, S)
            start_pos = slot_ids = None
        start = torch.zeros(B, dtype=torch.long, device=device) if start_pos is None else start_pos.to(device).long()
        slot_ids = torch.arange(B, device=device) if slot_ids is None else slot_ids.to(device).long()
        start_list = start.tolist()  # one host sync per step (free on CPU; DecodeGraphs has none)
        if max(start_list) + S > cache.max_seq_len:
            raise ValueError(f"positions up to {max(start_list) + S} exceed the cache's max_seq_len {cache.max_seq_len}")
        return self.step(input_ids, start, slot_ids, cache, load, last_only,
                         seq_bound=max(start_list) + S, start_list=start_list)

    def step(self, input_ids: Tensor, start: Tensor, slot_ids: Tensor, cache: KVCache, load: Tensor | None,
             last_only: bool, seq_bound: int, start_list: list | None = None,
             num_valid_tokens: Tensor | None = None) -> Tensor:
        """forward() without argument checks or host syncs when S == 1 (what DecodeGraphs captures).

        seq_bound: a Python int >= start + S for every row (compressed layers attend over entries
        [0, seq_bound // m), masked per row). num_valid_tokens: see ForwardContext. start_list: prefill only.
        """
        B, S = input_ids.shape
        device = input_ids.device
        if S > 1 and start_list is None:
            start_list = start.tolist()  # the prefill compressor decides on the host which windows complete
        positions = start.unsqueeze(1) + torch.arange(S, device=device)  # [B,S]
        inv_freq = {"main": self.inv_freq_main, "compress": self.inv_freq_compress}
        W = self.config.sliding_window
        ring_pos = start.unsqueeze(1) - W + torch.arange(W, device=device)  # [B,W]
        key_pos = torch.cat([ring_pos, positions], dim=1).unsqueeze(1)  # [B,1,W+S]
        t = positions.unsqueeze(-1)  # [B,S,1]
        window_mask = ((key_pos <= t) & (key_pos > t - W) & (key_pos >= 0)).unsqueeze(1)  # [B,1,S,W+S]
        ctx = ForwardContext(input_ids=input_ids, positions=positions, start=start, start_list=start_list,
                      seq_bound=seq_bound, slot_ids=slot_ids,
                      rope={k: rope_cis(f, positions) for k, f in inv_freq.items()},
                      window_idx=ring_pos % W, window_mask=window_mask, window_write=positions[:, -min(S, W):] % W,
                      inv_freq=inv_freq, load=load, num_valid_tokens=num_valid_tokens, log2phy=self.log2phy,
                      logcnt=self.logcnt, ep_group=self.ep_group, moe_timer=self.moe_timer)

        h = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)  # [B,S,n,d]: n copies
        for layer_idx, block in enumerate(self.layers):
            h = block(h, ctx, cache.layers[layer_idx], layer_idx)
        if last_only:
            h = h[:, -1:]
        # hc_head: sigmoid-weighted collapse of the n streams (no Sinkhorn)
        flat = h.flatten(-2).float()
        mixes = F.linear(flat, self.hc_head_fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.config.rms_norm_eps)
        pre = torch.sigmoid(mixes * self.hc_head_scale + self.hc_head_base) + self.config.hc_eps  # [B,S,n]
        y = (pre.unsqueeze(-1) * h.float()).sum(-2).to(h.dtype)  # [B,S,d]
        logits = linear_fp32(self.norm(y), self.head.weight)  # fp32 [B,S,V]
        return logits[:, 0] if last_only else logits

    def logits(self, input_ids: Tensor) -> Tensor:
        return self.forward(input_ids)



# ---------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------

class LayerCache:
    """One layer's attention state for every slot (fixed storage; nothing grows).

    window [slots, W, D]: ring of the last W kv (slot = position mod W).
    entries [slots, max_seq_len // m, D]: compressed entries by window index (m > 0 layers).
    kv_state / gate_state [slots, coff*m, coff*D] fp32: compressor projections of the last coff*m
    tokens (partial window, plus the previous window for CSA's overlap); gate -inf = empty.
    index_*: the same for the CSA indexer's own compressor (keys of dim index_head_dim).
    """

    def __init__(self, config: ModelConfig, layer_idx: int, num_slots: int, max_seq_len: int, dtype, device):
        D, W, m = config.head_dim, config.sliding_window, config.layer_ratio(layer_idx)
        self.window = torch.zeros(num_slots, W, D, dtype=dtype, device=device)
        self.entries = self.kv_state = self.gate_state = None
        self.index_entries = self.index_kv_state = self.index_gate_state = None
        if m:
            c = 2 if m == 4 else 1
            # at least one row: the one-token path writes (back) some entry even before any is complete
            self.entries = torch.zeros(num_slots, max(1, max_seq_len // m), D, dtype=dtype, device=device)
            self.kv_state = torch.zeros(num_slots, c * m, c * D, device=device)
            self.gate_state = torch.full((num_slots, c * m, c * D), -math.inf, device=device)
        if m == 4:
            Di = config.index_head_dim
            self.index_entries = torch.zeros(num_slots, max(1, max_seq_len // m), Di, dtype=dtype, device=device)
            self.index_kv_state = torch.zeros(num_slots, 2 * m, 2 * Di, device=device)
            self.index_gate_state = torch.full((num_slots, 2 * m, 2 * Di), -math.inf, device=device)

    def reset(self, slot: int) -> None:
        for t in (self.window, self.entries, self.kv_state, self.index_entries, self.index_kv_state):
            if t is not None:
                t[slot] = 0
        for t in (self.gate_state, self.index_gate_state):
            if t is not None:
                t[slot] = -math.inf


class KVCache:
    """Per-slot DSV4 attention state for all layers. A slot serves one sequence; reset it before reuse.

    Slots 0 .. num_slots-1 are for requests. One more, `scratch_slot` (= num_slots), is where
    DecodeGraphs' padded batch rows read and write, so they never touch a request's state.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int, dtype=torch.float32, device=None):
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.scratch_slot = num_slots
        self.layers = [LayerCache(config, i, num_slots + 1, max_seq_len, dtype, device)
                       for i in range(config.num_hidden_layers)]

    def reset(self, slot: int) -> None:
        for layer in self.layers:
            layer.reset(slot)


@torch.inference_mode()
def generate(model: DSV4Model, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding through the KV cache: prefill the prompt, then one token per step."""
    B, S = input_ids.shape
    cache = model.new_cache(B, S + max_new_tokens)
    slots = torch.arange(B, device=input_ids.device)
    start = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    tokens = [input_ids]
    logits = model.forward(input_ids, start, cache, slots, last_only=True)  # [B,V]
    for step in range(max_new_tokens):
        next_token = logits.argmax(-1, keepdim=True)  # [B,1]
        tokens.append(next_token)
        if step + 1 < max_new_tokens:
            logits = model.forward(next_token, start + S + step, cache, slots, last_only=True)
    return torch.cat(tokens, dim=1)
