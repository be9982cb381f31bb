"""One fp4 decode MoE call at released sizes (T 64) after --warmup calls, for Nsight Compute: which pipe
limits the fp4 decode kernels. gpu_session.sh's `ncufp4` part runs it as

    ncu --clock-control none -k 'regex:^_moe_(up|down)_kernel$' --launch-skip 6 --launch-count 2 \\
        --metrics <issue, pipe and DRAM utilisation> python bench/ncu_fp4_decode.py --warmup 3

(each call launches the up and the down kernel once: skip 2 * --warmup). The weights, routing and
activations are those of `bench_kernels.py --only qmoe` at T = 64 (same seed, same draws)."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DEV, PRESETS, QMOE_T, kernels, quantize_stack  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=3, help="calls before the profiled one (Triton JIT, caches)")
    args = ap.parse_args()
    E, P, d, I, K = PRESETS["released"]
    gen = torch.Generator(device=DEV).manual_seed(3)  # the draws of bench_kernels.qmoe_rows, in its order
    dense = [torch.randn(P, I, d, dtype=torch.bfloat16, device=DEV, generator=gen).mul_(d ** -0.5),
             torch.randn(P, I, d, dtype=torch.bfloat16, device=DEV, generator=gen).mul_(d ** -0.5),
             torch.randn(P, d, I, dtype=torch.bfloat16, device=DEV, generator=gen).mul_(I ** -0.5)]
    T = QMOE_T[0]
    weights, ids = kernels.score_topk_torch(torch.randn(T, E, device=DEV, generator=gen), None, K, 1.5)
    x = torch.randn(T, d, dtype=torch.bfloat16, device=DEV, generator=gen)
    quant = [quantize_stack(w, "fp4")[:2] for w in dense]  # [(packed, scales)] for w1, w3, w2
    del dense
    (w1, s1), (w3, s3), (w2, s2) = quant
    for _ in range(args.warmup):
        kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 10.0, 0, (s1, s3, s2))
    torch.cuda.synchronize()
    kernels.moe_experts_triton(x, weights, ids, w1, w3, w2, 10.0, 0, (s1, s3, s2))
    torch.cuda.synchronize()
    print(f"profiled call: T {T}, top-{K}, {int(torch.unique(ids).numel())} of {E} experts used")


if __name__ == "__main__":
    main()
