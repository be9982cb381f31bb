"""Cached greedy decoding of dsv4_mini vs transformers' DeepseekV4ForCausalLM.generate.

Same config (the mini preset by default), same weights (ours, converted to HF names by checkpoint.py),
fp32 on CPU. Each side runs generate twice: with 1 new token (= prefill + the first token) and with
`--new` tokens. End-to-end tok/s = batch * new / wall time of the whole call (prefill included);
decode tok/s = batch * (new - 1) / (difference of the two wall times), i.e. the cached decode alone.

Then a memory-floor section (skip with --no-floor): the bytes a decode step must read (every
non-expert weight, the embedding rows of the step's tokens, the routed experts actually chosen,
counted from the `load` of a real run of ours on the same prompts, plus the KV cache / compressor
state the step attends over), divided by read bandwidths measured in the same run on the model's own
expert weights: `F.linear` with 1 row (torch's gemv), with 4 rows (the tile moe_experts_torch uses)
and a plain streaming read (`sum`). floor ms/step = bytes / bandwidth; HF ms/step / floor = the
largest decode speed-up over transformers any implementation could reach at that bandwidth.

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
from dsv4_mini import ModelConfig, generate  # noqa: E402
import weights  # noqa: E402
from weights import build_model  # noqa: E402


def hf_model(model, device=None, dtype=None):
    """transformers' DeepseekV4ForCausalLM with our model's weights. device / dtype: build it straight
    there (e.g. a released width in bf16 on the GPU, next to ours); default: CPU, fp32."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    config = DeepseekV4Config(**model.config.to_hf_dict(), attn_implementation="eager")
    if device is None and dtype is None:
        hf = DeepseekV4ForCausalLM(config).eval()
    else:
        with torch.device(device or "cpu"):
            hf = DeepseekV4ForCausalLM._from_config(config, dtype=dtype or torch.float32).eval()
    missing, unexpected = hf.load_state_dict(checkpoint.official_to_hf_state_dict(weights.official_state_dict(model),
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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-floor", action="store_true", help="skip the memory-floor section")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()

    model = build_model(getattr(ModelConfig, args.preset)(), seed=0)
    hf = hf_model(model)
    V = model.config.vocab_size
    rows, prompts, tokens_of = [], {}, {}
    for batch in args.batch:
        ids = torch.randint(2, V, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prompts[batch] = ids

        def ours(new, m=model):
            return generate(m, ids, new)

        def theirs(new):
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, eos_token_id=None, pad_token_id=V - 1)
        impls = [("dsv4_mini eager", ours), ("transformers", theirs)]
        out = {}
        with torch.inference_mode():
            for name, fn in impls:
                first_s, _ = best_time(lambda: fn(1), args.repeats)
                total_s, tokens = best_time(lambda: fn(args.new), args.repeats)
                out[name] = (first_s, total_s, tokens)
        ref = out["transformers"][2][:, args.prompt:]
        tokens_of[batch] = out["dsv4_mini eager"][2]
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
    if not args.no_floor:
        ours_tps = {b: d for b, name, _, d, _, _ in rows if name == "dsv4_mini eager"}
        print_floor(model, prompts, tokens_of, args.new, {b: d for b, (d, _) in hf.items()}, ours_tps)


# ---------------------------------------------------------------------------------------------------
# Memory floor
# ---------------------------------------------------------------------------------------------------

TARGETS = {1: 5.0, 8: 3.0}  # issue #2: decode tok/s vs transformers


def measure_bandwidth(model, repeats=5):
    """GB/s reading the model's routed-expert weights (all layers and slots: far larger than the
    caches) three ways, best of `repeats`: F.linear with a 1-row and a 4-row input, and sum()."""
    import torch.nn.functional as F
    mats = [w[p] for i in range(len(model.layers)) for w in model.expert_weights(i) for p in range(w.shape[0])]
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    whole = [w for i in range(len(model.layers)) for w in model.expert_weights(i)]
    xs = {r: {k: torch.randn(r, k, dtype=mats[0].dtype) for k in {m.shape[1] for m in mats}} for r in (1, 4)}

    def rate(fn):
        fn()  # warm-up (page faults, first-call setup)
        best = min(_timed(fn) for _ in range(repeats))
        return nbytes / best / 1e9
    with torch.inference_mode():
        return {"gemv": rate(lambda: [F.linear(xs[1][m.shape[1]], m) for m in mats]),
                "tile4": rate(lambda: [F.linear(xs[4][m.shape[1]], m) for m in mats]),
                "stream": rate(lambda: [w.sum() for w in whole])}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_bytes(model, ids, new):
    """generate()'s cached greedy decode, with a fresh `load` [L,P] per decode step: the routed
    experts each step really reads. -> (tokens, mean bytes per decode step by kind, distinct
    experts per step)."""
    c = model.config
    B, S = ids.shape
    L, P = c.num_hidden_layers, model.num_physical_experts
    elem = model.embed.weight.element_size()
    expert_bytes = sum(w[0].numel() * w.element_size() for w in model.expert_weights(0))
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".ffn.experts." not in n and n != "embed.weight")
    cache = model.new_cache(B, S + new)
    slots = torch.arange(B)
    start = torch.zeros(B, dtype=torch.long)
    logits = model.forward(ids, start, cache, slots, last_only=True)
    tokens, per_step = [ids], []
    for step in range(new):
        next_token = logits.argmax(-1, keepdim=True)
        tokens.append(next_token)
        if step + 1 < new:
            load = torch.zeros(L, P, dtype=torch.int32)
            logits = model.forward(next_token, start + S + step, cache, slots, last_only=True, load=load)
            distinct = int((load > 0).sum())
            per_step.append({"experts": distinct * expert_bytes, "distinct": distinct,
                             "embed": next_token.unique().numel() * c.hidden_size * elem,
                             "kv": B * _kv_bytes_per_row(c, S + step + 1, elem)})
    mean = {k: sum(d[k] for d in per_step) / len(per_step) for k in per_step[0]}
    mean["other"] = other
    return torch.cat(tokens, dim=1), mean


def _kv_bytes_per_row(c, n, elem):
    """Cache bytes one decode row reads attending at sequence length n: sliding window, compressed
    entries (HCA: all visible; CSA: the indexer's keys + its top-k entries) and compressor rings."""
    total = 0
    for i in range(c.num_hidden_layers):
        m = c.layer_ratio(i)
        total += min(n, c.sliding_window) * c.head_dim * elem
        if m == 0:
            continue
        coff = 2 if m == 4 else 1
        total += 2 * (coff * m) * (coff * c.head_dim) * 4  # kv + gate rings, fp32
        if m == 4:
            total += (n // m) * c.index_head_dim * elem + min(c.index_topk, n // m) * c.head_dim * elem
            total += 2 * (2 * m) * (2 * c.index_head_dim) * 4
        else:
            total += (n // m) * c.head_dim * elem
    return total


def print_floor(model, prompts, tokens_of, new, hf_tps, ours_tps):
    bw = measure_bandwidth(model)
    c = model.config
    print(f"\nMemory floor, {torch.get_num_threads()} thread(s), {str(model.embed.weight.dtype).split('.')[-1]} weights. "
          f"Read bandwidth over the {len(model.layers)} layers' routed-expert weights: F.linear 1 row {bw['gemv']:.1f} GB/s, "
          f"4 rows {bw['tile4']:.1f} GB/s, stream (sum) {bw['stream']:.1f} GB/s")
    print("| batch | experts read/step (of L*K*batch picks) | expert MB | other weights MB | embed+KV MB | total MB/step "
          "| floor ms @1-row gemv | floor ms @stream | ours ms/step | HF ms/step | max decode vs HF @gemv | max @stream "
          "| target | target needs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for batch, ids in prompts.items():
        tokens, mb = decode_bytes(model, ids, new)
        if not torch.equal(tokens, tokens_of[batch]):
            raise RuntimeError("the load-counting decode diverged from the timed run of ours")
        total = mb["experts"] + mb["other"] + mb["embed"] + mb["kv"]
        floor_gemv, floor_stream = total / bw["gemv"] / 1e6, total / bw["stream"] / 1e6  # ms
        hf_ms, ours_ms = batch / hf_tps[batch] * 1e3, batch / ours_tps[batch] * 1e3
        target = TARGETS.get(batch)
        if target is None:
            where = "–"
        else:
            need = hf_ms / target
            where = (f"{need:.2f} ms/step: under both floors (unreachable)" if need < floor_stream else
                     f"{need:.2f} ms/step: between the floors (needs a faster-than-torch gemv)" if need < floor_gemv else
                     f"{need:.2f} ms/step: above both floors (reachable in principle)")
            verdicts.append(f"batch {batch}: the {target:g}x target needs {where}; memory floor {floor_gemv:.2f} ms/step "
                            f"at torch's 1-row gemv rate, {floor_stream:.2f} ms/step at stream rate")
        picks = c.num_hidden_layers * c.num_experts_per_tok * batch
        print(f"| {batch} | {mb['distinct']:.1f} of {picks} | {mb['experts'] / 1e6:.1f} | {mb['other'] / 1e6:.1f} | "
              f"{(mb['embed'] + mb['kv']) / 1e6:.1f} | {total / 1e6:.1f} | {floor_gemv:.2f} | {floor_stream:.2f} | "
              f"{ours_ms:.2f} | {hf_ms:.2f} | {hf_ms / floor_gemv:.2f}x | {hf_ms / floor_stream:.2f}x | "
              f"{'–' if target is None else f'{target:g}x'} | {where} |")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
