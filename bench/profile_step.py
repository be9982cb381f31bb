"""Where a decode step's kernels come from: one eager step under torch.profiler, kernels counted per
part (hc_pre, attention by layer kind, hc_post, MoE, head). Also: Engine-only throughput (no HTTP)
and the transformers static-batch baseline, repeated, to see its spread.

    python bench/profile_step.py [--batch 64] [--prompt 32] [--new 64 256]
"""
import argparse
import os
import sys
import time

import torch
from torch.autograd import profiler as autograd_profiler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dsv4_mini  # noqa: E402
from dsv4_mini import ModelConfig, build_model  # noqa: E402


def wrap(obj, name, label):
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)
    setattr(obj, name, wrapped)


def count_kernels(event):
    return len(event.kernels) + sum(count_kernels(c) for c in event.cpu_children)


def profile_parts(model, B, prompt, dev):
    cfg = model.config
    cache = model.new_cache(B, prompt + 16)
    ids = torch.randint(2, cfg.vocab_size, (B, prompt), device=dev)
    model.forward(ids, torch.zeros(B, dtype=torch.long, device=dev), cache, torch.arange(B, device=dev))
    for i, block in enumerate(model.layers):
        kind = {0: "sliding", 4: "csa"}.get(cfg.compress_ratios[i], "hca")
        block.hc_pre = (lambda f, lab: (lambda *a, **k: _rf(lab, f, a, k)))(block.hc_pre, "hc_pre")
        block.hc_post = (lambda f, lab: (lambda *a, **k: _rf(lab, f, a, k)))(block.hc_post, "hc_post")
        wrap(block.attn, "forward", f"attn_{kind}")
        wrap(block.ffn, "forward", "moe")
        wrap(block.attn_norm, "forward", "norm")
        wrap(block.ffn_norm, "forward", "norm")
    pos = torch.full((B,), prompt, device=dev)
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        model.forward(ids[:, -1:], pos, cache, torch.arange(B, device=dev), last_only=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("step"):
            model.forward(ids[:, -1:], pos, cache, torch.arange(B, device=dev), last_only=True)
        torch.cuda.synchronize()
    parts = {}
    total = 0
    for ev in prof.events():
        if ev.name == "step":
            total = count_kernels(ev)
        if ev.name in ("hc_pre", "hc_post", "moe", "norm") or ev.name.startswith("attn_"):
            n = count_kernels(ev)
            c, k = parts.get(ev.name, (0, 0))
            parts[ev.name] = (c + 1, k + n)
    print(f"B={B}: {total} kernels in one eager step")
    for name, (calls, k) in sorted(parts.items(), key=lambda x: -x[1][1]):
        print(f"  {name:12s} {calls:3d} calls {k:5d} kernels ({k / calls:.0f}/call)")
    print(f"  other        {total - sum(k for _, k in parts.values())}")
    ka = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    for e in sorted(ka, key=lambda e: -e.count)[:25]:
        print(f"  {e.count:5d}x {e.device_time_total / 1e3:7.3f} ms  {e.key[:100]}")


def _rf(label, fn, a, k):
    with torch.profiler.record_function(label):
        return fn(*a, **k)


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
    ap.add_argument("--parts", nargs="+", default=["profile", "engine", "hf"])
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
    if "profile" in args.parts:
        profile_parts(model, args.batch, args.prompt, dev)


if __name__ == "__main__":
    main()
