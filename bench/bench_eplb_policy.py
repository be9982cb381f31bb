"""EPLB policy on synthetic traffic: does rebalancing pay, or churn on sampling noise?

No model, no server: `SlotsOnly` stands in for the model (the maps and one tiny weight row per
slot) and `SyntheticTraffic` draws each step's routed (token, k) choices from a fixed skewed
popularity per layer (Zipf over a random expert order), each choice to a uniformly random replica
of its expert, as the routing hash does. The shapes are the demo server's (`--preset mini --ep-size
4 --ep-num-redundant-experts 4`: L=8, E=32, P=36, G=4) and the period and window are 50 steps.

    python bench/bench_eplb_policy.py                # the table: policy x choices per step
    python bench/bench_eplb_policy.py --steps 2000 --choices 4 16 64

For each run: the first rebalance's slots and its gain in *true* balancedness (placement against
the popularity itself, no sampling noise), the slots later rebalances move on average as a share
of the first one's, the true balancedness at the end, and with a popularity shift halfway, how
many periods after it the policy moved and the end's true balancedness against a fresh plan on
the new popularity. Baseline: `always` (plan on the last window, move whatever changes: the
policy before #14).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from eplb import EPLBConfig, EPLBManager, ExpertLocation  # noqa: E402
from planner import balancedness, rank_load, rebalance_experts, replica_load  # noqa: E402

L, E, P, G = 8, 32, 36, 4  # the demo server: mini preset, 4 ranks, 4 redundant slots
PERIOD = 50

POLICIES = {
    # plan on the last window only, move whatever changes (the policy before #14)
    "always": dict(load_half_life=1e-9, min_gain=-1.0, gain_noise_sigmas=0.0, per_layer=False),
    "default": dict(),
    "whole-plan": dict(per_layer=False),
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--choices", type=int, nargs="+", default=[4, 8, 32, 128],
                        help="routed choices per layer per step (one mini request = 4)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = parser.parse_args(argv)
    print(f"L={L} E={E} P={P} G={G}, period = window = {PERIOD} steps, {args.steps} steps, "
          f"mean of {args.seeds} seeds; 'true' = placement against the popularity itself\n")
    head = (f"{'policy':>10} {'choices':>7} | {'1st slots':>9} {'1st gain':>8} {'later/1st':>9} {'moves':>5} "
            f"{'true end':>8} {'ceiling':>7} | {'shift: moved after':>18} {'end/ceiling':>11}")
    print(head)
    print("-" * len(head))
    for name in args.policies:
        for choices in args.choices:
            rows = []
            for seed in range(args.seeds):
                run = simulate(POLICIES[name], choices, args.steps, seed)
                shifted = simulate(POLICIES[name], choices, args.steps, seed, shift_at=args.steps // 2)
                later = [s for _, s in run.moves[1:]]
                checks = (args.steps - run.moves[0][0]) // PERIOD if run.moves else 1
                after = [s for s, _ in shifted.moves if s >= args.steps // 2]
                rows.append(dict(
                    first=run.moves[0][1] if run.moves else 0, gain=run.true_after_first - run.true_trivial,
                    later=sum(later) / max(1, checks - 1) / max(1, run.moves[0][1] if run.moves else 1),
                    moves=len(run.moves), end=run.true_end, ceiling=run.ceiling_end,
                    react=((after[0] - args.steps // 2) / PERIOD) if after else float("inf"),
                    shift_ratio=shifted.true_end / shifted.ceiling_end))
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            print(f"{name:>10} {choices:7d} | {mean['first']:9.1f} {mean['gain']:+8.3f} {mean['later']:9.2f} "
                  f"{mean['moves']:5.1f} {mean['end']:8.3f} {mean['ceiling']:7.3f} | "
                  f"{mean['react']:14.1f} per {mean['shift_ratio']:11.3f}")


if __name__ == "__main__":
    main()
