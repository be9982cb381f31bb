"""Expert-parallel benchmark: a skewed workload before and after the first rebalance, G real ranks.

    torchrun is started by this script:
    python bench/bench_ep.py --device cuda --gpus 2                       # mini
    python bench/bench_ep.py --device cuda --gpus 2 --preset flash --num-layers 4 --redundant 2
    python bench/bench_ep.py --device cpu --gpus 2 --preset tiny          # smoke run (gloo)
    python bench/bench_ep.py --device cuda --gpus 1                       # the EP path's own cost

--gpus 1 measures the expert-parallel machinery itself: the plain one-GPU server (`python serve.py`)
and a torchrun world of one (`torchrun --nproc-per-node 1 serve.py --ep-size 1`: process group, step
channel, all-reduce, per-rank MoE timer, all inside the decode graphs) in the same run, same workload;
it prints EP / plain for output tok/s at --concurrency and for the decode step time (p50 gap between
a request's tokens). Target on an H200: both within 15% of the plain server.

(--preset flash draws the random weights on each rank's GPU, its own slots only: --init-device model.)

One server (`torchrun --nproc-per-node G serve.py --eplb --ep-size G`), one fixed-concurrency streaming
workload (the mini model's router has a Zipf-like expert popularity, and hash layers follow token
frequency, so the load is skewed). Phase "before": trivial placement. Then one forced rebalance
(POST /eplb/rebalance, all layers, canary off) and the same workload again ("after"). Per phase:
output tok/s, per-step time (median gap between a request's tokens), per-rank MoE seconds (from
/eplb/state, timed by the GPU clock inside the decode graphs) and their max/mean, per-rank token load and balancedness.
The rebalance row gives the bytes received by rank 0 and the move time. Target: after the
rebalance, per-rank MoE time max/mean <= 1.10 and output tok/s higher than before.
Writes $OUT/bench_ep.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_serve import free_port, sweep_point, wait_ready  # noqa: E402  (same load generator)


def start(args, torchrun: bool = True) -> tuple[subprocess.Popen, str]:
    """One server: torchrun with --gpus ranks, or (torchrun=False) the plain one-process server."""
    port = free_port()
    head = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus),
             "--master-port", str(free_port()), "serve.py"] if torchrun else [sys.executable, "serve.py"])
    cmd = [*head, "--preset", args.preset, "--device", args.device,
           "--port", str(port), "--log-level", "warning", "--eplb", "--ep-size", str(args.gpus),
           "--ep-num-redundant-experts", str(args.redundant), "--eplb-rebalance-num-iterations", "1000000",
           "--eplb-window", "10000", "--eplb-layers-per-step", "0",  # the forced rebalance: all layers at once
           "--max-batch-size", str(args.concurrency),
           "--max-seq-len", str(args.prompt_len + args.output_len + 16)]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    cmd += ["--init-device", args.init_device]  # each rank draws its own slots' experts
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url


def phase(url: str, model: str, args) -> dict:
    before = httpx.get(url + "/eplb/state", timeout=60).json()
    row = sweep_point(url, model, args.concurrency, args)
    after = httpx.get(url + "/eplb/state", timeout=60).json()
    moe = [b - a for a, b in zip(before["ranks"]["moe_seconds_total"], after["ranks"]["moe_seconds_total"])]
    tokens = [b - a for a, b in zip(before["ranks"]["tokens_window"], after["ranks"]["tokens_window"])]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"output_tok_s": row["output_tok_s"], "step_ms_p50": row["tpot_p50"] * 1e3,
            "step_ms_p99": row["tpot_p99"] * 1e3, "rank_moe_seconds": moe,
            "moe_max_over_mean": max(moe) / mean(moe) if mean(moe) > 0 else float("nan"),
            "rank_tokens": tokens, "token_max_over_mean": max(tokens) / mean(tokens) if mean(tokens) else float("nan"),
            "balancedness": after["balancedness"]}


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def warm_up(url: str, model: str, args) -> None:
    """At the phase's full concurrency, one request per client: the batch shapes the measured phase
    meets (first-use Triton compiles, allocator growth) are paid here."""
    warm_len = args.warmup_output_len or min(args.output_len, args.concurrency + 8)
    warm = argparse.Namespace(**{**vars(args), "requests_per_client": 1, "output_len": warm_len})
    sweep_point(url, model, args.concurrency, warm)


def serve_once(args, torchrun: bool) -> dict:
    """Start a server, warm it up, measure one phase, stop it."""
    proc, url = start(args, torchrun)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        warm_up(url, model, args)
        row = sweep_point(url, model, args.concurrency, args)
    finally:
        stop(proc)
    return {"output_tok_s": row["output_tok_s"], "step_ms_p50": row["tpot_p50"] * 1e3,
            "step_ms_p99": row["tpot_p99"] * 1e3}


def ep_overhead(args) -> None:
    """--gpus 1: the plain server against a torchrun world of one (the EP path), same workload."""
    result = {"args": vars(args), "plain": serve_once(args, torchrun=False)}
    print("plain", json.dumps(result["plain"]), flush=True)
    result["ep_world_of_one"] = serve_once(args, torchrun=True)
    print("ep_world_of_one", json.dumps(result["ep_world_of_one"]), flush=True)
    plain, ep = result["plain"], result["ep_world_of_one"]
    result["tok_s_ratio"] = ep["output_tok_s"] / plain["output_tok_s"]
    result["step_ms_ratio"] = ep["step_ms_p50"] / plain["step_ms_p50"]
    print(f"\n{args.preset}, concurrency {args.concurrency}, device {args.device}: EP path (torchrun world of one) "
          f"vs the plain server")
    print(f"{'server':>16} {'out tok/s':>10} {'step p50':>9} {'step p99':>9}")
    for name, r in (("plain", plain), ("EP world of one", ep)):
        print(f"{name:>16} {r['output_tok_s']:>10.1f} {r['step_ms_p50']:>7.2f}ms {r['step_ms_p99']:>7.2f}ms")
    print(f"EP / plain: tok/s {result['tok_s_ratio']:.3f}, decode step {result['step_ms_ratio']:.3f}")
    met = result["tok_s_ratio"] >= 0.85 and result["step_ms_ratio"] <= 1.15
    print(f"target (EP tok/s >= 0.85x plain, step <= 1.15x plain): {'met' if met else 'MISS'}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_ep_overhead.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--gpus", type=int, default=2, help="ranks (torchrun processes)")
    p.add_argument("--preset", default="mini", choices=("tiny", "mini", "flash"))
    p.add_argument("--num-layers", type=int)
    p.add_argument("--redundant", type=int, default=4, help="--ep-num-redundant-experts")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--client-procs", type=int, default=4,
                   help="client processes (one Python process cannot parse a fast server's SSE streams)")
    p.add_argument("--init-device", choices=("cpu", "model"), default=None,
                   help="serve.py --init-device: where the random weights are drawn (default: model for "
                        "--preset flash, cpu otherwise)")
    p.add_argument("--warmup-output-len", type=int, default=0,
                   help="output tokens per request of the warm-up run (at the full --concurrency); 0 = "
                        "min(--output-len, --concurrency + 8): under torchrun every prompt is its own prefill "
                        "step, so the decode batch only reaches C if the first requests outlast C admissions")
    args = p.parse_args()
    if args.init_device is None:
        args.init_device = "model" if args.preset == "flash" else "cpu"
    args.sampling_body = {"temperature": args.temperature}  # bench_serve's request fields
    if args.gpus == 1:
        ep_overhead(args)
        return

    proc, url = start(args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        warm_up(url, model, args)
        result = {"args": vars(args), "before": phase(url, model, args)}
        print("before", json.dumps(result["before"]), flush=True)
        move = httpx.post(url + "/eplb/rebalance", timeout=600).json()
        record = httpx.get(url + "/eplb/state", timeout=60).json()["rebalances"][-1]
        result["rebalance"] = {**move, "bytes_received_rank0": record["bytes_moved"],
                               "move_seconds": record["move_seconds"], "slots_changed": record["slots_changed"],
                               "GB_per_s_rank0": record["bytes_moved"] / max(record["move_seconds"], 1e-9) / 1e9}
        print("rebalance", json.dumps(result["rebalance"]), flush=True)
        result["after"] = phase(url, model, args)
        print("after", json.dumps(result["after"]), flush=True)
    finally:
        stop(proc)

    b, a, m = result["before"], result["after"], result["rebalance"]
    print(f"\n{args.preset}{f' ({args.num_layers} layers)' if args.num_layers else ''}, {args.gpus} ranks, "
          f"{args.redundant} redundant slots, concurrency {args.concurrency}, device {args.device}")
    print(f"{'phase':>7} {'out tok/s':>10} {'step p50':>9} {'MoE s per rank':>24} {'MoE max/mean':>12} "
          f"{'tok max/mean':>12} {'balancedness':>12}")
    for name, r in (("before", b), ("after", a)):
        print(f"{name:>7} {r['output_tok_s']:>10.1f} {r['step_ms_p50']:>7.2f}ms "
              f"{' '.join(f'{x:.3f}' for x in r['rank_moe_seconds']):>24} {r['moe_max_over_mean']:>12.3f} "
              f"{r['token_max_over_mean']:>12.3f} {r['balancedness']:>12.3f}")
    print(f"rebalance: {m['slots_changed']} slots changed, {m['bytes_received_rank0'] / 2**20:.1f} MiB received by "
          f"rank 0 in {m['move_seconds'] * 1e3:.1f} ms ({m['GB_per_s_rank0']:.1f} GB/s)")
    met = a["moe_max_over_mean"] <= 1.10 and a["output_tok_s"] > b["output_tok_s"]
    print(f"target (after: MoE max/mean <= 1.10 and tok/s up): {'met' if met else 'MISS'}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_ep.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
