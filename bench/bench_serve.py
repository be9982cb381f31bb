"""Serving benchmark: an OpenAI-API load generator against a dsv4-mini server it starts itself.

    python bench/bench_serve.py                                 # CPU, mini, concurrency 1..64, EPLB off and on
    python bench/bench_serve.py --device cuda --preset flash --num-layers 4 --hf-baseline
    python bench/bench_serve.py --device cuda --preset flash --num-layers 8 --concurrency 64 \
        --eplb-modes off --sampling greedy --expert-dtype bf16 fp4     # routed experts kept in FP4 vs bf16
    python bench/bench_serve.py --device cuda --concurrency 64 --output-len 256 --eplb-modes off on \
        --sampling greedy sampled --temperature 1 --top-p 0.9     # sampled vs greedy, EPLB on vs off

For each EPLB setting, sampling setting and concurrency C: C clients each send `requests_per_client`
streaming completions (fixed seeds, ignore_eos, fixed prompt/output lengths). "greedy" is temperature 0;
"sampled" uses --temperature/--top-p/--top-k/--min-p. Reports output tok/s, TTFT and per-output-token
latency p50/p99, the server's EPLB balancedness, and the ratios sampled/greedy and EPLB mode/off. The baseline is transformers
`generate` on the same weights as one static batch of C prompts (where the HF model is available).
`--preset flash` draws the random weights on the GPU (`--init-device model`, the default there), in the
server and for the baseline alike.
`--expert-dtype A B ...` runs the whole sweep once per routed-expert format (serve.py --expert-dtype) and
adds each row's tok/s ratio to the first format's row at the same EPLB mode and concurrency.
Prints a table; writes JSON to $OUT/bench_serve.json when OUT is set.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 600.0) -> None:
    """Until the server at url answers /health with 200 (the model is loaded); RuntimeError if it exits
    first (with its output when piped), TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}" + (f":\n{output}" if output else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not ready after {timeout_s:.0f} s")


def start_server(args, eplb: str, expert_dtype: str | None = None) -> tuple[subprocess.Popen, str, float]:
    """eplb: "off"; "record" (count load on every step, never move: P = E, one rank, so the only
    difference from "off" is the counting); "on" (EP ranks, redundant slots, a rebalance check every
    --eplb-period steps over a window of as many steps: serve.py's defaults); "slots" (no EPLB, but the
    redundant slots of "on" in their trivial placement: on one GPU every slot's weights are read each
    step, so "on" does that much more expert work than "off" whatever EPLB costs; on / slots is EPLB's own cost).
    expert_dtype: serve.py --expert-dtype (None: the server's default)."""
    port = free_port()
    flags = ["--preset", args.preset, "--device", args.device, "--port", str(port), "--log-level", "warning",
             "--max-batch-size", str(max(args.concurrency)), "--max-seq-len",
             str(2 * args.prompt_len + args.output_len + 8)]  # a prompt of n words can take more than 2n tokens
    if args.num_layers:
        flags += ["--num-layers", str(args.num_layers)]
    flags += ["--init-device", args.init_device]
    if expert_dtype:
        flags += ["--expert-dtype", expert_dtype]
    if eplb == "record":
        flags += ["--eplb", "--eplb-rebalance-num-iterations", str(10**9)]
    elif eplb == "slots":
        flags += ["--ep-num-redundant-experts", str(args.redundant)]
    elif eplb == "on":
        flags += ["--eplb", "--ep-size", str(args.ep_size), "--ep-num-redundant-experts", str(args.redundant),
                  "--eplb-rebalance-num-iterations", str(args.eplb_period), "--eplb-window", str(args.eplb_period)]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "serve.py", *flags], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    return proc, url, time.monotonic() - started


def make_prompt(rng: random.Random, n_words: int) -> str:
    words = "the model routes every token to a few experts and the balancer moves hot ones".split()
    return " ".join(rng.choice(words) for _ in range(n_words))


async def one_request(http, url, model, prompt, args, seed) -> dict:
    """One streaming completion. Counts the tokens the server says it generated (usage) and fails
    loudly on any finish other than "length": an aborted stream must never count as throughput."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, **args.sampling_body,
            "seed": seed, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, finish, usage = [], None, None
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=None) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if choice.get("text"):
                    stamps.append(time.perf_counter())
    if finish != "length" or not usage or usage["completion_tokens"] != args.output_len:
        raise RuntimeError(f"request ended with finish_reason={finish!r}, usage={usage}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": gaps, "tokens": usage["completion_tokens"],
            "end": time.time()}


def _prompt(args, concurrency: int, client: int, request: int) -> str:
    """The same prompt for (client, request) however the clients are spread over processes."""
    return make_prompt(random.Random(f"{args.seed}/{concurrency}/{client}/{request}"), args.prompt_len // 2)


async def _clients(url, model, clients: list[int], concurrency: int, args, start_at: float | None) -> list[dict]:
    """Run these clients (each sends requests_per_client requests in turn) on one event loop."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=len(clients) + 4)) as http:
        if start_at is not None:  # processes start together at an agreed wall-clock time
            await asyncio.sleep(max(0.0, start_at - time.time()))

        async def client(c):
            return [await one_request(http, url, model, _prompt(args, concurrency, c, i), args,
                                      args.seed + 1000 * c + i) for i in range(args.requests_per_client)]
        return [r for rs in await asyncio.gather(*[client(c) for c in clients]) for r in rs]


def _clients_in_process(url, model, clients, concurrency, args, start_at):
    return asyncio.run(_clients(url, model, clients, concurrency, args, start_at))


def sweep_point(url, model, concurrency, args) -> dict:
    """`concurrency` streaming clients against the server, spread over `args.client_procs` processes
    (a single Python client process parsing ~10k SSE events/s would itself be the bottleneck)."""
    procs = max(1, min(getattr(args, "client_procs", 1), concurrency))
    shares = [list(range(p, concurrency, procs)) for p in range(procs)]
    if procs == 1:
        start = time.time()
        results = _clients_in_process(url, model, shares[0], concurrency, args, None)
    else:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            start = time.time() + 3.0  # time for the processes to start and import
            futures = [pool.submit(_clients_in_process, url, model, share, concurrency, args, start) for share in shares]
            results = [r for f in futures for r in f.result()]
    wall = max(r["end"] for r in results) - start
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"]) or [0.0]
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "output_tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "tpot_p50": pct(gaps, 0.5), "tpot_p99": pct(gaps, 0.99),
            "client_procs": procs}


_HF_CACHE: dict = {}  # "model": transformers' model, built by the first hf_baseline call


def hf_baseline(args, concurrency: int) -> float | None:
    """Output tok/s of transformers `generate` on our weights, one static batch (None if unavailable).

    The weights come from the server's init (--init-device): with "model" on CUDA (the flash default)
    ours are drawn on the GPU in bf16 and transformers' model is built there too (flash, 2 layers:
    ~28 GB each plus the ~26 GB stacked-expert copy while converting), never in fp32 on the host."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import torch
        import dsv4_mini
        import weights
        from bench_model import hf_model  # same weights, transformers' names
        config = getattr(dsv4_mini.ModelConfig, args.preset)()
        if args.num_layers:
            config = config.truncated(args.num_layers)
        device = "cuda" if args.device == "cuda" else "cpu"
        if "model" not in _HF_CACHE:  # built once, for every concurrency row
            if args.init_device == "model" and device == "cuda":  # the server's GPU init, bf16 like the server
                model = weights.build_model(config, seed=0, device=device, dtype=torch.bfloat16, init_device=device)
                hf = hf_model(model, device=device, dtype=torch.bfloat16)
            else:
                model = weights.build_model(config, seed=0)
                hf = hf_model(model)
                hf = hf.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            del model
            _HF_CACHE["model"] = hf.eval()
        hf = _HF_CACHE["model"]
        ids = torch.randint(0, config.vocab_size, (concurrency, args.prompt_len), device=device)
        with torch.no_grad():  # warm-up: CUDA context, kernels, allocator
            hf.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                        min_new_tokens=args.output_len, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return concurrency * args.output_len / (time.perf_counter() - t0)
    except Exception as error:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        print(f"hf baseline unavailable: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def sampling_body(args, setting: str) -> dict:
    """The request's sampling fields for a --sampling setting (top_k / min_p only when on)."""
    if setting == "greedy":
        return {"temperature": 0.0}
    body = {"temperature": args.temperature, "top_p": args.top_p}
    if args.top_k > 0:
        body["top_k"] = args.top_k
    if args.min_p > 0:
        body["min_p"] = args.min_p
    return body


def sweep_server(args, eplb: str, expert_dtype: str | None, meta: dict) -> list[dict]:
    """Start one server (EPLB mode, expert format); per sampling setting, warm it up at the largest
    concurrency (first-use compiles and captures stay out of the timing), then run every concurrency."""
    rows = []
    proc, url, ready_s = start_server(args, eplb, expert_dtype)
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    meta[f"ready_seconds_eplb_{eplb}" + (f"_{expert_dtype}" if expert_dtype else "")] = ready_s
    try:
        for setting in args.sampling:
            point_args = argparse.Namespace(**vars(args), sampling_body=sampling_body(args, setting))
            warm_up = argparse.Namespace(**{**vars(point_args), "output_len": 8})
            sweep_point(url, model, max(args.concurrency), warm_up)
            for c in args.concurrency:
                row = sweep_point(url, model, c, point_args)
                row["eplb"], row["sampling"], row["expert_dtype"] = eplb, setting, expert_dtype
                if eplb not in ("off", "slots"):  # what EPLB did during the run, so a fast "on" is seen to be working
                    state = httpx.get(url + "/eplb/state").json()
                    row["balancedness"] = state.get("balancedness")
                    row["eplb_counters"] = {**state.get("counters", {}),
                                            "skipped_by_reason": state.get("rebalances_skipped_by_reason")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return rows


def print_ratios(rows: list[dict]) -> None:
    """sampled / greedy at each (format, EPLB mode, C); EPLB mode / off at each (format, sampling, C);
    each format / the first format at each (EPLB mode, sampling, C)."""
    runs = {}  # repeated modes (--eplb-modes off on off on): the mean of their runs
    for r in rows:
        runs.setdefault((r["expert_dtype"], r["eplb"], r["sampling"], r["concurrency"]), []).append(r["output_tok_s"])
    tok_s = {key: sum(values) / len(values) for key, values in runs.items()}
    first_format = rows[0]["expert_dtype"] if rows else None
    lines = []
    for (fmt, eplb, sampling, c), value in tok_s.items():
        where = f"experts {fmt or '-':>4}  C={c:<4}"
        greedy = tok_s.get((fmt, eplb, "greedy", c))
        if sampling != "greedy" and greedy:
            lines.append(f"  {where} eplb {eplb:>6}: {sampling} / greedy = {value / greedy:.3f}")
        for base_mode in ("off", "slots") if eplb == "on" else ("off",):
            base_value = tok_s.get((fmt, base_mode, sampling, c))
            if eplb != base_mode and base_value:
                lines.append(f"  {where} {sampling:>8}: eplb {eplb} / {base_mode} = {value / base_value:.3f}")
        base = tok_s.get((first_format, eplb, sampling, c))
        if fmt != first_format and base:
            lines.append(f"  {where} eplb {eplb:>6} {sampling}: {fmt} / {first_format} = {value / base:.3f}")
    if lines:
        print("\nratios (output tok/s)\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", default="mini", choices=("tiny", "mini", "flash"))
    p.add_argument("--num-layers", type=int, help="truncate the model (e.g. flash width, 4 layers)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt words x2 (roughly tokens)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--ep-size", type=int, default=4)
    p.add_argument("--redundant", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"],
                   help="greedy: temperature 0, like the HF baseline; sampled: the settings below")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled setting")
    p.add_argument("--top-p", type=float, default=0.9, help="of the sampled setting")
    p.add_argument("--top-k", type=int, default=0, help="of the sampled setting (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="of the sampled setting (0 = off)")
    p.add_argument("--eplb-modes", nargs="+", default=["off", "record", "on"], choices=["off", "record", "on", "slots"],
                   help="one server each, in this order (slots: off with on's redundant slots, see start_server); a mode given twice (off on off on) is run twice and "
                        "the ratios use the mean of its runs (interleaving evens out drift of the machine)")
    p.add_argument("--eplb-period", type=int, default=100,
                   help='"on": forward steps between rebalance checks, and the window (serve.py\'s default: 100)')
    p.add_argument("--client-procs", type=int, default=4, help="load-generator processes (clients spread over them)")
    p.add_argument("--hf-baseline", action="store_true", help="also time transformers generate (static batch)")
    p.add_argument("--init-device", choices=("cpu", "model"), default=None,
                   help="serve.py --init-device: where the random weights are drawn (default: model for "
                        "--preset flash, cpu otherwise); the HF baseline uses the same init")
    p.add_argument("--expert-dtype", nargs="+", choices=("bf16", "fp8", "fp4"), default=None,
                   help="serve.py --expert-dtype, one sweep per format (e.g. bf16 fp4); default: the server's")
    args = p.parse_args()
    if args.init_device is None:
        args.init_device = "model" if args.preset == "flash" else "cpu"

    rows, meta = [], {"args": vars(args)}
    for expert_dtype in args.expert_dtype or [None]:
        for eplb in args.eplb_modes:
            rows += sweep_server(args, eplb, expert_dtype, meta)
    if args.hf_baseline:
        for row in rows:  # transformers runs bf16 experts, greedy
            if row["eplb"] == "off" and row["sampling"] == "greedy" and row["expert_dtype"] in (None, "bf16"):
                row["hf_generate_tok_s"] = hf_baseline(args, row["concurrency"])

    header = (f"{'experts':>7} {'eplb':>6} {'sampling':>8} {'conc':>4} {'out tok/s':>10} {'ttft p50':>9} "
              f"{'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9} {'bal':>5} {'hf tok/s':>9}")
    print("\n" + header)
    for r in rows:
        hf = r.get("hf_generate_tok_s")
        print(f"{r['expert_dtype'] or '-':>7} {r['eplb']:>6} {r['sampling']:>8} {r['concurrency']:>4} "
              f"{r['output_tok_s']:>10.1f} {r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms "
              f"{r['tpot_p50'] * 1e3:>7.1f}ms {r['tpot_p99'] * 1e3:>7.1f}ms "
              f"{r.get('balancedness') or float('nan'):>5.2f} {hf if hf is not None else float('nan'):>9.1f}")
    print_ratios(rows)
    for r in rows:
        if "eplb_counters" in r:
            print(f"eplb {r['eplb']} {r['sampling']} C={r['concurrency']} (cumulative): {json.dumps(r['eplb_counters'])}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_serve.json"
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
