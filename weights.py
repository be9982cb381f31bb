"""Weights of a dsv4-mini model: random init, build, checkpoint load and save.

Sits above the model (dsv4_mini.py) and the file format (checkpoint.py); neither imports it.

* `build_model`: a model with deterministic random weights under official names (the built-in
  presets need no download). Every tensor has its own generator seeded from its official name, so
  the weights do not depend on the expert placement, the EP rank or the device.
* `load_model`: a checkpoint directory (config.json + safetensors, official or transformers names).
* `official_state_dict` / `load_official_state_dict` / `save_pretrained`: between the model's
  slot-stacked routed experts (`layers.L.ffn.experts.w1 [P_local, I, d]`) and the official
  per-expert tensors (`layers.L.ffn.experts.E.w1.weight`): expert E goes into every slot holding it.

Routed experts may be held quantised (`expert_dtype` "fp8" / "fp4", see dsv4_mini.RoutedExperts):
the random init quantises each expert's fp32 draw with checkpoint's quantisers; a checkpoint's
quantised experts are kept as stored (converted only when the model asks for another format); the
official state dict and save_pretrained give them back in the release's form (`….weight` int8 packed
FP4 or float8_e4m3fn, `….scale` float8_e8m0fnu), so save -> load is bitwise. Attention, shared expert,
router and embeddings are always held dequantised in the model dtype.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from tqdm import tqdm

import checkpoint
import kernels
from dsv4_mini import DSV4Model, ModelConfig, rope_inv_freq

_STACKED_RE = re.compile(r"layers\.(\d+)\.ffn\.experts\.(w[123])(_scale)?")
_EXPERT_KEY_RE = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)")


# ---------------------------------------------------------------------------------------------------
# Official-name state dict
# ---------------------------------------------------------------------------------------------------

def official_state_dict(model: DSV4Model) -> dict[str, Tensor]:
    """Official checkpoint names; routed expert E comes from the first local slot holding it.
    Quantised experts in the release's dtypes: packed FP4 as int8, scales as float8_e8m0fnu (views)."""
    out = {}
    for name, t in model.state_dict().items():
        m = _STACKED_RE.fullmatch(name)
        if not m:
            out[name] = t
            continue
        layer, w, is_scale = int(m.group(1)), m.group(2), m.group(3) is not None
        if is_scale:
            t = t.view(torch.float8_e8m0fnu)
        elif t.dtype == torch.uint8:  # packed FP4
            t = t.view(torch.int8)
        kind = "scale" if is_scale else "weight"
        for expert, slot in _local_slots_of(model, layer).items():
            out[f"layers.{layer}.ffn.experts.{expert}.{w}.{kind}"] = t[slot[0]]
    return out

def _local_slots_of(model: DSV4Model, layer: int) -> dict[int, list[int]]:
    """expert -> local slots holding it on this rank (from phy2log)."""
    offset = model.ep_rank * model.slots_per_rank
    held: dict[int, list[int]] = {}
    for slot, expert in enumerate(model.phy2log[layer, offset:offset + model.slots_per_rank].tolist()):
        held.setdefault(expert, []).append(slot)
    return dict(sorted(held.items()))

def _expert_dense_shape(config: ModelConfig, w: str) -> tuple[int, int]:
    I, d = config.moe_intermediate_size, config.hidden_size
    return (d, I) if w == "w2" else (I, d)


def _stored_problem(config: ModelConfig, key: str, w: str, pair: dict[str, Tensor]) -> str | None:
    """Why one stored expert matrix ({"weight": …, "scale": …} as stored) does not fit, else None."""
    if "weight" not in pair:
        return f"missing: {key}.weight (have its .scale)"
    weight, scale = pair["weight"], pair.get("scale")
    fmt = "bf16" if scale is None else checkpoint.quantized_format(weight)
    if scale is not None and fmt == "bf16":
        return f"mis-shaped: {key}.weight: {weight.dtype} with a .scale is neither FP8 nor packed FP4"
    w_shape, s_shape = kernels.expert_shapes(fmt, *_expert_dense_shape(config, w))
    if tuple(weight.shape) != w_shape:
        return f"mis-shaped: {key}.weight: {list(weight.shape)} != {list(w_shape)} ({fmt})"
    if scale is not None and tuple(scale.shape) != s_shape:
        return f"mis-shaped: {key}.scale: {list(scale.shape)} != {list(s_shape)} ({fmt})"
    return None


def quantize_expert(dense: Tensor, expert_dtype: str) -> tuple[Tensor, Tensor]:
    """[rows, cols] float -> (weight, uint8 e8m0 scale) as RoutedExperts holds them (on dense's device)."""
    if expert_dtype == "fp4":
        q, scale = checkpoint.quantize_fp4_packed(dense)
        q = q.view(torch.uint8)
    else:
        q, scale = checkpoint.quantize_fp8_blockwise(dense)
    return q, scale.view(torch.uint8)


def expert_in_format(weight: Tensor, scale: Tensor | None, expert_dtype: str, dtype) -> tuple[Tensor, Tensor | None]:
    """One stored expert matrix (dense, or quantised with its scale) -> RoutedExperts' format: kept
    bitwise when the formats agree, else dequantised (fp32) and, for a quantised target, re-quantised."""
    stored = "bf16" if scale is None else checkpoint.quantized_format(weight)
    if stored == expert_dtype:
        if stored == "bf16":
            return weight, None
        return (weight.view(torch.uint8) if stored == "fp4" else weight), checkpoint.e8m0_bytes(scale)
    dense = weight if scale is None else checkpoint.dequantize("expert", weight, scale, torch.float32)
    if expert_dtype == "bf16":
        return dense.to(dtype), None
    return quantize_expert(dense.float(), expert_dtype)


@torch.no_grad()
def load_official_state_dict(model: DSV4Model, sd: dict[str, Tensor]) -> None:
    """Copy an official-name state dict in; expert E goes into every local slot holding E.

    `mtp.*` is ignored; tid2eid is cast to int32. Routed experts may be dense or quantised (weight +
    `.scale`), each converted to the model's expert_dtype (expert_in_format). Experts held by no
    local slot may be present or absent. Raises ONE ValueError listing every missing, unexpected and
    mis-shaped key.
    """
    own = model.state_dict()
    problems, plain = [], {}
    experts: dict[tuple[int, str], dict[int, dict[str, Tensor]]] = {}  # (layer, w) -> expert -> {kind: t}
    E = model.config.n_routed_experts
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        m = _EXPERT_KEY_RE.fullmatch(name)
        if m and int(m.group(1)) < len(model.layers) and int(m.group(2)) < E:
            experts.setdefault((int(m.group(1)), m.group(3)), {}).setdefault(int(m.group(2)), {})[m.group(4)] = t
        elif name in own and not _STACKED_RE.fullmatch(name):
            plain[name] = t
        else:
            problems.append(f"unexpected: {name}")
    for name, target in own.items():
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            if name not in plain:
                problems.append(f"missing: {name}")
            elif plain[name].shape != target.shape:
                problems.append(f"mis-shaped: {name}: {list(plain[name].shape)} != {list(target.shape)}")
            continue
        if m.group(3):  # a scale: checked and loaded with its weight
            continue
        layer, w = int(m.group(1)), m.group(2)
        given, held = experts.get((layer, w), {}), _local_slots_of(model, layer)
        problems += [f"missing: layers.{layer}.ffn.experts.{e}.{w}.weight" for e in held if e not in given]
        for expert, pair in given.items():
            problem = _stored_problem(model.config, f"layers.{layer}.ffn.experts.{expert}.{w}", w, pair)
            if problem:
                problems.append(problem)
    if problems:
        raise ValueError("state dict does not fit the model:" + "".join(f"\n  {p}" for p in sorted(problems)))
    for name, target in own.items():
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            target.copy_(plain[name].to(target.dtype) if name.endswith("tid2eid") else plain[name])
            continue
        if m.group(3):
            continue
        layer, w = int(m.group(1)), m.group(2)
        scale_target = own.get(f"{name}_scale")
        for expert, slots in _local_slots_of(model, layer).items():
            pair = experts[(layer, w)][expert]
            weight, scale = expert_in_format(pair["weight"], pair.get("scale"), model.expert_dtype, target.dtype)
            for slot in slots:
                target[slot].copy_(weight)
                if scale_target is not None:
                    scale_target[slot].copy_(scale)

def save_pretrained(model: DSV4Model, directory: str) -> None:
    """config.json (official form) + safetensors under official names (tid2eid as int64, like the release;
    quantised experts as the release stores them, see official_state_dict)."""
    os.makedirs(directory, exist_ok=True)
    config = model.config.to_dict()
    if model.expert_dtype != "bf16":  # the release's key (informational: loading reads the tensors' dtypes)
        config["expert_dtype"] = model.expert_dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: (v.to(torch.int64) if k.endswith("tid2eid") else v) for k, v in official_state_dict(model).items()}
    checkpoint.write_checkpoint(directory, sd)


# ---------------------------------------------------------------------------------------------------
# Random init, build, load
# ---------------------------------------------------------------------------------------------------

def _generator(seed: int, name: str, device=None) -> torch.Generator:
    """One generator per tensor name: init is the same whatever P, ep_rank or device. `device`: where
    the generator draws (CPU by default; a CUDA one gives other numbers from the same seed)."""
    g = torch.Generator() if device is None else torch.Generator(device=device)
    return g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _zipf_bias(config: ModelConfig, seed: int, layer: int) -> Tensor:
    """Selection-only router bias with a realistic popularity skew (mini/flash-sized presets).

    Trained routers are not uniform: a few experts take a large share of tokens. We model it as a
    Zipf-like log-popularity, bias = -log(rank + 1), over a random expert permutation per layer, so hot
    experts land on random EP ranks. With router logits ~N(0, 1) (unit-RMS input, N(0, 1/d) gate) the
    hottest expert of a mini layer takes ~20% of the routed choices and the coldest almost none; over
    4 EP ranks the mean balancedness of the score layers is ~0.55-0.65 before EPLB (1.0 = perfect).
    """
    E = config.n_routed_experts
    rank = torch.randperm(E, generator=_generator(seed, f"layers.{layer}.ffn.gate.popularity"))
    return -torch.log1p(rank.float())


def random_official_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """Deterministic random weights under official names (per-expert keys), generated on CPU.

    Every expert, all in memory at once, in fp32: fine for small presets. build_model draws the
    same bits tensor by tensor (and only this rank's experts) instead.

    Linear weights N(0, 1/fan_in); embeddings N(0, 1); norm weights 1 + 0.1 N; sinks N(0, 0.5);
    hc fn N(0, 1/(n d)), hc base 0.5 N, hc scale 1 + 0.3 N (modest, so the mixing is not uniform);
    ape 0.5 N; tid2eid rows are distinct random experts per token; score-layer bias: see _zipf_bias.
    """
    return {name: _random_tensor(config, seed, name, shape).to(dtype)
            for name, (shape, dtype) in _official_shapes(config).items()}


def _gaussian_law(name: str, shape: tuple) -> tuple[float, float, float]:
    """(mean, mul, div) of a Gaussian-initialised tensor: mean + mul * N(0, 1) / div. Every tensor
    but tid2eid and gate.bias (see _is_gaussian); laws in random_official_state_dict's docstring."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1, 1.0
    if name.endswith("attn_sink"):
        return 0.0, 0.5, 1.0
    if name.endswith("_fn"):
        return 0.0, 1.0, math.sqrt(shape[1])
    if name.endswith("_base"):
        return 0.0, 0.5, 1.0
    if name.endswith("_scale"):
        return 1.0, 0.3, 1.0
    if name.endswith("ape"):
        return 0.0, 0.5, 1.0
    if name == "embed.weight":
        return 0.0, 1.0, 1.0
    return 0.0, 1.0, math.sqrt(shape[-1])  # linear [out, in]: N(0, 1/fan_in)


def _is_gaussian(name: str) -> bool:
    return not name.endswith(("tid2eid", "gate.bias"))


def _apply_law(x: Tensor, mean: float, mul: float, div: float) -> Tensor:
    """mean + mul * x / div on a fresh fp32 N(0, 1) draw x, in place, with the CPU init's float ops
    (x / div, or mean + mul * x: same bits as the out-of-place expressions it always used)."""
    if div != 1.0:
        return x.div_(div)
    if mul != 1.0:
        x.mul_(mul)
    return x.add_(mean) if mean else x


def _special_tensor(config: ModelConfig, seed: int, name: str, shape: tuple) -> Tensor:
    """tid2eid (int32, distinct random experts per token) or gate.bias (fp32, see _zipf_bias): CPU always."""
    g = _generator(seed, name)
    if name.endswith("tid2eid"):
        E, K = config.n_routed_experts, config.num_experts_per_tok
        return torch.rand(shape[0], E, generator=g).argsort(-1)[:, :K].to(torch.int32)
    return _zipf_bias(config, seed, int(name.split(".")[1])) + 0.05 * torch.randn(shape, generator=g)


def _random_tensor(config: ModelConfig, seed: int, name: str, shape: tuple) -> Tensor:
    """One tensor of the CPU init, from its own generator: fp32 (tid2eid int32)."""
    if not _is_gaussian(name):
        return _special_tensor(config, seed, name, shape)
    return _apply_law(torch.randn(shape, generator=_generator(seed, name)), *_gaussian_law(name, shape))


# Gaussian tensors at least this big are drawn on the GPU by build_model(init_device="cuda"); smaller
# ones (norms, sinks, hc base / scale) keep the CPU init there too.
_DEVICE_INIT_MIN_NUMEL = 1 << 16


class _QuantizedSlots:
    """Init target of one quantised expert matrix: `copy_(dense)` quantises the fp32 draw (on its
    device) and copies weight and scale into every slot holding the expert."""

    dtype = torch.float32  # what the draw should be

    def __init__(self, expert_dtype: str, weights: list[Tensor], scales: list[Tensor]):
        self.expert_dtype, self.weights, self.scales = expert_dtype, weights, scales
        self.device = weights[0].device

    def copy_(self, dense: Tensor) -> None:
        q, scale = quantize_expert(dense.float(), self.expert_dtype)
        for w, s in zip(self.weights, self.scales):
            w.copy_(q)
            s.copy_(scale)


def _init_jobs(model: DSV4Model) -> dict[int | None, list[tuple[str, tuple, list]]]:
    """layer (None: tensors outside the layers) -> [(official name, shape, targets)]. Routed
    experts: only those this rank's slots hold, one job per expert (its dense [rows, cols] draw),
    copied into each slot holding it (quantised first when the model holds them quantised)."""
    units: dict[int | None, list] = {None: []}
    state = model.state_dict()
    for name, t in state.items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            jobs = [(name, tuple(t.shape), [t])]
        elif m.group(3):  # a scale: filled by its weight's job
            continue
        else:
            w = m.group(2)
            jobs = []
            for expert, slots in _local_slots_of(model, layer).items():
                if model.expert_dtype == "bf16":
                    targets = [t[slot] for slot in slots]
                else:
                    scale = state[f"{name}_scale"]
                    targets = [_QuantizedSlots(model.expert_dtype, [t[p] for p in slots], [scale[p] for p in slots])]
                jobs.append((f"layers.{layer}.ffn.experts.{expert}.{w}.weight",
                             _expert_dense_shape(model.config, w), targets))
        units.setdefault(layer, []).extend(jobs)
    return units


def _fill_on_cpu(config: ModelConfig, seed: int, jobs: list, pool, ahead: int) -> None:
    """The exact CPU init of `jobs`: pool threads draw (the serial part: one generator per tensor, so
    the bits do not depend on the threads), this thread scales and copies in, `ahead` draws in flight."""

    def draw(name: str, shape: tuple) -> Tensor:
        if not _is_gaussian(name):
            return _special_tensor(config, seed, name, shape)
        return torch.randn(shape, generator=_generator(seed, name))

    def finish(job, future) -> None:
        name, shape, targets = job
        x = future.result()
        if _is_gaussian(name):
            x = _apply_law(x, *_gaussian_law(name, shape))
        for target in targets:
            target.copy_(x)

    pending = deque()
    for job in jobs:
        pending.append((job, pool.submit(draw, job[0], job[1])))
        if len(pending) >= ahead:
            finish(*pending.popleft())
    while pending:
        finish(*pending.popleft())


def _fill_on_device(device: torch.device, seed: int, name: str, shape: tuple, targets: list[Tensor]) -> None:
    """One Gaussian tensor drawn on `device` by a generator seeded like the CPU one, straight into the
    target dtype (into the first target when it lives there), copied into the other targets."""
    mean, mul, div = _gaussian_law(name, shape)
    first = targets[0]
    in_place = isinstance(first, Tensor) and first.device == device
    x = first if in_place else torch.empty(shape, dtype=first.dtype, device=device)
    x.normal_(mean, mul / div, generator=_generator(seed, name, device))
    for target in targets:
        if target is not x:
            target.copy_(x)


@torch.no_grad()
def _init_random_weights(model: DSV4Model, seed: int, fast_device: torch.device | None = None,
                         progress: bool | None = None) -> None:
    """Fill every parameter and buffer with the random init, layer by layer (see build_model).
    fast_device: draw the big Gaussian tensors there (None: the exact CPU init for all)."""
    units = _init_jobs(model)
    if progress is None:
        progress = sum(t.numel() for t in model.state_dict().values()) > 1e9
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(16, cores - 1))
    rank = f" (rank {model.ep_rank}/{model.ep_size})" if model.ep_size > 1 else ""
    with ThreadPoolExecutor(workers, thread_name_prefix="init") as pool, \
            tqdm(total=len(model.layers), desc=f"random init{rank}", unit="layer", disable=not progress) as bar:
        for layer in [None, *range(len(model.layers))]:
            on_cpu = []
            for name, shape, targets in units.get(layer, []):
                if fast_device is not None and _is_gaussian(name) and math.prod(shape) >= _DEVICE_INIT_MIN_NUMEL:
                    _fill_on_device(fast_device, seed, name, shape, targets)
                else:
                    on_cpu.append((name, shape, targets))
            _fill_on_cpu(model.config, seed, on_cpu, pool, ahead=2 * workers)
            if layer is not None:
                bar.update()


def _official_shapes(config: ModelConfig) -> dict[str, tuple]:
    """name -> (shape, dtype) of every official tensor (per-expert keys), from a meta-device model."""
    meta = DSV4Model(config, device="meta")
    out = {}
    for name, t in meta.state_dict().items():
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            out[name] = (tuple(t.shape), t.dtype)
        else:
            for e in range(config.n_routed_experts):
                out[f"layers.{m.group(1)}.ffn.experts.{e}.{m.group(2)}.weight"] = (tuple(t.shape[1:]), t.dtype)
    return out


def _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size, expert_dtype="bf16") -> DSV4Model:
    model = DSV4Model(config, num_physical_experts, ep_rank, ep_size, dtype=dtype, device="meta",
                      expert_dtype=expert_dtype)
    model.to_empty(device=device)
    model.inv_freq_main.copy_(rope_inv_freq(config.qk_rope_head_dim, config.rope_theta, None))
    model.inv_freq_compress.copy_(rope_inv_freq(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling))
    model.reset_expert_maps()
    return model.requires_grad_(False).eval()


def build_model(config: ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32,
                num_physical_experts: int | None = None, ep_rank: int = 0, ep_size: int = 1,
                init_device=None, progress: bool | None = None, expert_dtype: str = "bf16") -> DSV4Model:
    """Random-init model; identical weights for the same seed on every machine and placement.

    Every tensor has its own generator, seeded from `seed` and its official name, so the weights do
    not depend on P, ep_rank, ep_size or device: a rank draws only the experts its own slots hold
    (each once, copied into every local slot holding it), and tensors are drawn and copied in layer by
    layer, so host memory stays at a few tensors beyond the model itself.

    init_device: None or a CPU device (default): the exact CPU init, fp32 draws cast to `dtype`; the
    same bits as `load_official_state_dict(random_official_state_dict(config, seed))`, on any machine.
    A CUDA device (or "cuda"): opt-in fast path for big random models (released widths): every
    Gaussian tensor of at least _DEVICE_INIT_MIN_NUMEL (64 Ki) elements -- all linear, embedding and
    expert weights -- is drawn there by a CUDA generator seeded the same way per name, straight in
    `dtype` (no fp32 host round trip). These weights DIFFER from the CPU init for the same seed (a
    different RNG); they are deterministic for a given seed and GPU type (CUDA's Philox stream depends
    on the launch grid, i.e. on the GPU model) and still placement-independent. tid2eid, gate.bias and
    the small tensors (norms, sinks, hc base / scale) stay on the CPU path: the same as the CPU init.
    progress: a tqdm bar over layers; None = only when this model holds > 1 G parameters.
    expert_dtype: "bf16" (routed experts in `dtype`), "fp8" or "fp4": each expert's fp32 draw is
    quantised (checkpoint.quantize_*, on the init device) into the slots holding it.
    """
    model = _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size, expert_dtype)
    fast = None
    if init_device is not None and torch.device(init_device).type == "cuda":
        fast = torch.device(init_device)
        if fast.index is None:
            fast = torch.device("cuda", torch.cuda.current_device())
    _init_random_weights(model, seed, fast, progress)
    return model


def stored_expert_dtype(sd: dict[str, Tensor]) -> str:
    """The format a state dict's routed experts are stored in: "fp4", "fp8" or "bf16" (dense)."""
    for name, t in sd.items():
        m = _EXPERT_KEY_RE.fullmatch(name)
        if m and m.group(4) == "weight":
            has_scale = name[: -len("weight")] + "scale" in sd
            return checkpoint.quantized_format(t) if has_scale else "bf16"
    return "bf16"


def load_model(path: str, device="cpu", dtype=torch.bfloat16, num_layers: int | None = None,
               num_physical_experts: int | None = None, ep_rank: int = 0, ep_size: int = 1,
               expert_dtype: str | None = None) -> DSV4Model:
    """A checkpoint directory (config.json + safetensors, official or transformers names).
    expert_dtype: how the model holds its routed experts; None = as the checkpoint stores them
    (the release: "fp4"; Flash-Base: "fp8"; a dense checkpoint: "bf16", i.e. `dtype`)."""
    config = ModelConfig.from_pretrained(path)
    if num_layers is not None:
        config = config.truncated(num_layers)
    sd = checkpoint.read_checkpoint(path, num_layers=config.num_hidden_layers, dtype=dtype,
                                    keep_quantized_experts=True)
    model = _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size,
                         expert_dtype or stored_expert_dtype(sd))
    load_official_state_dict(model, sd)
    return model
