"""What EPLB costs the engine between two forward steps: `EPLBManager.after_step()` timed on the mini
model's experts and maps (no forward: routed load is drawn from a skewed distribution), for ordinary
steps, checks that skip and checks that move, with the plan / move split and a profile of the
costliest check.

    python bench/bench_eplb_step.py --device cuda            # mini, 4 virtual ranks, P = 36, period 100
    python bench/bench_eplb_step.py --period 50 --steps 1000
    python bench/bench_eplb_step.py --device cuda --background   # checks decided on a worker thread (serve.py on CUDA)

Every step is closed with a device synchronisation before the clock stops, so host work and the GPU
work it queued are both counted (an upper bound of the stall one step sees).
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import eplb  # noqa: E402
from dsv4_mini import ModelConfig  # noqa: E402
from weights import build_model  # noqa: E402


def draw_load(manager: eplb.EPLBManager, weights: torch.Tensor, tokens: int, gen: torch.Generator) -> None:
    """Fill manager.load [L, P] with `tokens` picks per layer from weights [L, E], each pick counted on
    the expert's first slot (the routing kernels' replica choice does not matter for the cost)."""
    picks = torch.multinomial(weights, tokens, replacement=True, generator=gen)  # [L, tokens]
    first_slot = manager.location.log2phy[:, :, 0].long().cpu()  # [L, E]
    slots = torch.gather(first_slot, 1, picks)  # [L, tokens]
    load = torch.zeros(manager.load.shape, dtype=torch.int32)
    load.scatter_add_(1, slots, torch.ones_like(slots, dtype=torch.int32))
    manager.load.copy_(load)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--period", type=int, default=100, help="--eplb-rebalance-num-iterations and --eplb-window")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--background", action="store_true", help="EPLBConfig.background_checks (serve.py's mode on CUDA)")
    ap.add_argument("--step-ms", type=float, default=4.0,
                    help="the forward each step stands for (slept; not timed): background verdicts land as many steps later as they would")
    ap.add_argument("--tokens", type=int, default=256, help="routed picks per layer per step (mini: 64 tokens x K 4)")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = ModelConfig.mini()
    E = config.n_routed_experts
    model = build_model(config, num_physical_experts=E + args.redundant, device=device, dtype=torch.bfloat16,
                        progress=False)
    manager = eplb.EPLBManager(model, eplb.EPLBConfig(num_ranks=args.ranks, rebalance_num_iterations=args.period,
                                                      window=args.period, background_checks=args.background))
    if args.background:
        manager._judges.submit(int).result()  # the judging process is up (serve.py starts it at startup)
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(config.num_hidden_layers, E, generator=gen) ** 3  # [L, E] skewed
    ordinary, checks, worst = [], [], (0.0, None)
    for _ in range(args.steps):
        draw_load(manager, weights, args.tokens, gen)
        sync(device)
        time.sleep(args.step_ms / 1e3)
        due = manager.may_move_after_next_step() or (manager._rebalance_due(manager.step_count + 1)
                                                     and manager._check is None)
        records_before = len(manager.records)
        profile = cProfile.Profile() if due else None
        t0 = time.perf_counter()
        if profile:
            profile.enable()
        manager.after_step()
        sync(device)
        if profile:
            profile.disable()
        seconds = time.perf_counter() - t0
        if due:
            record = manager.records[-1] if len(manager.records) > records_before else None
            checks.append((manager.step_count, seconds, record))
            if seconds > worst[0]:
                worst = (seconds, profile)
        else:
            ordinary.append(seconds)
    ms = torch.tensor(ordinary) * 1e3
    print(f"device {device} | mini, P = {E + args.redundant}, {args.ranks} ranks, period {args.period}"
          f"{', background checks' if args.background else ''} | "
          f"torch {torch.__version__}")
    print(f"ordinary steps: {len(ordinary)}, median {ms.median():.3f} ms, p99 {ms.quantile(0.99):.3f} ms")
    print("checks (background: the step that starts one, and the step that applies its verdict):")
    print(f"{'step':>5} {'decision':>8} {'reason':>18} {'total ms':>9} {'plan ms':>8} {'move ms':>8} {'slots':>5}")
    for step, seconds, r in checks:
        print(f"{step:>5} {r.decision if r else '-':>8} {r.reason if r else '-':>18} {seconds * 1e3:>9.2f} "
              f"{r.plan_seconds * 1e3 if r else 0:>8.2f} {r.move_seconds * 1e3 if r else 0:>8.2f} "
              f"{r.slots_changed if r else 0:>5}")
    total = sum(ordinary) + sum(s for _, s, _ in checks)
    print(f"EPLB host+device time: {total * 1e3:.1f} ms over {args.steps} steps "
          f"({total / args.steps * 1e3:.3f} ms per step; a 4 ms decode step -> {total / args.steps / 0.004:.1%})")
    if worst[1] is not None:
        out = io.StringIO()
        pstats.Stats(worst[1], stream=out).sort_stats("cumulative").print_stats(18)
        print(f"\nprofile of the costliest check ({worst[0] * 1e3:.1f} ms):\n" + out.getvalue()[-3500:])


if __name__ == "__main__":
    main()
