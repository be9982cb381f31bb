"""Cached greedy decoding of dsv4_mini vs transformers' DeepseekV4ForCausalLM.generate.

Same config (the mini preset by default), same weights (ours, converted to HF names by checkpoint.py),
fp32 on CPU. Each side runs generate twice: with 1 new token (= prefill + the first token) and with
`--new` tokens. End-to-end tok/s = batch * new / wall time of the whole call (prefill included);
decode tok/s = batch * (new - 1) / (difference of the two wall times), i.e. the cached decode alone.
--compile also times ours after model.compile_decode() (compile time reported separately).

    python bench/bench_model.py [--preset mini] [--prompt 256] [--new 64] [--batch 1 8] [--repeats 1]
"""
import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import checkpoint  # noqa: E402
from dsv4_mini import ModelConfig, build_model, generate  # noqa: E402


def hf_model(model):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    config = DeepseekV4Config(**model.config.to_hf_dict(), attn_implementation="eager")
    hf = DeepseekV4ForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(checkpoint.official_to_hf_state_dict(model.official_state_dict(),
                                                                                  model.config), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weights do not line up: missing {missing}, unexpected {unexpected}")
    return hf


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini", choices=["tiny", "mini"])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--compile", action="store_true", help="also time ours with model.compile_decode()")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()

    model = build_model(getattr(ModelConfig, args.preset)(), seed=0)
    hf = hf_model(model)
    V = model.config.vocab_size
    rows = []
    for batch in args.batch:
        ids = torch.randint(2, V, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))

        def ours(new, m=model):
            return generate(m, ids, new)

        def theirs(new):
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, eos_token_id=None, pad_token_id=V - 1)
        impls = [("dsv4_mini eager", ours), ("transformers", theirs)]
        if args.compile:
            import copy
            compiled = copy.deepcopy(model).compile_decode()
            t0 = time.perf_counter()
            ours(2, compiled)  # compiles for this batch's prefill and decode shapes
            print(f"compile_decode() for batch {batch}: {time.perf_counter() - t0:.1f}s (not in the figures)")
            impls.insert(1, ("dsv4_mini compile_decode", lambda new: ours(new, compiled)))
        out = {}
        with torch.inference_mode():
            for name, fn in impls:
                first_s, _ = best_time(lambda: fn(1), args.repeats)
                total_s, tokens = best_time(lambda: fn(args.new), args.repeats)
                out[name] = (first_s, total_s, tokens)
        ref = out["transformers"][2][:, args.prompt:]
        for name, (first_s, total_s, tokens) in out.items():
            decode_tps = batch * (args.new - 1) / max(total_s - first_s, 1e-9)
            rows.append((batch, name, batch * args.prompt / first_s, decode_tps, batch * args.new / total_s,
                         (tokens[:, args.prompt:] == ref).float().mean().item()))

    print(f"\n{args.preset} preset, fp32 CPU, {torch.get_num_threads()} threads, prompt {args.prompt} tokens, "
          f"{args.new} new tokens per row, best of {args.repeats}")
    print("| batch | implementation | prefill tok/s | decode tok/s | end-to-end tok/s | decode vs HF | e2e vs HF | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|")
    hf = {b: (d, e) for b, name, _, d, e, _ in rows if name == "transformers"}
    for batch, name, prefill_tps, decode_tps, e2e_tps, same in rows:
        print(f"| {batch} | {name} | {prefill_tps:.0f} | {decode_tps:.1f} | {e2e_tps:.1f} | "
              f"{decode_tps / hf[batch][0]:.2f}x | {e2e_tps / hf[batch][1]:.2f}x | {same:.0%} |")

if __name__ == "__main__":
    main()
