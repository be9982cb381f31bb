"""GPU decode step: eager forward vs DecodeGraphs (CUDA graphs).

Mini preset (or --preset flash --num-layers N: released widths, random weights drawn on the GPU), bf16,
one GPU. Every row is first prefilled with a `--prompt`-token prompt (one batched forward), then decoded
greedily: a step = forward/replay + argmax, fed back on device. Prints ms/step and output tok/s per batch
size, and checks graph logits against eager logits on the same cache state (same greedy tokens, max |diff|).

    python bench/bench_decode_gpu.py [--batch 1 8 64] [--prompt 256] [--steps 50] [--profile]
    python bench/bench_decode_gpu.py --preset flash --num-layers 8 --expert-dtype fp4 --batch 64 --prompt 32 --profile
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dsv4_mini import ModelConfig  # noqa: E402
from runner import DecodeGraphs  # noqa: E402
from weights import build_model  # noqa: E402


def timed_steps(step, ids, pos, steps):
    """Run `steps` greedy decode steps; -> (ms per step, final ids)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = step(ids, pos).argmax(-1)  # greedy sampling on device, fed back
        pos = pos + 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps, ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="top kernels of one eager step at the largest batch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--preset", default="mini", choices=["mini", "flash"])
    ap.add_argument("--num-layers", type=int, default=None, help="the preset's first N layers")
    ap.add_argument("--expert-dtype", default="bf16", choices=["bf16", "fp8", "fp4"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = getattr(ModelConfig, args.preset)()
    if args.num_layers:
        config = config.truncated(args.num_layers)
    model = build_model(config, seed=0, device=dev, dtype=getattr(torch, args.dtype), expert_dtype=args.expert_dtype,
                        init_device=dev if args.preset != "mini" else None)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; build {time.perf_counter() - t0:.1f}s", flush=True)
    max_b, V = max(args.batch), model.config.vocab_size
    max_seq = args.prompt + 6 * args.steps + 8
    cache = model.new_cache(max_b, max_seq)
    L, P = model.config.num_hidden_layers, model.num_physical_experts
    load = torch.zeros(L, P, dtype=torch.int32, device=dev)
    prompts = torch.randint(2, V, (max_b, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    t0 = time.perf_counter()
    model.forward(prompts, torch.zeros(max_b, dtype=torch.long, device=dev), cache, torch.arange(max_b, device=dev))
    torch.cuda.synchronize()
    print(f"prefill {max_b}x{args.prompt}: {time.perf_counter() - t0:.2f}s (incl. Triton JIT)", flush=True)
    graphs = DecodeGraphs(model, cache, max_b)
    rows = []
    for B in args.batch:
        slots = torch.arange(B, device=dev)
        pos0 = torch.full((B,), args.prompt, device=dev)
        ids0 = prompts[:B, -1]

        def eager(ids, pos):
            return model.forward(ids.view(B, 1), pos, cache, slots, load=load, last_only=True)

        def graph(ids, pos):
            return graphs.run(ids, pos, slots, load)

        # correctness on identical cache state: decode 3 steps eagerly, restore the cache, redo them with graphs
        state = [t for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t)]
        snapshot = [t.clone() for t in state]
        load.zero_()
        ref, ids = [], ids0
        for i in range(3):
            ref.append(eager(ids, pos0 + i).clone())
            ids = ref[-1].argmax(-1)
        eager_load = load.clone()
        t0 = time.perf_counter()
        graphs.run(ids0, pos0, slots)  # captures this bucket (and runs one step)
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
        for t, saved in zip(state, snapshot):
            t.copy_(saved)  # in place: the graphs keep their addresses
        load.zero_()
        got, ids = [], ids0
        for i in range(3):
            got.append(graph(ids, pos0 + i).clone())
            ids = ref[i].argmax(-1)  # follow the eager tokens so the states stay identical
        diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
        same = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(ref, got))
        same_load = torch.equal(load, eager_load)
        # timing (positions run on past the checked steps; each mode decodes its own continuation)
        timed_steps(eager, ids0, pos0 + 3, 3)
        eager_ms, _ = timed_steps(eager, ids0, pos0 + 3, args.steps)
        graph_ms, _ = timed_steps(graph, ids0, pos0 + 3 + args.steps, args.steps)
        rows.append((B, "eager", eager_ms, None))
        rows.append((B, "graph", graph_ms, f"capture {capture_s:.1f}s, max|graph-eager| {diff:.2e}, "
                                           f"same argmax {same}, same load {same_load}"))
        print(rows[-2], rows[-1], flush=True)

    if args.profile:  # which kernels a step spends its time in (eager launch; graphs replay the same kernels)
        B = max_b
        slots, pos = torch.arange(B, device=dev), torch.full((B,), args.prompt + 3 * args.steps, device=dev)
        from torch.profiler import ProfilerActivity, profile
        load.zero_()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            model.forward(prompts[:B, -1:], pos, cache, slots, load=load, last_only=True)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in events)
        print(f"B={B} eager step: {sum(e.count for e in events)} kernels, {total / 1e3:.2f} ms GPU time; "
              f"experts used per layer {(load > 0).sum(1).tolist()}", flush=True)
        for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
            print(f"  {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:110]}", flush=True)
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.key in ("aten::copy_", "aten::einsum", "aten::linear", "aten::mm")]
        print("  the aten ops behind them, by input shapes (GPU ms):", flush=True)
        for e in sorted(ops, key=lambda e: -e.device_time_total)[:12]:
            print(f"  {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key} {str(e.input_shapes)[:120]}", flush=True)

    print(f"\n{args.preset} preset ({model.config.num_hidden_layers} layers, {args.expert_dtype} experts), {args.dtype}, "
          f"prompt {args.prompt} per row, {args.steps} greedy steps (argmax on device included), "
          f"cache max_seq_len {max_seq}")
    print("| batch | mode | ms/step | output tok/s | notes |")
    print("|---|---|---|---|---|")
    for B, mode, ms, note in sorted(rows, key=lambda r: r[0]):
        print(f"| {B} | {mode} | {ms:.2f} | {B * 1e3 / ms:,.0f} | {note or ''} |")


if __name__ == "__main__":
    main()
