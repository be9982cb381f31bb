"""EPLB policy: does rebalancing pay, or churn on sampling noise? Synthetic traffic, or the real server.

Synthetic (default; no model, no server): `SlotsOnly` stands in for the model (the maps and one tiny
weight row per slot) and `SyntheticTraffic` draws each step's routed (token, k) choices from a fixed
skewed popularity per layer (Zipf over a random expert order), each choice to a uniformly random
replica of its expert, as the routing hash does. Shapes are the demo server's (`--preset mini
--ep-size 4 --ep-num-redundant-experts 4`: L=8, E=32, P=36, G=4); period and window are 50 steps.

    python bench/bench_eplb_policy.py                 # the table: policy x choices per step
    python bench/bench_eplb_policy.py --steps 2000 --choices 4 16 64

For each run: the first rebalance's slots and its gain in *true* balancedness (placement against the
popularity itself, no sampling noise), the slots later rebalances move per period as a share of the
first one's, the true balancedness at the end; with a popularity shift halfway, how many steps after
it the policy moved and the end's true balancedness against a fresh plan on the new popularity.

Server (`--server`): `serve.py --preset mini` with the demo's EPLB flags as a subprocess, chat
requests of ordinary text `--concurrency` at a time, then every decision from `/eplb/state`:

    OMP_NUM_THREADS=1 python bench/bench_eplb_policy.py --server --concurrency 1 8 --requests 32

Baseline in both: `before-14`, the policy before #14 (plan on the last window, move whatever
changes), which is this code with `--eplb-load-half-life 1e-9 --eplb-min-gain -1
--eplb-gain-noise-sigmas 0 --eplb-whole-plan`: no decayed memory, so the only plan is fitted to
the recent half window and, refitted, to the whole last window, and every change moves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serve import free_port, wait_ready  # noqa: E402
from eplb import EPLBConfig, EPLBManager, ExpertLocation  # noqa: E402
from planner import balancedness, rank_load, rebalance_experts, replica_load  # noqa: E402

L, E, P, G = 8, 32, 36, 4  # the demo server: mini preset, 4 ranks, 4 redundant slots
PERIOD = 50

POLICIES = {  # EPLBConfig fields, and the same as serve.py flags
    "before-14": dict(load_half_life=1e-9, min_gain=-1.0, gain_noise_sigmas=0.0, per_layer=False),
    "default": dict(),
    "whole-plan": dict(per_layer=False),
    "1-sigma": dict(gain_noise_sigmas=1.0),
}
POLICY_FLAGS = {
    "before-14": ["--eplb-load-half-life", "1e-9", "--eplb-min-gain", "-1", "--eplb-gain-noise-sigmas", "0",
                  "--eplb-whole-plan"],
    "default": [],
    "whole-plan": ["--eplb-whole-plan"],
    "1-sigma": ["--eplb-gain-noise-sigmas", "1"],
}


class SlotsOnly:
    """The model as EPLBManager sees it: maps (phy2log / log2phy / logcnt) and per-layer slot weights
    [P, 4], each slot's row holding its expert id (so a test can check that weights follow the maps)."""

    def __init__(self, num_layers: int = L, num_experts: int = E, num_physical: int = P, num_ranks: int = G):
        loc = ExpertLocation.trivial(num_layers, num_experts, num_physical, num_ranks)
        self.phy2log, self.log2phy, self.logcnt = loc.phy2log, loc.log2phy, loc.logcnt
        self.weights = [loc.phy2log[layer].double().view(-1, 1).repeat(1, 4) for layer in range(num_layers)]

    def expert_weights(self, layer: int) -> list[torch.Tensor]:
        return [self.weights[layer]]


def zipf_popularity(num_layers: int, num_experts: int, skew: float, seed: int) -> torch.Tensor:
    """[L, E] float64 choice probabilities: Zipf(skew) over a random expert order per layer."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_layers)])
    p = 1.0 / (order.double() + 1) ** skew
    return p / p.sum(1, keepdim=True)


class SyntheticTraffic:
    """Each step: `choices` routed (token, k) picks per layer, drawn from `popularity` [L, E]; each
    pick goes to a uniformly random replica of its expert (the routing hash's even split)."""

    def __init__(self, popularity: torch.Tensor, choices: int, seed: int):
        self.popularity, self.choices = popularity, choices
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, manager: EPLBManager) -> None:
        """Add one step's counts to manager.load, then close the step."""
        loc = manager.location
        num_layers = self.popularity.shape[0]
        picks = torch.multinomial(self.popularity, self.choices, replacement=True, generator=self.gen)  # [L, n]
        replicas = loc.logcnt.gather(1, picks).long()  # [L, n]
        r = (torch.rand(picks.shape, generator=self.gen, dtype=torch.float64) * replicas).long()
        slots = loc.log2phy[torch.arange(num_layers).view(-1, 1), picks, r].long()  # [L, n]
        manager.load.scatter_add_(1, slots, torch.ones_like(slots, dtype=manager.load.dtype))
        manager.after_step()


def true_balancedness(popularity: torch.Tensor, phy2log: torch.Tensor, num_ranks: int = G) -> float:
    """The placement against the popularity itself (what an infinite window would measure)."""
    return float(balancedness(rank_load(replica_load(popularity, phy2log), num_ranks)).mean())


def fresh_plan_balancedness(popularity: torch.Tensor, num_physical: int = P, num_ranks: int = G) -> float:
    """What a plan fitted to the popularity itself reaches: the ceiling for any policy."""
    phy2log, _, _ = rebalance_experts(popularity, num_physical, 1, 1, num_ranks)
    return true_balancedness(popularity, phy2log, num_ranks)


@dataclass
class Run:
    moves: list[tuple[int, int]]  # (step, slots moved) of every move
    skips: dict[str, int]  # skipped checks by reason
    true_after_first: float  # true balancedness right after the first move
    true_end: float
    true_trivial: float
    ceiling_end: float  # a fresh plan on the popularity at the end
    records: list


def simulate(policy: dict, choices: int, steps: int, seed: int = 0, shift_at: int | None = None,
             period: int = PERIOD, skew: float = 1.0) -> Run:
    """Drive an EPLBManager with synthetic traffic; popularity changes (new random order) at shift_at."""
    model = SlotsOnly()
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=period, **policy))
    popularity = zipf_popularity(L, E, skew, seed)
    traffic = SyntheticTraffic(popularity, choices, seed + 1)
    true_trivial = true_balancedness(popularity, model.phy2log)
    true_after_first = None
    for step in range(steps):
        if shift_at is not None and step == shift_at:
            traffic.popularity = zipf_popularity(L, E, skew, seed + 1000)
        traffic.step(manager)
        if true_after_first is None and manager.counters["rebalances_total"] == 1:
            true_after_first = true_balancedness(traffic.popularity, model.phy2log)
    moves = [(r.step, r.slots_changed) for r in manager.records if r.decision == "moved"]
    return Run(moves, {k: v for k, v in manager.skipped_by_reason.items() if v}, true_after_first or true_trivial,
               true_balancedness(traffic.popularity, model.phy2log), true_trivial,
               fresh_plan_balancedness(traffic.popularity), list(manager.records))


def synthetic_table(args) -> list[dict]:
    print(f"Synthetic: L={L} E={E} P={P} G={G}, period = window = {PERIOD} steps, {args.steps} steps, mean of "
          f"{args.seeds} seeds; 'true' = the placement against the popularity itself, 'ceiling' = a fresh plan's\n")
    head = (f"{'policy':>10} {'choices':>7} | {'1st slots':>9} {'1st gain':>8} {'later/1st':>9} {'moves':>5} "
            f"{'true end':>8} {'ceiling':>7} | {'shift: moved after':>18} {'end/ceiling':>11}")
    print(head + "\n" + "-" * len(head))
    table = []
    for name in args.policies:
        for choices in args.choices:
            rows = []
            for seed in range(args.seeds):
                run = simulate(POLICIES[name], choices, args.steps, seed)
                shifted = simulate(POLICIES[name], choices, args.steps, seed, shift_at=args.steps // 2)
                first = next(i for i, r in enumerate(run.records) if r.decision == "moved")
                later = run.records[first + 1:]
                after = [s for s, _ in shifted.moves if s > args.steps // 2]
                rows.append(dict(first_slots=run.records[first].slots_changed,
                                 first_gain=run.true_after_first - run.true_trivial,
                                 later_per_first=sum(r.slots_changed for r in later) / max(1, len(later))
                                 / run.records[first].slots_changed,
                                 moves=len(run.moves), true_end=run.true_end, ceiling=run.ceiling_end,
                                 shift_moved_after_steps=(after[0] - args.steps // 2) if after else float("inf"),
                                 shift_end_per_ceiling=shifted.true_end / shifted.ceiling_end))
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            table.append(dict(policy=name, choices=choices, **mean))
            print(f"{name:>10} {choices:7d} | {mean['first_slots']:9.1f} {mean['first_gain']:+8.3f} "
                  f"{mean['later_per_first']:9.2f} {mean['moves']:5.1f} {mean['true_end']:8.3f} "
                  f"{mean['ceiling']:7.3f} | "
                  f"{mean['shift_moved_after_steps']:12.0f} steps {mean['shift_end_per_ceiling']:11.3f}")
    return table


# ---------------------------------------------------------------- the real server
QUESTIONS = ["Why is the sky blue?", "How do bees make honey?", "What is a prime number?",
             "Explain how a bicycle stays upright.", "Write a short poem about the sea.",
             "What causes the seasons on Earth?", "How does a refrigerator keep food cold?",
             "Summarise the plot of a detective story.", "Why do cats purr?", "What is inflation?",
             "Describe a walk through a forest in autumn.", "How are rainbows formed?",
             "Give three tips for learning a language.", "What does a compiler do?",
             "Why is the ocean salty?", "Tell me about the history of tea."]


def start_server(flags: list[str], preset: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--preset", preset, "--port", str(port), *flags],
                            cwd=os.path.join(os.path.dirname(__file__), ".."), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout_s=300)
    return proc, url


async def chat_traffic(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=3600) as http:
        async def one(i: int):
            async with gate:
                body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i // 16 + 1})"}]}
                (await http.post(url + "/v1/chat/completions", json=body)).raise_for_status()
        await asyncio.gather(*[one(i) for i in range(requests)])


def server_run(args, policy: str, concurrency: int) -> dict:
    flags = ["--eplb", "--ep-size", "4", "--ep-num-redundant-experts", "4", "--log-level", "warning",
             "--eplb-rebalance-num-iterations", str(args.period), "--eplb-window", str(args.period),
             *POLICY_FLAGS[policy]]
    proc, url = start_server(flags, args.preset)
    try:
        t0 = time.perf_counter()
        asyncio.run(chat_traffic(url, f"dsv4-{args.preset}", args.requests, concurrency, args.max_tokens))
        seconds = time.perf_counter() - t0
        state = httpx.get(url + "/eplb/state", timeout=600).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    records = state["rebalances"]
    print(f"\n{policy}, {concurrency} at a time: {args.requests} chat requests x {args.max_tokens} tokens, "
          f"{state['step']} steps in {seconds:.0f} s; period = window = {args.period}")
    print(f"{'step':>5} {'decision':>8} {'reason':>17} {'before':>6} {'held-out':>8} {'predicted':>9} "
          f"{'measured':>8} {'gain':>6} {'margin':>6} {'slots':>5} {'MiB':>6}")
    for r in records:
        opt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"{r['step']:5d} {r['decision']:>8} {r['reason']:>17} {r['balancedness_before']:6.3f} "
              f"{opt(r['balancedness_heldout'], '8.3f'):>8} {opt(r['balancedness_predicted'], '9.3f'):>9} "
              f"{opt(r['balancedness_measured'], '8.3f'):>8} {opt(r['gain_predicted'], '+6.3f'):>6} "
              f"{opt(r['gain_margin'], '6.3f'):>6} {r['slots_changed']:5d} {r['bytes_moved'] / 2**20:6.1f}")
    moved = [r for r in records if r["decision"] == "moved"]
    later = records[records.index(moved[0]) + 1:] if moved else []
    summary = dict(policy=policy, concurrency=concurrency, steps=state["step"], seconds=seconds,
                   first_gain_measured=(moved[0]["balancedness_measured"] or 0) - moved[0]["balancedness_before"]
                   if moved else None,
                   first_slots=moved[0]["slots_changed"] if moved else 0,
                   later_slots_per_check=sum(r["slots_changed"] for r in later) / max(1, len(later)),
                   later_mib=sum(r["bytes_moved"] for r in later) / 2**20, checks_after_first=len(later),
                   skipped=state["rebalances_skipped_by_reason"], records=records)
    print(f"first move: {summary['first_slots']} slots, measured gain {summary['first_gain_measured']}; after it: "
          f"{len(later)} decisions, {summary['later_slots_per_check']:.1f} slots per decision, "
          f"{summary['later_mib']:.1f} MiB in all")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="synthetic: steps per run")
    parser.add_argument("--choices", type=int, nargs="+", default=[4, 8, 32, 128],
                        help="synthetic: routed choices per layer per step (one mini request = 4)")
    parser.add_argument("--seeds", type=int, default=3, help="synthetic: runs per row")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--server", action="store_true", help="the real server instead of synthetic traffic")
    parser.add_argument("--preset", default="mini", help="server: model preset")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="server: requests at a time")
    parser.add_argument("--requests", type=int, default=32, help="server: chat requests per run")
    parser.add_argument("--max-tokens", type=int, default=48, help="server: tokens per request")
    parser.add_argument("--period", type=int, default=50, help="server: rebalance period = window, steps")
    args = parser.parse_args(argv)
    if args.server:
        result = [server_run(args, policy, c) for c in args.concurrency for policy in args.policies]
    else:
        result = synthetic_table(args)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_eplb_policy.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
