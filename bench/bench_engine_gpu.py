"""GPU checks below the HTTP layer (mini, bf16, one GPU):

  check   the Triton mHC kernels (hc_pre/hc_post) against the torch reference on the GPU;
  engine  Engine throughput alone (no HTTP): B requests of --prompt random tokens, greedy,
          --new tokens each, with CUDA graphs, prompt tails fed through the graphed step (64) or not (0);
  hf      transformers `generate` as one static batch on the same config, twice (to see its spread).

    python bench/bench_engine_gpu.py [--parts check engine hf] [--batch 64] [--prompt 32] [--new 64 256]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dsv4_mini  # noqa: E402
from dsv4_mini import ModelConfig  # noqa: E402
from weights import build_model  # noqa: E402


def engine_throughput(model, B, prompt, new, dev, prefill_tail):
    from engine import Engine, SamplingParams, Sequence
    eng = Engine(model, max_batch_size=B, max_seq_len=prompt + new + 8, max_queue=1000, decode_graphs=True,
                 prefill_tail=prefill_tail)
    got = []
    done = []

    def cb(tok, reason):
        if tok is not None:
            got.append(tok)
        if reason is not None:
            done.append(reason)
    gen = torch.Generator().manual_seed(0)
    def run(n_new):
        got.clear(); done.clear()
        for i in range(B):
            ids = torch.randint(2, model.config.vocab_size, (prompt,), generator=gen).tolist()
            eng.submit(Sequence(ids, SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True), cb))
        t0 = time.perf_counter()
        steps = 0
        while len(done) < B:
            eng.step(); steps += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t0, steps
    run(4)
    wall, steps = run(new)
    print(f"engine B={B} prompt {prompt} new {new} tail {prefill_tail}: {B * new / wall:,.0f} tok/s, "
          f"{steps} steps, {wall * 1e3 / steps:.2f} ms/step")


def hf_baseline(model, B, prompt, new, dev, repeats):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import hf_model
    cpu = build_model(model.config, seed=0)
    hf = hf_model(cpu).to(device=dev, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (B, prompt), device=dev)
    with torch.no_grad():
        hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2, do_sample=False)
        for r in range(repeats):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            torch.cuda.synchronize()
            print(f"HF generate B={B} prompt {prompt} new {new}: {B * new / (time.perf_counter() - t0):,.0f} tok/s")


def check_mhc(dev):
    """Triton hc_pre/hc_post vs the torch reference on the GPU (fp32 and bf16 streams)."""
    n, d = 4, 512
    for dtype in (torch.float32, torch.bfloat16):
        for T in (1, 64, 4096):
            h = torch.randn(T, 1, n, d, device=dev).to(dtype)
            fn = torch.randn((2 + n) * n, n * d, device=dev) / (n * d) ** 0.5
            scale, base = 1 + 0.3 * torch.randn(3, device=dev), 0.5 * torch.randn((2 + n) * n, device=dev)
            os.environ["DSV4_KERNELS"] = "torch"
            ref = dsv4_mini.hc_pre(h, fn, scale, base, 20, 1e-6, 1e-6)
            ref_post = dsv4_mini.hc_post(ref[0], h, ref[1], ref[2])
            os.environ["DSV4_KERNELS"] = "triton"
            got = dsv4_mini.hc_pre(h, fn, scale, base, 20, 1e-6, 1e-6)
            got_post = dsv4_mini.hc_post(ref[0], h, ref[1], ref[2])
            del os.environ["DSV4_KERNELS"]
            diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip((*ref, ref_post), (*got, got_post))]
            print(f"mhc check {dtype} T={T}: max|diff| x {diffs[0]:.1e} post {diffs[1]:.1e} comb {diffs[2]:.1e} "
                  f"hc_post {diffs[3]:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--parts", nargs="+", default=["check", "engine", "hf"], choices=["check", "engine", "hf"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model(ModelConfig.mini(), seed=0, device=dev, dtype=torch.bfloat16)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if "check" in args.parts:
        check_mhc(dev)
    if "engine" in args.parts:
        for new in args.new:
            for tail in (64, 0):
                engine_throughput(model, args.batch, args.prompt, new, dev, tail)
    if "hf" in args.parts:
        for new in args.new:
            hf_baseline(model, args.batch, args.prompt, new, dev, 2)


if __name__ == "__main__":
    main()
