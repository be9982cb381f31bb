"""The batched sampler alone: sampler.sample (Triton on CUDA) against a sort-based torch sampler on the
device, one step of B rows, for the mini and the released vocabularies.

    python bench/bench_sampler.py --device cuda                  # B=64, V = 8192 and 129280
    python bench/bench_sampler.py --device cuda --rows 1 256

Per setting: milliseconds per step (CUDA events, median of --iters), the ratio to the torch baseline,
and how many rows the kernel draws like its torch twin (sample_torch, the definition: equal up to
exp/log rounding at near-ties). Also checks that a CUDA graph replays the kernel to the same tokens.
Writes JSON to $OUT/bench_sampler.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler import RowParams, SamplingParams, sample, sample_torch  # noqa: E402

SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "T=1": SamplingParams(temperature=1.0),
    "T=1 top_p=0.9": SamplingParams(temperature=1.0, top_p=0.9),
    "T=0.7 top_k=50": SamplingParams(temperature=0.7, top_k=50),
    "T=1 min_p=0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "T=0.8 k=50 p=0.95 m=0.02": SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02),
}


def sort_based(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Baseline: what one writes in torch for a batch with one setting: sort, cumsum, multinomial."""
    if params.temperature == 0:
        return logits.argmax(-1)
    x = logits / params.temperature
    probs = torch.softmax(x, -1)
    if params.min_p > 0:
        probs = torch.where(probs >= params.min_p * probs.amax(-1, keepdim=True), probs, 0.0)
    sorted_probs, order = probs.sort(-1, descending=True)
    if params.top_k > 0:
        sorted_probs[:, params.top_k:] = 0.0
    if params.top_p < 1.0:
        mass = sorted_probs.cumsum(-1)
        sorted_probs = torch.where(mass - sorted_probs < params.top_p * mass[:, -1:], sorted_probs, 0.0)
    return order.gather(1, torch.multinomial(sorted_probs, 1, generator=generator)).view(-1)


def time_ms(fn, iters: int, device) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_replays(logits: torch.Tensor, rows: RowParams, want: torch.Tensor) -> bool:
    """Capture sample() in a CUDA graph: no host sync inside, the same tokens on replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(logits, logits.shape[1], rows)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(logits, logits.shape[1], rows)
    graph.replay()
    return bool(torch.equal(out, want))


def run(B: int, V: int, name: str, params: SamplingParams, args, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, V, generator=gen, device=device) * 3  # fp32, like the model's
    rows = RowParams.from_host([params] * B, list(range(B)), [100 + b for b in range(B)], device)
    ms = time_ms(lambda: sample(logits, V, rows), args.iters, device)
    base_ms = time_ms(lambda: sort_based(logits, params, gen), args.iters, device)
    got = sample(logits, V, rows)
    check = min(B, args.check_rows)
    want = sample_torch(logits[:check], V, RowParams(*(t[:check] for t in vars(rows).values())))
    row = {"rows": B, "vocab": V, "setting": name, "ms": ms, "torch_sort_ms": base_ms, "speedup": base_ms / ms,
           "twin_agree": int((got[:check] == want).sum()), "twin_checked": check}
    if device.type == "cuda":
        row["graph_replays"] = graph_replays(logits, rows, got)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=[64])
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 129280])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--check-rows", type=int, default=16, help="rows compared with the torch twin")
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    print(f"{'rows':>5} {'vocab':>7} {'setting':>26} {'ms':>8} {'torch sort ms':>14} {'x':>6} {'twin':>7} {'graph':>6}")
    for B in args.rows:
        for V in args.vocab:
            for name, params in SETTINGS.items():
                r = run(B, V, name, params, args, device)
                results.append(r)
                print(f"{B:>5} {V:>7} {name:>26} {r['ms']:>8.3f} {r['torch_sort_ms']:>14.3f} {r['speedup']:>6.1f} "
                      f"{r['twin_agree']:>3}/{r['twin_checked']:<3} {str(r.get('graph_replays', '-')):>6}", flush=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_sampler.json"
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
