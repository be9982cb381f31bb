"""EPLB benchmarks: planner time and balancedness vs DeepSeek's plain greedy (CPU, released sizes),
slots moved with and without slot preservation, and (with CUDA) the rebalancer's move bandwidth
for released-size bf16 expert tensors vs the device's own copy bandwidth.

    python bench/bench_eplb.py                 # prints tables; writes $OUT/bench_eplb.json if OUT is set
    python bench/bench_eplb.py --slots 72 --layers 2 --repeats 3

Baselines: balancedness and time of `rebalance_experts(..., refine=False)` (bit-identical to
deepseek-ai/EPLB's greedy); move GB/s vs `dst.copy_(src)` of a large buffer on the same GPU
(target: >= 50%).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import eplb  # noqa: E402
from planner import balancedness, rank_load, rebalance_experts, replica_load  # noqa: E402

L, E = 43, 256  # DeepSeek-V4-Flash: 43 MoE layers, 256 routed experts
SIZES = [(P, G) for P in (256, 288, 320) for G in (8, 32, 64) if P % G == 0]


def synthetic_load(kind: str, seed: int) -> torch.Tensor:
    """[L, E] token counts: Zipf(0.9) over a random expert order per layer, or log-normal(sigma=1.5)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "zipf":
        ranks = torch.stack([torch.randperm(E, generator=gen) for _ in range(L)]) + 1
        return (1e6 / ranks.double() ** 0.9).round()
    return (1e3 * torch.exp(1.5 * torch.randn(L, E, generator=gen, dtype=torch.float64))).round()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), min(times)


def mean_balancedness(load, phy2log, G):
    return balancedness(rank_load(replica_load(load, phy2log), G))


def bench_planner(repeats: int) -> list[dict]:
    rows = []
    print(f"\nPlanner, L={L} E={E}, global policy (median of {repeats}; balancedness = mean over layers "
          f"of mean/max rank load; 'min' = worst layer)")
    head = (f"{'load':>9} {'P':>4} {'G':>3} | {'greedy ms':>9} {'ours ms':>8} | {'trivial':>7} {'greedy':>7} "
            f"{'ours':>7} {'ours/greedy':>11} | {'greedy min':>10} {'ours min':>8} | {'moved fresh':>11} {'moved kept':>10}")
    print(head)
    print("-" * len(head))
    for kind in ("zipf", "lognormal"):
        load = synthetic_load(kind, 0)
        drifted = load * torch.exp(0.2 * torch.randn(L, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        for P, G in SIZES:
            (plain, _, _), t_plain, _ = timed(lambda: rebalance_experts(load, P, 1, 1, G, refine=False), repeats)
            (ours, _, _), t_ours, t_best = timed(lambda: rebalance_experts(load, P, 1, 1, G), repeats)
            trivial = eplb.ExpertLocation.trivial(L, E, P, G).phy2log
            b_triv, b_plain, b_ours = (mean_balancedness(load, p, G) for p in (trivial, plain, ours))
            fresh, _, _ = rebalance_experts(drifted, P, 1, 1, G)
            kept, _, _ = rebalance_experts(drifted, P, 1, 1, G, old_phy2log=ours)
            row = dict(load=kind, P=P, G=G, greedy_ms=t_plain * 1e3, ours_ms=t_ours * 1e3, ours_best_ms=t_best * 1e3,
                       balancedness_trivial=float(b_triv.mean()), balancedness_greedy=float(b_plain.mean()),
                       balancedness_ours=float(b_ours.mean()), min_layer_greedy=float(b_plain.min()),
                       min_layer_ours=float(b_ours.min()), never_below_greedy=bool((b_ours >= b_plain - 1e-12).all()),
                       slots_moved_fresh=int((fresh != ours).sum()), slots_moved_kept=int((kept != ours).sum()),
                       slots_total=L * P)
            rows.append(row)
            print(f"{kind:>9} {P:4d} {G:3d} | {row['greedy_ms']:9.1f} {row['ours_ms']:8.1f} | "
                  f"{row['balancedness_trivial']:7.4f} {row['balancedness_greedy']:7.4f} {row['balancedness_ours']:7.4f} "
                  f"{row['balancedness_ours'] / row['balancedness_greedy']:11.4f} | {row['min_layer_greedy']:10.4f} "
                  f"{row['min_layer_ours']:8.4f} | {row['slots_moved_fresh']:11d} {row['slots_moved_kept']:10d}")
    print(f"('moved': slots changed by a re-plan after a 20% load drift, of {L}x P; fresh = no slot preservation)")
    return rows


def bench_hierarchical(repeats: int) -> list[dict]:
    rows = []
    print("\nHierarchical (groups = E, replicas stay inside their node), P=288, G=32")
    for nodes in (2, 4):
        load = synthetic_load("zipf", 0)
        (plain, _, _), t_plain, _ = timed(lambda: rebalance_experts(load, 288, E, nodes, 32, refine=False), repeats)
        (ours, _, _), t_ours, _ = timed(lambda: rebalance_experts(load, 288, E, nodes, 32), repeats)
        b_plain, b_ours = mean_balancedness(load, plain, 32), mean_balancedness(load, ours, 32)
        rows.append(dict(nodes=nodes, greedy_ms=t_plain * 1e3, ours_ms=t_ours * 1e3,
                         balancedness_greedy=float(b_plain.mean()), balancedness_ours=float(b_ours.mean())))
        print(f"  nodes={nodes}: greedy {t_plain * 1e3:.1f} ms bal {b_plain.mean():.4f} | ours {t_ours * 1e3:.1f} ms "
              f"bal {b_ours.mean():.4f}")
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """GB/s of one plain dst.copy_(src) of nbytes on the device (bytes copied / second, best run)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return nbytes / best / 1e9


def bench_move(device: torch.device, slots: int, layers: int, ranks: int, repeats: int,
               inter: int = 2048, hidden: int = 4096) -> dict:
    """GB/s of expert bytes moved by LocalMover: bf16 w1, w3 [S, inter, hidden], w2 [S, hidden, inter]."""
    weights = []
    for _ in range(layers):
        w1 = torch.randn(slots, inter, hidden, dtype=torch.bfloat16, device=device)
        weights.append([w1, torch.randn_like(w1), torch.randn(slots, hidden, inter, dtype=torch.bfloat16, device=device)])
    experts = slots - slots // 8  # 1/8 of the slots are redundant
    load = (1e3 * torch.exp(1.5 * torch.randn(layers, experts, generator=torch.Generator().manual_seed(0)))).round()
    old = eplb.ExpertLocation.trivial(layers, experts, slots, ranks).phy2log
    new, _, _ = rebalance_experts(load, slots, 1, 1, ranks)
    mover = eplb.LocalMover(ranks)
    slot_bytes = sum(w[0].numel() * w[0].element_size() for w in weights[0])
    changed = int((old != new).sum())
    times, moved = [], 0
    for i in range(repeats * 2):  # there and back again: every timed move changes the same slots
        a, b = (old, new) if i % 2 == 0 else (new, old)
        _sync(device)
        t0 = time.perf_counter()
        moved = sum(mover.move_layer(weights[layer], a[layer], b[layer]) for layer in range(layers))
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    copy_gbs = copy_bandwidth(device, min(moved, 4 << 30), repeats + 2)
    move_gbs = moved / best / 1e9
    result = dict(device=str(device), slots_per_layer=slots, layers=layers, virtual_ranks=ranks,
                  slot_mib=slot_bytes / 2**20, slots_changed=changed, bytes_moved=moved,
                  move_seconds_best=best, move_seconds_median=statistics.median(times), move_gbs=move_gbs,
                  copy_gbs=copy_gbs, ratio=move_gbs / copy_gbs, per_layer_ms=best / layers * 1e3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nMove bandwidth on {name}: {layers} layer(s) x {slots} slots of {slot_bytes / 2**20:.1f} MiB "
          f"(bf16 w1/w3 [S,{inter},{hidden}], w2 [S,{hidden},{inter}]), {ranks} virtual ranks")
    print(f"  slots changed {changed} / {layers * slots}, moved {moved / 2**30:.2f} GiB in {best * 1e3:.1f} ms "
          f"({best / layers * 1e3:.1f} ms per layer)")
    print(f"  move {move_gbs:.0f} GB/s vs device copy_ {copy_gbs:.0f} GB/s -> {100 * result['ratio']:.0f}% "
          f"(target >= 50%: {'met' if result['ratio'] >= 0.5 else 'NOT met'})")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=72, help="slots per layer moved on the GPU (8 ranks x 9)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--move-device", default="cuda" if torch.cuda.is_available() else None,
                        help="device for the move benchmark (default: cuda when available, else skipped)")
    parser.add_argument("--inter", type=int, default=2048, help="expert intermediate size (released: 2048)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (released: 4096)")
    args = parser.parse_args()
    versions = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                    cuda=torch.version.cuda, cpu=platform.processor() or platform.machine(),
                    torch_threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    print("versions: " + ", ".join(f"{k}={v}" for k, v in versions.items()))
    result = dict(versions=versions, planner=bench_planner(args.repeats), hierarchical=bench_hierarchical(args.repeats))
    if args.move_device:
        try:
            result["move"] = bench_move(torch.device(args.move_device), args.slots, args.layers, args.ranks,
                                        args.repeats, args.inter, args.hidden)
        except Exception as e:  # noqa: BLE001 - keep the CPU results of a one-shot GPU run
            result["move"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"\nmove benchmark failed: {result['move']['error']}")
    else:
        print("\n(no CUDA: move bandwidth not measured; --move-device cpu runs it here)")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "bench_eplb.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
