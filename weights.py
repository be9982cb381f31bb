"""Weights of a dsv4-mini model: random init, build, checkpoint load and save.

Sits above the model (dsv4_mini.py) and the file format (checkpoint.py); neither imports it.

* `build_model`: a model with deterministic random weights under official names (the built-in
  presets need no download). Every tensor has its own generator seeded from its official name, so
  the weights do not depend on the expert placement, the EP rank or the device.
* `load_model`: a checkpoint directory (config.json + safetensors, official or transformers names).
* `official_state_dict` / `load_official_state_dict` / `save_pretrained`: between the model's
  slot-stacked routed experts (`layers.L.ffn.experts.w1 [P_local, I, d]`) and the official
  per-expert tensors (`layers.L.ffn.experts.E.w1.weight`): expert E goes into every slot holding it.
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
from dsv4_mini import DSV4Model, ModelConfig, rope_inv_freq

_STACKED_RE = re.compile(r"layers\.(\d+)\.ffn\.experts\.(w[123])")
_EXPERT_KEY_RE = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")


# ---------------------------------------------------------------------------------------------------
# Official-name state dict
# ---------------------------------------------------------------------------------------------------

def official_state_dict(model: DSV4Model) -> dict[str, Tensor]:
    """Official checkpoint names; routed expert E comes from the first local slot holding it."""
    out = {}
    for name, t in model.state_dict().items():
        m = _STACKED_RE.fullmatch(name)
        if not m:
            out[name] = t
            continue
        layer, w = int(m.group(1)), m.group(2)
        for expert, slot in _local_slots_of(model, layer).items():
            out[f"layers.{layer}.ffn.experts.{expert}.{w}.weight"] = t[slot[0]]
    return out

def _local_slots_of(model: DSV4Model, layer: int) -> dict[int, list[int]]:
    """expert -> local slots holding it on this rank (from phy2log)."""
    offset = model.ep_rank * model.slots_per_rank
    held: dict[int, list[int]] = {}
    for slot, expert in enumerate(model.phy2log[layer, offset:offset + model.slots_per_rank].tolist()):
        held.setdefault(expert, []).append(slot)
    return dict(sorted(held.items()))

@torch.no_grad()
def load_official_state_dict(model: DSV4Model, sd: dict[str, Tensor]) -> None:
    """Copy an official-name state dict in; expert E goes into every local slot holding E.

    `mtp.*` is ignored; tid2eid is cast to int32. Experts held by no local slot may be present or
    absent. Raises ONE ValueError listing every missing, unexpected and mis-shaped key.
    """
    own = model.state_dict()
    missing, unexpected, misshaped = [], [], []
    plain, experts = {}, {}  # name -> tensor ; (layer, w) -> {expert: tensor}
    E = model.config.n_routed_experts
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        m = _EXPERT_KEY_RE.fullmatch(name)
        if m and int(m.group(1)) < len(model.layers) and int(m.group(2)) < E:
            experts.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = t
        elif name in own and not _STACKED_RE.fullmatch(name):
            plain[name] = t
        else:
            unexpected.append(name)
    for name, target in own.items():
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            if name not in plain:
                missing.append(name)
            elif plain[name].shape != target.shape:
                misshaped.append(f"{name}: {list(plain[name].shape)} != {list(target.shape)}")
            continue
        layer, w = int(m.group(1)), m.group(2)
        given, held = experts.get((layer, w), {}), _local_slots_of(model, layer)
        for expert in held:
            key = f"layers.{layer}.ffn.experts.{expert}.{w}.weight"
            if expert not in given:
                missing.append(key)
            elif given[expert].shape != target.shape[1:]:
                misshaped.append(f"{key}: {list(given[expert].shape)} != {list(target.shape[1:])}")
        for expert, t in given.items():
            if t.shape != target.shape[1:] and expert not in held:
                misshaped.append(f"layers.{layer}.ffn.experts.{expert}.{w}.weight: "
                                 f"{list(t.shape)} != {list(target.shape[1:])}")
    if missing or unexpected or misshaped:
        raise ValueError("state dict does not fit the model:"
                         + "".join(f"\n  missing: {k}" for k in sorted(missing))
                         + "".join(f"\n  unexpected: {k}" for k in sorted(unexpected))
                         + "".join(f"\n  mis-shaped: {k}" for k in sorted(misshaped)))
    for name, target in own.items():
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            target.copy_(plain[name].to(target.dtype) if name.endswith("tid2eid") else plain[name])
            continue
        layer, w = int(m.group(1)), m.group(2)
        for expert, slots in _local_slots_of(model, layer).items():
            for slot in slots:
                target[slot].copy_(experts[(layer, w)][expert])

def save_pretrained(model: DSV4Model, directory: str) -> None:
    """config.json (official form) + safetensors under official names (tid2eid as int64, like the release)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
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


def _init_jobs(model: DSV4Model) -> dict[int | None, list[tuple[str, tuple, list[Tensor]]]]:
    """layer (None: tensors outside the layers) -> [(official name, shape, target views)]. Routed
    experts: only those this rank's slots hold, one job per expert, copied into each slot holding it."""
    units: dict[int | None, list] = {None: []}
    for name, t in model.state_dict().items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        m = _STACKED_RE.fullmatch(name)
        if m is None:
            jobs = [(name, tuple(t.shape), [t])]
        else:
            jobs = [(f"layers.{layer}.ffn.experts.{expert}.{m.group(2)}.weight", tuple(t.shape[1:]),
                     [t[slot] for slot in slots]) for expert, slots in _local_slots_of(model, layer).items()]
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
    x = first if first.device == device else torch.empty(shape, dtype=first.dtype, device=device)
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


def _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size) -> DSV4Model:
    model = DSV4Model(config, num_physical_experts, ep_rank, ep_size, dtype=dtype, device="meta")
    model.to_empty(device=device)
    model.inv_freq_main.copy_(rope_inv_freq(config.qk_rope_head_dim, config.rope_theta, None))
    model.inv_freq_compress.copy_(rope_inv_freq(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling))
    model.reset_expert_maps()
    return model.requires_grad_(False).eval()


def build_model(config: ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32,
                num_physical_experts: int | None = None, ep_rank: int = 0, ep_size: int = 1,
                init_device=None, progress: bool | None = None) -> DSV4Model:
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
    """
    model = _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size)
    fast = None
    if init_device is not None and torch.device(init_device).type == "cuda":
        fast = torch.device(init_device)
        if fast.index is None:
            fast = torch.device("cuda", torch.cuda.current_device())
    _init_random_weights(model, seed, fast, progress)
    return model


def load_model(path: str, device="cpu", dtype=torch.bfloat16, num_layers: int | None = None,
               num_physical_experts: int | None = None, ep_rank: int = 0, ep_size: int = 1) -> DSV4Model:
    """A checkpoint directory (config.json + safetensors, official or transformers names)."""
    config = ModelConfig.from_pretrained(path)
    if num_layers is not None:
        config = config.truncated(num_layers)
    model = _empty_model(config, device, dtype, num_physical_experts, ep_rank, ep_size)
    load_official_state_dict(model, checkpoint.read_checkpoint(path, num_layers=config.num_hidden_layers, dtype=dtype))
    return model
