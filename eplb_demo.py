"""`python eplb.py demo`: one rebalance end to end on the built-in model, in the terminal.

A skewed workload (64 hot tokens, Zipf-distributed) runs for a window, EPLBManager plans and moves
the expert weights, another window runs, and the per-layer balancedness and rank loads before and
after are printed with the largest logit change the move caused (0: replicas hold identical weights).
"""
from __future__ import annotations

import logging

import torch

import dsv4_mini
import weights
from eplb import EPLBConfig, EPLBManager
from planner import rank_load


def run_demo(tiny: bool = False, num_ranks: int = 4, redundant: int = 4, steps: int = 20, batch: int = 4,
             layers_per_step: int | None = None) -> None:
    """Print one rebalance: `steps` forward steps of `batch` x 16 skewed tokens before and after it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = dsv4_mini.ModelConfig.tiny() if tiny else dsv4_mini.ModelConfig.mini()
    E, G, L, W = config.n_routed_experts, num_ranks, config.num_hidden_layers, steps
    P = E + redundant
    model = weights.build_model(config, seed=0, num_physical_experts=P)
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=10**9, window=W,
                                            layers_per_step=layers_per_step))
    gen = torch.Generator().manual_seed(0)
    hot_tokens = torch.randperm(config.vocab_size, generator=gen)[:64]  # a skewed workload:
    zipf = 1.0 / torch.arange(1, 65, dtype=torch.float64)  # 64 tokens, Zipf-distributed

    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            ids = hot_tokens[torch.multinomial(zipf, batch * 16, replacement=True, generator=gen)]
            model.forward(ids.view(batch, 16), load=manager.load)
            manager.after_step()

    print(f"dsv4-mini {'tiny' if tiny else 'mini'}: L={L} E={E} P={P} G={G} ({P // G} slots per rank); "
          f"window {W} steps of {batch}x16 skewed tokens\n")
    probe = hot_tokens[:16].view(1, 16)
    logits_before = model.logits(probe)
    run(W)
    before = manager.layer_balancedness()
    rank_before = rank_load(manager.recorder.physical_load().cpu(), G)  # [L, G]
    result = manager.rebalance(force=True)
    print(f"rebalance planned on {W} steps: predicted balancedness {result['balancedness_predicted']:.3f}")
    while manager.records[-1].balancedness_measured is None:  # the move, then a full window after it
        run(1)
    after = manager.layer_balancedness()
    rank_after = rank_load(manager.recorder.physical_load().cpu(), G)  # [L, G]
    print(f"\n{'layer':>5} {'kind':>5}  {'before':>7}  {'after':>7}   rank load before -> after")
    for layer in range(L):
        kind = "hash" if config.is_hash_layer(layer) else "score"
        print(f"{layer:5d} {kind:>5}  {before[layer]:7.3f}  {after[layer]:7.3f}   "
              f"{rank_before[layer].long().tolist()} -> {rank_after[layer].long().tolist()}")
    print(f"{'mean':>5} {'':>5}  {before.mean():7.3f}  {after.mean():7.3f}")
    diff = (model.logits(probe) - logits_before).abs().max().item()
    rec = manager.records[-1]
    print(f"\nslots changed {rec.slots_changed} of {L * P}, moved {rec.bytes_moved / 2**20:.1f} MiB; "
          f"max |logit change| after the move: {diff:.2e} (replicas hold identical weights)")
