"""How many layers of released-width DSV4 (Flash: d 4096, 256 experts of I 2048) fit on one GPU when the
routed experts are held in FP4 (or another --expert-dtype), and do they run.

    python bench/bench_fp4_capacity.py                       # fp4, bounded to ~8 minutes
    python bench/bench_fp4_capacity.py --expert-dtype fp8 --time-budget-s 300

1. Bytes of each layer and outside the layers, exact, from a meta-device model (no GPU memory), for
   bf16 / fp8 / fp4 experts: the layer count that fits in the GPU's free memory less --reserve-gib.
2. One layer built on the GPU (random weights drawn and quantised there, `build_model(init_device=...)`)
   to time the build per layer.
3. The largest model that fits both the memory and the time budget is built, then serves one greedy
   batch (--batch prompts of --prompt tokens, --new-tokens decoded through the KV cache): memory
   allocated / reserved / peak and the decode step time are reported. On out-of-memory it retries
   with one layer fewer.
Prints a table; writes JSON to $OUT/bench_fp4_capacity.json when OUT is set.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dsv4_mini import DSV4Model, ModelConfig  # noqa: E402
from weights import build_model  # noqa: E402

GIB = 1024 ** 3
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def model_bytes(config: ModelConfig, expert_dtype: str) -> tuple[int, list[int]]:
    """(bytes outside the layers, [bytes of layer i]) of the bf16 model with `expert_dtype` experts
    (layers differ: sliding, CSA with compressor + indexer, HCA), from a meta-device model."""
    meta = DSV4Model(config, dtype=torch.bfloat16, device="meta", expert_dtype=expert_dtype)
    size = lambda module: sum(t.numel() * t.element_size() for t in module.state_dict().values())  # noqa: E731
    layers = [size(layer) for layer in meta.layers]
    return size(meta) - sum(layers), layers


def layers_that_fit(base: int, layers: list[int], usable: float) -> int:
    """The largest N with base + layers[0] + ... + layers[N-1] <= usable."""
    total, n = base, 0
    for size in layers:
        if total + size > usable:
            break
        total, n = total + size, n + 1
    return n


def run_model(model, args) -> dict:
    """One greedy batch: prefill --batch x --prompt, then --new-tokens decode steps; timings."""
    dev = torch.device("cuda")
    B, S = args.batch, args.prompt
    cache = model.new_cache(B, S + args.new_tokens + 1)
    slots = torch.arange(B, device=dev)
    ids = torch.randint(2, model.config.vocab_size, (B, S), device=dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    logits = model.forward(ids, torch.zeros(B, dtype=torch.long, device=dev), cache, slots, last_only=True)
    torch.cuda.synchronize()
    out = dict(prefill_s=time.perf_counter() - t)
    steps = []
    for step in range(args.new_tokens):
        nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model.forward(nxt, torch.full((B,), S + step, dtype=torch.long, device=dev), cache, slots,
                               last_only=True)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t)
    out["decode_step_ms_first"] = steps[0] * 1e3 if steps else None  # includes Triton JIT of decode shapes
    out["decode_step_ms_median"] = sorted(steps[1:])[len(steps[1:]) // 2] * 1e3 if len(steps) > 1 else None
    out["logits_finite"] = bool(torch.isfinite(logits).all())
    return out


def try_build(config, layers, args) -> tuple[dict, object]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = build_model(config.truncated(layers), seed=0, device="cuda", dtype=torch.bfloat16, init_device="cuda",
                        expert_dtype=args.expert_dtype, progress=False)
    torch.cuda.synchronize()
    return dict(layers=layers, build_s=time.perf_counter() - t,
                allocated_gib=torch.cuda.memory_allocated() / GIB), model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert-dtype", default="fp4", choices=("bf16", "fp8", "fp4"))
    ap.add_argument("--reserve-gib", type=float, default=10.0,
                    help="memory kept free for activations, the KV cache, Triton and the allocator")
    ap.add_argument("--time-budget-s", type=float, default=480.0, help="stop choosing more layers past this")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp4_capacity.py needs a CUDA GPU")
    config = ModelConfig.flash()
    free, total = torch.cuda.mem_get_info()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, total_gib=total / GIB,
                free_gib=free / GIB, args=vars(args), analytic={})
    usable = free - args.reserve_gib * GIB
    for fmt in ("bf16", "fp8", "fp4"):
        base, per_layer = model_bytes(config, fmt)
        fits = layers_that_fit(base, per_layer, usable)
        mean = sum(per_layer) / len(per_layer)
        meta["analytic"][fmt] = dict(base_gib=base / GIB, per_layer_gib=mean / GIB, layers_fit=fits,
                                     full_model_gib=(base + sum(per_layer)) / GIB)
        log(f"{fmt}: {mean / GIB:.2f} GiB per layer (mean), {base / GIB:.2f} GiB outside the layers -> "
            f"{fits} layers in {usable / GIB:.0f} GiB")
    mem_layers = min(config.num_hidden_layers, meta["analytic"][args.expert_dtype]["layers_fit"])
    one, model = try_build(config, 1, args)
    del model
    per_layer_s = max(one["build_s"], 1e-3)
    time_layers = int((args.time_budget_s - (time.time() - T0) - 60) // per_layer_s)  # 60 s for the run
    layers = max(1, min(mem_layers, time_layers))
    meta.update(one_layer_build_s=one["build_s"], layers_by_memory=mem_layers, layers_by_time=time_layers)
    log(f"one layer builds in {one['build_s']:.1f} s; building {layers} layers "
        f"(memory allows {mem_layers}, time {time_layers})")
    result = None
    while layers >= 1 and result is None:
        try:
            row, model = try_build(config, layers, args)
            log(f"{layers} layers built in {row['build_s']:.1f} s, {row['allocated_gib']:.1f} GiB allocated")
            row.update(run_model(model, args))
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["reserved_gib"] = torch.cuda.memory_reserved() / GIB
            result = row
            del model
        except torch.cuda.OutOfMemoryError as e:
            log(f"{layers} layers: out of memory ({str(e).splitlines()[0][:120]}); trying {layers - 1}")
            model = None
            layers -= 1
    meta["result"] = result
    a = meta["analytic"]
    print(f"GPU {meta['gpu']} | {total / GIB:.0f} GiB | torch {torch.__version__}")
    print(f"{'experts':>7} {'GiB/layer':>10} {'GiB other':>10} {'43 layers GiB':>14} {'layers fit':>11}")
    for fmt in ("bf16", "fp8", "fp4"):
        r = a[fmt]
        print(f"{fmt:>7} {r['per_layer_gib']:>10.2f} {r['base_gib']:>10.2f} {r['full_model_gib']:>14.1f} "
              f"{r['layers_fit']:>11}")
    if result:
        step_ms = result["decode_step_ms_median"] or float("nan")
        print(f"built and ran {result['layers']} layers with {args.expert_dtype} experts: "
              f"{result['allocated_gib']:.1f} GiB allocated after build, peak {result['peak_gib']:.1f} GiB, "
              f"reserved {result['reserved_gib']:.1f} GiB; build {result['build_s']:.0f} s; batch {args.batch}: "
              f"prefill {result['prefill_s']:.2f} s, decode step {step_ms:.1f} ms "
              f"(first {result['decode_step_ms_first']:.0f} ms with JIT); logits finite: {result['logits_finite']}")
        if result["layers"] < meta["layers_by_memory"]:
            print(f"(the time budget, not memory, bounded the build: memory allows {meta['layers_by_memory']})")
    else:
        print("no layer count could be built and run")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "bench_fp4_capacity.json")
        with open(path, "w") as f:
            json.dump(meta, f, indent=1, default=str)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
