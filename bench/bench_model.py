"""Cached greedy decoding of dsv4_mini vs transformers' DeepseekV4ForCausalLM.generate.

Same config (the mini preset by default), same weights (ours, converted to HF names by checkpoint.py),
fp32 on CPU. Tokens/s = batch * new tokens / wall time of the whole generate call (prefill included).

    python bench/bench_model.py [--preset mini] [--prompt 32] [--new 16] [--batch 1 8] [--repeats 2]
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
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=16, help="new tokens per row")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs")
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
        with torch.inference_mode():
            ours_s, ours = best_time(lambda: generate(model, ids, args.new), args.repeats)
            hf_s, theirs = best_time(lambda: hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, eos_token_id=None, pad_token_id=V - 1), args.repeats)
        same = (ours[:, args.prompt:] == theirs[:, args.prompt:]).float().mean().item()
        rows.append((batch, batch * args.new / ours_s, batch * args.new / hf_s, hf_s / ours_s, same))

    print(f"\n{args.preset} preset, fp32 CPU, {torch.get_num_threads()} threads, prompt {args.prompt}, "
          f"{args.new} new tokens, best of {args.repeats}")
    print(f"| batch | dsv4_mini tok/s | transformers tok/s | speedup | same greedy tokens |")
    print(f"|---|---|---|---|---|")
    for batch, ours_tps, hf_tps, ratio, same in rows:
        print(f"| {batch} | {ours_tps:.1f} | {hf_tps:.1f} | {ratio:.2f}x | {same:.0%} |")


if __name__ == "__main__":
    main()
