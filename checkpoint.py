"""DSV4 checkpoints <-> a state dict under the official DeepSeek tensor names.

The official names (DeepSeek's ``inference/model.py`` module tree, e.g. ``layers.3.attn.wq_a.weight``,
``layers.3.ffn.experts.17.w1.weight``) are the one naming this project uses in memory. On disk we accept:

* the official release: FP8 e4m3 weights with a ue8m0 128x128 block scale in the sibling key
  ``<module>.scale``, packed FP4 e2m1 routed experts (int8, one ue8m0 scale per 32 inputs), I64 ``tid2eid``;
* Hugging Face transformers' DSV4 names (``model.layers.3.self_attn.q_a_proj.weight``, fused
  ``mlp.experts.gate_up_proj [E, 2I, d]`` ...), i.e. a ``DeepseekV4ForCausalLM.state_dict()``;
* what transformers 5.24's ``save_pretrained`` writes: its reverse conversion gives official names under a
  ``model.`` prefix, except ``embed_tokens`` and ``hc_head.hc_*`` (left in HF form, their patterns are
  anchored at the unprefixed name) and the attention ``kv_norm``, which comes out as ``attn.norm`` (HF maps
  both ``attn.kv_norm`` and ``compressor.norm`` to ``kv_norm`` and reverses both to ``norm``).

Quantised tensors are dequantised at read time, except the routed experts when the caller asks to keep them
(``read_checkpoint(..., keep_quantized_experts=True)``): those come back as stored, weight + ``.scale``, for a
model that holds its experts quantised (dsv4_mini.RoutedExperts). Attention, shared-expert and other FP8
weights are always dequantised: they are ~5% of a layer's bytes, and the dense kernels run in bf16.

Shapes: d hidden, V vocab, E routed experts, K top-k, I moe_intermediate_size.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = 128  # weight_block_size [128, 128] of the release
FP4_BLOCK = 32  # one ue8m0 scale per 32 inputs of a packed FP4 expert weight
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1
# e2m1 code -> value; code bit 3 is the sign (so code 8 is -0)
FP4_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                          -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------

# (official, transformers) for the model-level tensors.
_GLOBAL_NAMES = [
    ("embed.weight", "embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "norm.weight"),
    ("hc_head_fn", "hc_head.hc_fn"),
    ("hc_head_base", "hc_head.hc_base"),
    ("hc_head_scale", "hc_head.hc_scale"),
]
# (official, transformers) for every tensor of layers.L except the routed experts. Derived from
# transformers' conversion_mapping["deepseek_v4"] and checked against a real model's state_dict names.
_LAYER_NAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
]
_HF_GATE_UP = "mlp.experts.gate_up_proj"  # [E, 2I, d] = cat(w1, w3) per expert
_HF_DOWN = "mlp.experts.down_proj"  # [E, d, I] = w2 per expert
# Keys transformers' save_pretrained writes that are neither official nor its own module names.
_HF_SAVED_ALIASES = {"attn.norm.weight": "attn.kv_norm.weight"}

_GLOBAL_TO_OFFICIAL = {hf: off for off, hf in _GLOBAL_NAMES}
_GLOBAL_TO_OFFICIAL.update({off: off for off, _ in _GLOBAL_NAMES})
_LAYER_TO_OFFICIAL = {hf: off for off, hf in _LAYER_NAMES}
_LAYER_TO_OFFICIAL.update({off: off for off, _ in _LAYER_NAMES})
_LAYER_TO_OFFICIAL.update(_HF_SAVED_ALIASES)
_OFFICIAL_TO_HF_GLOBAL = dict(_GLOBAL_NAMES)
_OFFICIAL_TO_HF_LAYER = dict(_LAYER_NAMES)

_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)")
# Tensors kept fp32 whatever dtype the caller asks for (the reference holds them in fp32).
_FP32_RE = re.compile(r"(^|\.)(hc_\w+|attn_sink|ape|gate\.bias|\w*norm\.weight)$")


def layer_of(name: str) -> int | None:
    """Layer index of ``layers.L.…`` (optionally ``model.``-prefixed), else None."""
    m = _LAYER_RE.match(name[6:] if name.startswith("model.") else name)
    return int(m.group(1)) if m else None


def to_official_name(name: str) -> str | None:
    """One stored name (official, transformers, or transformers-saved) -> its official name.

    Returns None for names that expand to several tensors (the fused HF expert stacks, see
    ``_split_hf_experts``). ``.scale`` keys map to the ``.scale`` of the mapped ``.weight``.
    Raises ValueError for a name that is none of these.
    """
    base = name[6:] if name.startswith("model.") else name
    # ``<module>.scale`` is the quantisation sibling of ``<module>.weight``; the hyper-connection scales
    # (official ``hc_attn_scale``, HF ``attn_hc.scale``) are parameters. Official names of the latter never
    # end in ".scale", so after this function ".scale" means "quantisation scale".
    if base.endswith(".scale") and not base.endswith(("attn_hc.scale", "ffn_hc.scale")):
        off = to_official_name(base[: -len("scale")] + "weight")
        if off is None:
            raise ValueError(f"unknown DSV4 tensor name {name!r} (a scale of a fused expert stack)")
        return off[: -len("weight")] + "scale"
    if base in _GLOBAL_TO_OFFICIAL:
        return _GLOBAL_TO_OFFICIAL[base]
    m = _LAYER_RE.match(base)
    if m:
        layer, rest = m.groups()
        if rest in _LAYER_TO_OFFICIAL:
            return f"layers.{layer}.{_LAYER_TO_OFFICIAL[rest]}"
        if _EXPERT_RE.fullmatch(rest):
            return base
        if rest in (_HF_GATE_UP, _HF_DOWN):
            return None
    raise ValueError(f"unknown DSV4 tensor name {name!r} (neither an official nor a transformers name)")


def _split_hf_experts(base: str, t: Tensor) -> dict[str, Tensor]:
    """``layers.L.mlp.experts.gate_up_proj [E, 2I, d]`` -> per-expert ``w1, w3 [I, d]``;
    ``layers.L.mlp.experts.down_proj [E, d, I]`` -> per-expert ``w2 [d, I]``."""
    layer = layer_of(base)
    out = {}
    if base.endswith(_HF_GATE_UP):
        if t.dim() != 3 or t.shape[1] % 2:
            raise ValueError(f"{base}: expected [E, 2I, d], got {list(t.shape)}")
        w1, w3 = t.chunk(2, dim=1)
        for e in range(t.shape[0]):
            # clone: independent storage, so the dict can be written back with safetensors
            out[f"layers.{layer}.ffn.experts.{e}.w1.weight"] = w1[e].clone()
            out[f"layers.{layer}.ffn.experts.{e}.w3.weight"] = w3[e].clone()
    else:
        if t.dim() != 3:
            raise ValueError(f"{base}: expected [E, d, I], got {list(t.shape)}")
        for e in range(t.shape[0]):
            out[f"layers.{layer}.ffn.experts.{e}.w2.weight"] = t[e].clone()
    return out


def official_to_hf_state_dict(sd: Mapping[str, Tensor], config=None) -> dict[str, Tensor]:
    """Official-name state dict -> ``DeepseekV4ForCausalLM.state_dict()`` names (with ``model.``).

    The exact inverse of ``read_checkpoint``'s transformers-name path: per-expert ``w1, w3 [I, d]`` are
    stacked into ``gate_up_proj [E, 2I, d]``, ``w2 [d, I]`` into ``down_proj [E, d, I]``; ``tid2eid``
    goes back to int64 (HF's buffer dtype). Quantised (``.scale``) and ``mtp.*`` entries are rejected /
    dropped: dequantise first. ``config`` (anything with ``n_routed_experts``, or None) checks that every
    layer has all E experts.
    """
    num_experts = (config.get("n_routed_experts") if isinstance(config, Mapping)
                   else getattr(config, "n_routed_experts", None))
    out: dict[str, Tensor] = {}
    experts: dict[int, dict[int, dict[str, Tensor]]] = {}  # layer -> expert -> {w1,w2,w3}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".scale"):
            raise ValueError(f"{name}: quantised tensor; dequantise before converting to transformers names")
        if name in _OFFICIAL_TO_HF_GLOBAL:
            prefix = "" if name == "head.weight" else "model."
            out[prefix + _OFFICIAL_TO_HF_GLOBAL[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if not m:
            raise ValueError(f"unknown official DSV4 tensor name {name!r}")
        layer, rest = int(m.group(1)), m.group(2)
        if rest in _OFFICIAL_TO_HF_LAYER:
            if rest == "ffn.gate.tid2eid":
                t = t.to(torch.int64)
            out[f"model.layers.{layer}.{_OFFICIAL_TO_HF_LAYER[rest]}"] = t
            continue
        em = _EXPERT_RE.fullmatch(rest)
        if not em:
            raise ValueError(f"unknown official DSV4 tensor name {name!r}")
        experts.setdefault(layer, {}).setdefault(int(em.group(1)), {})[em.group(2)] = t
    for layer, per in sorted(experts.items()):
        n = len(per) if num_experts is None else num_experts
        if sorted(per) != list(range(n)) or any(len(w) != 3 for w in per.values()):
            raise ValueError(f"layer {layer}: experts incomplete (have {sorted(per)}, expected 0..{n - 1} "
                             "each with w1, w2, w3)")
        out[f"model.layers.{layer}.{_HF_GATE_UP}"] = torch.stack(
            [torch.cat([per[e]["w1"], per[e]["w3"]], dim=0) for e in range(n)])
        out[f"model.layers.{layer}.{_HF_DOWN}"] = torch.stack([per[e]["w2"] for e in range(n)])
    return out


# ---------------------------------------------------------------------------------------------------
# Quantisation formats
# ---------------------------------------------------------------------------------------------------

def _pow2_scale(amax: Tensor, qmax: float) -> Tensor:
    """Smallest power of two s with amax / s <= qmax (fp32, exact; 1 for all-zero blocks).

    e8m0 holds 2^-127 … 2^127, so the exponent is clamped there."""
    ratio = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)  # exact power of two: no need to round up
    return torch.ldexp(torch.ones_like(ratio), exp.clamp(-127, 127))


def _to_e8m0(scale: Tensor) -> Tensor:
    """Exact powers of two (fp32, from _pow2_scale) -> float8_e8m0fnu, by their exponent bits: a view,
    so no e8m0 conversion kernel is needed on any device (2^-127 is the fp32 subnormal with field 0)."""
    return ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8).view(torch.float8_e8m0fnu)


def scale_values(scale: Tensor) -> Tensor:
    """A ue8m0 scale (float8_e8m0fnu, or its uint8 exponent bytes) as fp32 values 2^(byte - 127); a float
    scale as fp32. Computed with ldexp, so it runs wherever fp32 does."""
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        exponent = scale.view(torch.uint8).to(torch.int32) - 127
        return torch.ldexp(torch.ones(exponent.shape, device=scale.device), exponent)
    return scale.float()


def _block_expand(scale: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """[ceil(m/bm), ceil(n/bn)] per-block values -> [m, n] (edge blocks may be partial)."""
    s = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return s[: shape[0], : shape[1]]


def quantize_fp8_blockwise(w: Tensor, block: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """w [m, n] float -> (q float8_e4m3fn [m, n], scale float8_e8m0fnu [ceil(m/128), ceil(n/128)]).

    Power-of-two (ue8m0) block scales as in the release; w ≈ q * scale over each 128x128 block."""
    m, n = w.shape
    bm, bn = math.ceil(m / block), math.ceil(n / block)
    wf = w.float()
    padded = torch.zeros(bm * block, bn * block, device=w.device)
    padded[:m, :n] = wf.abs()
    amax = padded.view(bm, block, bn, block).amax(dim=(1, 3))
    scale = _pow2_scale(amax, FP8_MAX)
    q = (wf / _block_expand(scale, (m, n), (block, block))).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), _to_e8m0(scale)


def dequantize_fp8_blockwise(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q float8_e4m3fn [m, n], scale e8m0 / uint8 e8m0 bytes / float [ceil(m/128), ceil(n/128)] -> [m, n] dtype."""
    m, n = q.shape
    bm, bn = math.ceil(m / FP8_BLOCK), math.ceil(n / FP8_BLOCK)
    if tuple(scale.shape) != (bm, bn):
        raise ValueError(f"FP8 scale shape {list(scale.shape)} does not fit weight {[m, n]} "
                         f"(expected {[bm, bn]} for {FP8_BLOCK}x{FP8_BLOCK} blocks)")
    w = q.float() * _block_expand(scale_values(scale), (m, n), (FP8_BLOCK, FP8_BLOCK))
    return w.to(dtype)


def quantize_fp4_packed(w: Tensor, block: int = FP4_BLOCK) -> tuple[Tensor, Tensor]:
    """w [m, n] float (n % 32 == 0) -> (packed int8 [m, n/2], scale float8_e8m0fnu [m, n/32]).

    Each value is rounded to the nearest e2m1 value of w / scale; element 2j goes to the low nibble of
    byte j, element 2j+1 to the high nibble (the release's layout)."""
    m, n = w.shape
    if n % block:
        raise ValueError(f"FP4 packing needs the input dim to be a multiple of {block}, got {n}")
    wf = w.float().view(m, n // block, block)
    scale = _pow2_scale(wf.abs().amax(dim=-1), FP4_MAX)  # [m, n/32]
    x = (wf / scale.unsqueeze(-1)).reshape(m, n)
    mags = FP4_TABLE[:8].to(w.device)
    code = (x.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # nearest magnitude (ties -> smaller)
    code = code | ((x < 0).long() << 3)
    code = code.to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), _to_e8m0(scale)


def dequantize_fp4_packed(packed: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """packed int8 / uint8 [m, n/2] (or float4_e2m1fn_x2), scale e8m0 / uint8 e8m0 bytes / float [m, n/32]
    -> [m, n] dtype."""
    m, half = packed.shape
    n = 2 * half
    if tuple(scale.shape) != (m, n // FP4_BLOCK) or n % FP4_BLOCK:
        raise ValueError(f"FP4 scale shape {list(scale.shape)} does not fit packed weight {[m, half]} "
                         f"(expected {[m, n // FP4_BLOCK]}: one scale per {FP4_BLOCK} inputs)")
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).view(m, n)  # low nibble = even element
    w = FP4_TABLE.to(packed.device)[codes].view(m, n // FP4_BLOCK, FP4_BLOCK) * scale_values(scale).unsqueeze(-1)
    return w.view(m, n).to(dtype)


def dequantize(name: str, w: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Dequantise ``name`` by its stored dtype: float8_e4m3fn -> FP8 128x128 blocks; int8 /
    float4_e2m1fn_x2 -> packed FP4 (1x32 blocks)."""
    if w.dtype == torch.float8_e4m3fn:
        fn = dequantize_fp8_blockwise
    elif w.dtype in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.int8)):
        fn = dequantize_fp4_packed
    else:
        raise ValueError(f"{name}: has a .scale but dtype {w.dtype} is neither FP8 e4m3 nor packed FP4")
    if w.dim() != 2:
        raise ValueError(f"{name}: quantised weights must be 2-D, got {list(w.shape)}")
    try:
        return fn(w, scale, dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def quantized_format(w: Tensor) -> str:
    """"fp8" (float8_e4m3fn), "fp4" (packed e2m1: int8 / uint8 / float4_e2m1fn_x2) or "bf16" (a plain float)."""
    if w.dtype == torch.float8_e4m3fn:
        return "fp8"
    if w.dtype in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.int8)):
        return "fp4"
    return "bf16"


def e8m0_bytes(scale: Tensor) -> Tensor:
    """A ue8m0 scale as its exponent bytes (uint8, value 2^(byte - 127)): e8m0 / uint8 are viewed, float
    scales (some converters store fp32) must be exact powers of two."""
    if scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return scale.view(torch.uint8)
    mant, exp = torch.frexp(scale.float())
    if not bool(((mant == 0.5) & (exp - 1 >= -127) & (exp - 1 <= 127)).all()):
        raise ValueError("a ue8m0 scale must hold powers of two in [2^-127, 2^127]")
    return (exp - 1 + 127).to(torch.uint8)


def routed_expert_key(name: str) -> bool:
    """``layers.L.ffn.experts.E.w{1,2,3}.{weight,scale}``: a routed expert tensor (official name)."""
    m = _LAYER_RE.match(name)
    return bool(m and _EXPERT_RE.fullmatch(m.group(2)))


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def _shard_map(path: str) -> dict[str, str]:
    """path (dir with index / dir with *.safetensors / one file) -> {stored key: shard file}."""

    if not os.path.exists(path):
        raise ValueError(f"checkpoint path {path!r} does not exist")
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
            # Shards are checked for existence by the reader, and only those it needs: a truncated load
            # works with just the first shards of a big checkpoint downloaded.
            return {k: os.path.join(path, s) for k, s in weight_map.items()}
        shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"no *.safetensors files and no {INDEX_FILE} in {path}")
    else:
        shards = [path]
    out: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard}: not a safetensors file ({e})") from None
        for k in keys:
            if k in out:
                raise ValueError(f"tensor {k!r} is stored in both {out[k]} and {shard}")
            out[k] = shard
    return out


def _finish(name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast one plain (unquantised) tensor to its in-memory dtype."""
    if name.endswith("tid2eid"):
        return t.to(torch.int32)
    if t.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8):
        raise ValueError(f"{name}: quantised dtype {t.dtype} but no {name[:-len('weight')]}scale in the checkpoint")
    return t.to(torch.float32 if _FP32_RE.search(name) else dtype)


def read_checkpoint(path: str, num_layers: int | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = True, keep_quantized_experts: bool = False) -> dict[str, Tensor]:
    """Read a DSV4 checkpoint into an official-name state dict of plain tensors.

    path: a directory holding ``model.safetensors.index.json`` + shards, or ``*.safetensors`` files, or one
    ``.safetensors`` file. Names may be official or transformers' (see module doc); a leading ``model.`` is
    dropped. FP8 / packed-FP4 weights are dequantised with their ``.scale``; ``tid2eid`` becomes int32;
    ``hc_*``, ``attn_sink``, ``ape``, ``gate.bias`` stay fp32; everything else is cast to ``dtype``.
    ``num_layers``: keep layers < N only; other layers' bytes are never read (safetensors ``safe_open``
    maps tensors lazily). ``mtp.*`` is skipped. Raises ValueError on a malformed checkpoint.
    ``keep_quantized_experts``: routed experts stored quantised stay as stored (``….weight`` FP8 / packed FP4
    and ``….scale``), for a model that keeps them quantised; everything else is dequantised as above.
    """

    shard_of = _shard_map(path)
    wanted: dict[str, list[str]] = {}  # shard -> stored keys to read
    for key, shard in shard_of.items():
        base = key[6:] if key.startswith("model.") else key
        if base.startswith("mtp."):
            continue
        layer = layer_of(base)
        if num_layers is not None and layer is not None and layer >= num_layers:
            continue
        wanted.setdefault(shard, []).append(key)

    missing = sorted(os.path.basename(s) for s in wanted if not os.path.isfile(s))
    if missing:
        raise ValueError(f"shard(s) listed in {INDEX_FILE} but missing from {path}: {missing}")
    out: dict[str, Tensor] = {}
    pending: dict[str, Tensor] = {}  # quantised weights / scales waiting for their partner (other shard)
    # modules that have a .scale: their .weight is quantised (pairing works across shards)
    quantised = {off[: -len(".scale")] for keys in wanted.values() for off in map(to_official_name, keys)
                 if off is not None and off.endswith(".scale")}

    def put(name: str, t: Tensor):
        if name in out or name in pending:
            raise ValueError(f"two stored tensors map to {name!r}")
        module, _, kind = name.rpartition(".")
        if kind == "scale" or (kind == "weight" and module in quantised):
            pending[name] = t
            if module + ".weight" in pending and module + ".scale" in pending:
                w, s = pending.pop(module + ".weight"), pending.pop(module + ".scale")
                if keep_quantized_experts and routed_expert_key(module + ".weight"):
                    out[module + ".weight"], out[module + ".scale"] = w, s
                else:
                    out[module + ".weight"] = dequantize(module + ".weight", w, s, dtype)
        else:
            out[name] = _finish(name, t, dtype)

    bar = tqdm(total=sum(len(k) for k in wanted.values()), desc="read checkpoint", unit="tensor",
               disable=not progress)
    for shard, keys in sorted(wanted.items()):
        try:
            f = safe_open(shard, "pt")
        except Exception as e:  # SafetensorError / OSError: a corrupt or foreign file
            raise ValueError(f"{shard}: not a safetensors file ({e})") from None
        with f:
            have = set(f.keys())
            for key in keys:
                if key not in have:
                    raise ValueError(f"tensor {key!r} is listed in the index but missing from {shard}")
                t = f.get_tensor(key)
                bar.update(1)
                off = to_official_name(key)
                if off is None:  # a fused transformers expert stack
                    for k, v in _split_hf_experts(key[6:] if key.startswith("model.") else key, t).items():
                        put(k, v)
                else:
                    put(off, t)
    bar.close()
    if pending:  # only scales can be left: a weight waits only if its scale exists
        name = sorted(pending)[0]
        raise ValueError(f"scale {name!r} has no weight {name[: -len('scale')] + 'weight'!r} in the checkpoint")
    return out


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def write_checkpoint(directory: str, state_dict: Mapping[str, Tensor],
                     max_shard_bytes: int = 4 * 1024**3, metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write ``state_dict`` as safetensors under ``directory``; returns the files written.

    One ``model.safetensors`` if it all fits in ``max_shard_bytes``, else ``model-0000i-of-0000n.safetensors``
    shards (keys in sorted order, greedily packed) plus ``model.safetensors.index.json``. Tensors are
    stored byte for byte (any dtype safetensors knows, incl. fp8 / e8m0), so reading back is bit-identical.
    """

    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    total = 0
    storages: set[int] = set()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu()
        # safetensors refuses tensors sharing storage (views, tied weights): give each its own
        st = t.untyped_storage()
        if (not t.is_contiguous() or st.nbytes() != t.numel() * t.element_size()
                or st.data_ptr() in storages):
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    meta = dict(metadata or {}) | {"format": "pt"}
    if len(shards) == 1:
        file = os.path.join(directory, "model.safetensors")
        save_file(shards[0], file, metadata=meta)
        return [file]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata=meta)
        files.append(os.path.join(directory, fname))
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return files


def quantize_state_dict(sd: Mapping[str, Tensor], fp8: Iterable[str] = (), fp4: Iterable[str] = ()
                        ) -> dict[str, Tensor]:
    """Official-name state dict -> the release's on-disk formats for the named ``.weight`` keys:
    ``fp8`` names get e4m3 + 128x128 ue8m0 ``.scale``, ``fp4`` names packed e2m1 + 1x32 ue8m0 ``.scale``;
    ``tid2eid`` is stored as int64 like the release. Everything else is passed through."""
    fp8, fp4 = set(fp8), set(fp4)
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name in fp8 or name in fp4:
            q, s = (quantize_fp8_blockwise if name in fp8 else quantize_fp4_packed)(t)
            out[name], out[name[: -len("weight")] + "scale"] = q, s
        elif name.endswith("tid2eid"):
            out[name] = t.to(torch.int64)
        else:
            out[name] = t
    return out
