"""Expert-parallel load balancing (EPLB) for dsv4-mini: where experts live, how busy they are, and
how to move them.

    per-step physical counts [L,P] ─► ExpertLoadRecorder (ring of W steps, folded to logical [L,E])
        ─► rebalance_experts (DeepSeek EPLB + refinement + slot preservation) ─► new phy2log [L,P]
        ─► Rebalancer (copies only changed slots, layer by layer, then that layer's maps)

Shapes: L MoE layers, E logical experts, P physical slots (P = E + redundant), G expert-parallel
ranks, S = P // G slots per rank (slot p lives on rank p // S), X = P - E + 1 replica columns.

Pieces, top to bottom:
1. balancedness             mean / max rank load per layer (1.0 = perfect; an idle layer counts 1.0)
2. planner                  `rebalance_experts`: DeepSeek's greedy (bit-exact with refine=False),
                            a swap refinement that never lowers balancedness, slot preservation
3. ExpertLocation           phy2log / log2phy / logcnt, wrapping the model's buffers in place
4. record files             sglang formats: {"logical_count": [S,L,E]} or {"physical_to_logical_map"}
5. ExpertLoadRecorder       per-step [L,P] buffer for model.forward(load=...), ring window, dumps
6. LocalMover, Rebalancer   in-place weight moves (ep.LockstepMover plugs in for real ranks)
7. EPLBManager              the engine hook: record → plan → move → measure, plus state for HTTP
8. CLI                      `python eplb.py plan RECORD ...`, `python eplb.py demo`
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

log = logging.getLogger("dsv4.eplb")

__all__ = [
    "balancedness", "rank_load", "replica_load", "rebalance_experts", "balanced_packing",
    "replicate_experts", "refine_packing", "preserve_slots", "ExpertLocation", "load_record",
    "initial_location", "ExpertLoadRecorder", "LocalMover", "Rebalancer", "EPLBConfig", "EPLBManager",
]


# =============================================================================================
# 1. Balancedness
# =============================================================================================
def rank_load(slot_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Load per rank: slot_load [L, P] -> [L, G] (float64); slot p sits on rank p // (P // G)."""
    L, P = slot_load.shape
    return slot_load.double().reshape(L, num_ranks, P // num_ranks).sum(-1)


def balancedness(rank_load: torch.Tensor) -> torch.Tensor:
    """Per-layer mean / max over ranks: rank_load [L, G] -> [L] float64; a zero-load layer is 1.0."""
    load = rank_load.double()
    peak = load.max(-1).values
    return torch.where(peak > 0, load.mean(-1) / peak.clamp(min=1e-300), torch.ones_like(peak))


def replica_load(logical_load: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """Predicted load of every slot when each expert's load splits evenly over its replicas.

    logical_load [L, E], phy2log [L, P] -> [L, P] float64.
    """
    load = logical_load.double().cpu()
    phy2log = phy2log.long().cpu()
    count = torch.zeros_like(load).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=load.dtype))
    return (load / count.clamp(min=1)).gather(1, phy2log)


# =============================================================================================
# 2. Planner
# =============================================================================================
# DeepSeek's three primitives (deepseek-ai/EPLB eplb.py) with the same arithmetic: float32 weights,
# float32 running sums, torch's default descending sort for the item order (not stable on CPU for
# n > 16, so it is called exactly as DeepSeek does), first index on ties of min / max. The Python
# loops of the original run over items only here; every step works on all rows (layers) at once.
# The work is numpy on purpose: small torch CPU ops pay an OpenMP barrier each, which costs
# milliseconds when the other cores are busy serving.

def _descending_order(w: np.ndarray) -> np.ndarray:
    """Item order of DeepSeek's `weight.float().sort(-1, descending=True)`: [X, n] -> [X, n]."""
    return torch.from_numpy(np.ascontiguousarray(w, np.float32)).sort(-1, descending=True).indices.numpy()


def _pack(w: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy core of `balanced_packing`: w [X, n] float32 -> (pack_index, rank_in_pack) [X, n]."""
    X, n = w.shape
    per_pack = n // num_packs
    assert n % num_packs == 0, "items must split evenly over packs"
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), np.int64)
    order = _descending_order(w)
    rows = np.arange(X)
    pack_weight = np.zeros((X, num_packs), np.float32)
    pack_items = np.zeros((X, num_packs), np.int64)
    pack_index = np.empty((X, n), np.int64)
    rank_in_pack = np.empty((X, n), np.int64)
    for j in range(n):
        item = order[:, j]  # [X]
        pack = np.where(pack_items < per_pack, pack_weight, np.inf).argmin(1)  # [X]
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weight[rows, pack] += w[rows, item]
        pack_items[rows, pack] += 1
    return pack_index, rank_in_pack


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy LPT packing with exactly n / m items per pack, vectorised over rows.

    weight [X, n] -> (pack_index [X, n] int64, rank_in_pack [X, n] int64). Items go heaviest first
    into the lightest pack that still has room (lowest pack index on ties).
    """
    pack_index, rank_in_pack = _pack(weight.float().cpu().numpy(), num_packs)
    return torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)


def _replicate(w: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy core of `replicate_experts`: w [X, n] float32 -> (phy2log [X, num_phy], logcnt [X, n])."""
    X, n = w.shape
    assert num_phy >= n
    rows = np.arange(X)
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (X, 1))
    logcnt = np.ones((X, n), np.int64)
    per_replica = w.copy()  # [X, n] = w / logcnt, float32 like the original
    for slot in range(n, num_phy):
        best = per_replica.argmax(1)  # [X]
        phy2log[:, slot] = best
        logcnt[rows, best] += 1
        per_replica[rows, best] = w[rows, best] / logcnt[rows, best].astype(np.float32)
    return phy2log, logcnt


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add num_phy - n replicas one at a time, each to the expert with the largest load per replica.

    weight [X, n] -> (phy2log [X, num_phy], logcnt [X, n]), int64. Slots 0..n-1 hold experts
    0..n-1; slot n + i holds the i-th pick (D'Hondt apportionment: minimises the max per-replica load).
    """
    phy2log, logcnt = _replicate(weight.float().cpu().numpy(), num_phy)
    return torch.from_numpy(phy2log), torch.from_numpy(logcnt)


def _best_swaps(w, load, members, pack_index, rows, candidates, tol):
    """For each row, the swap (item of the heaviest pack <-> a candidate item) that lowers the
    heaviest pack most while keeping the partner below the old maximum.

    w [X, n] float64, load [X, m], members [X, m, S], pack_index [X, n]; rows [A];
    candidates [A, C] item ids -> (found [A] bool, heavy [A], position in heavy [A], partner item [A]).
    """
    heavy = load[rows].argmax(1)  # [A]
    heavy_load = load[rows, heavy][:, None, None]  # [A, 1, 1]
    heavy_items = members[rows, heavy]  # [A, S]
    gap = (heavy_load[:, :, 0] - load[rows[:, None], pack_index[rows[:, None], candidates]])[:, None, :]
    d = w[rows[:, None], heavy_items][:, :, None] - w[rows[:, None], candidates][:, None, :]  # [A, S, C]
    t = tol[rows][:, None, None]
    ok = (d > t) & (d < gap - t)
    pair_max = np.maximum(heavy_load - d, heavy_load - gap + d)
    best = np.where(ok, pair_max, np.inf).reshape(len(rows), -1).argmin(1)
    C = candidates.shape[1]
    found = ok.reshape(len(rows), -1)[np.arange(len(rows)), best]
    return found, heavy, best // C, candidates[np.arange(len(rows)), best % C]


def _refine(w: np.ndarray, pack_index: np.ndarray, rank_in_pack: np.ndarray, num_packs: int,
            max_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy core of `refine_packing` (w float64; pack_index / rank_in_pack changed in place)."""
    X, n = w.shape
    per_pack = n // num_packs
    rows = np.arange(X)
    members = np.empty((X, num_packs, per_pack), np.int64)  # item held at (pack, position)
    members[rows[:, None], pack_index, rank_in_pack] = np.arange(n)
    load = w[rows[:, None, None], members].sum(-1)  # [X, m]
    tol = 1e-12 * np.maximum(load.sum(1), 1.0)  # [X]: ignore rounding-only "improvements"
    active = rows
    for _ in range(max_rounds):
        if active.size == 0:
            break
        # cheap first: partners from the lightest pack only; rows without a swap there try all items
        lightest = members[active, load[active].argmin(1)]  # [A, S]
        found, heavy, pos, b = _best_swaps(w, load, members, pack_index, active, lightest, tol)
        retry = active[~found]
        if retry.size:
            all_items = np.broadcast_to(np.arange(n), (retry.size, n))
            f2, h2, p2, b2 = _best_swaps(w, load, members, pack_index, retry, all_items, tol)
            heavy[~found], pos[~found], b[~found] = h2, p2, b2
            found[~found] = f2
        active, heavy, pos, b = active[found], heavy[found], pos[found], b[found]
        a = members[active, heavy, pos]
        other, other_pos = pack_index[active, b], rank_in_pack[active, b]
        delta = w[active, a] - w[active, b]
        pack_index[active, a], rank_in_pack[active, a] = other, other_pos
        pack_index[active, b], rank_in_pack[active, b] = heavy, pos
        members[active, heavy, pos], members[active, other, other_pos] = b, a
        load[active, heavy] -= delta
        load[active, other] += delta
    return pack_index, rank_in_pack


def refine_packing(weight: torch.Tensor, pack_index: torch.Tensor, rank_in_pack: torch.Tensor,
                   num_packs: int, max_rounds: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower each row's heaviest pack by swapping one of its items with a lighter item elsewhere.

    weight [X, n] (float64 used), pack_index / rank_in_pack [X, n] as from `balanced_packing`
    -> the same two tensors after the swaps. A swap of a (heaviest pack h) with b (pack r) by
    d = w_a - w_b is taken only if 0 < d < load_h - load_r, so the pair's larger load drops below
    load_h: no pack ever exceeds the old maximum, the maximum never rises, and balancedness is
    never below the greedy's. Per round, every row takes its best swap (lowest resulting pair max).
    """
    if num_packs == 1 or pack_index.shape[1] == num_packs:
        return pack_index, rank_in_pack
    out = _refine(weight.double().cpu().numpy(), pack_index.numpy().copy(), rank_in_pack.numpy().copy(),
                  num_packs, max_rounds)
    return torch.from_numpy(out[0]), torch.from_numpy(out[1])


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse permutation: perm [X, n] -> inv [X, n] with inv[perm[i]] = i."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(w: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
                  refine: bool, exact: np.ndarray) -> np.ndarray:
    """DeepSeek's hierarchical policy: groups → nodes, replicas within nodes, replicas → GPUs.

    w [L, E] float32, exact [L, E] float64 (for the refinement) -> phy2log [L, P] int64. With
    refine=False this is DeepSeek's output exactly; refine=True adds `refine_packing` to the last
    step (inside each node, so node locality is kept).
    """
    L, E = w.shape
    assert E % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_physical % num_gpus == 0
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    slots_per_gpu, E_node = num_physical // num_gpus, E // num_nodes
    take = lambda a, idx: np.take_along_axis(a, idx, axis=1)  # noqa: E731
    # 1. whole expert groups onto nodes; node k gets the "middle" ids [k*E/N, (k+1)*E/N)
    group_load = w.reshape(L, num_groups, group_size).sum(-1, dtype=np.float32)  # [L, groups]
    group_node, group_pos = _pack(group_load, num_nodes)
    log2mlog = (((group_node * groups_per_node + group_pos) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node: [L*N, E/N] -> [L*N, P/N]
    mlog_load = take(w, mlog2log).reshape(-1, E_node)
    phy2mlog, mlogcnt = _replicate(mlog_load, num_physical // num_nodes)
    # 3. replicas onto the node's GPUs, equal slot count per GPU
    phy_load = take(mlog_load / mlogcnt.astype(np.float32), phy2mlog)  # [L*N, P/N] float32
    gpu, pos = _pack(phy_load, num_gpus // num_nodes)
    if refine and num_gpus // num_nodes > 1 and slots_per_gpu > 1:
        exact_phy = take(take(exact, mlog2log).reshape(-1, E_node) / mlogcnt, phy2mlog)
        gpu, pos = _refine(exact_phy, gpu, pos, num_gpus // num_nodes, max_rounds=64)
    pphy2phy = _inverse(gpu * slots_per_gpu + pos)
    pphy2mlog = take(phy2mlog, pphy2phy).reshape(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, E, E_node)[None, :, None]).reshape(L, -1)
    return take(mlog2log, pphy2mlog)  # [L, P]


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, refine: bool = True, old_phy2log: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan a placement. DeepSeek EPLB's entry point and semantics, plus two cheap improvements.

    weight [L, E] load per logical expert (any real dtype, finite, >= 0); num_replicas = P
    (a multiple of num_gpus) -> (phy2log [L, P] int64, log2phy [L, E, X'] int64 with -1 padding,
    X' = logcnt.max(), replicas of an expert listed in slot order; logcnt [L, E] int64).

    Policy: hierarchical (groups packed to nodes, replication inside nodes) when num_groups > 1 and
    num_groups % num_nodes == 0; otherwise global (replicate, then pack onto all GPUs).
    refine=False reproduces DeepSeek's greedy exactly; refine=True (default) adds `refine_packing`,
    never worse. old_phy2log [L, P]: relabel ranks and reorder slots inside ranks so experts stay
    where they are (`preserve_slots`); rank loads are unchanged by that, only fewer bytes move.
    """
    L, E = weight.shape
    _check_load(weight, "weight")
    if num_replicas < E or num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be >= {E} experts and a multiple of num_gpus={num_gpus}")
    exact = weight.detach().cpu().double().numpy()
    w = weight.detach().cpu().float().numpy()
    if not (num_groups > 1 and num_groups % num_nodes == 0):  # global policy
        num_groups = num_nodes = 1
    phy2log = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus, refine, exact)
    if old_phy2log is not None:
        phy2log = _preserve(phy2log, old_phy2log.long().cpu().numpy(), num_nodes, num_gpus)
    log2phy, logcnt = _log2phy_np(phy2log, E, None)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def _greedy_match(overlap: np.ndarray) -> np.ndarray:
    """Assign each new unit to an old unit, largest overlap first: overlap [X, n, n] -> [X, n]."""
    X, n, _ = overlap.shape
    score = overlap.astype(np.float64).copy()
    match = np.empty((X, n), np.int64)
    rows = np.arange(X)
    for _ in range(n):
        flat = score.reshape(X, -1).argmax(1)
        new, old = flat // n, flat % n
        match[rows, new] = old
        score[rows, new, :] = -np.inf
        score[rows, :, old] = -np.inf
    return match


def _unit_counts(phy2log: np.ndarray, num_units: int, num_experts: int) -> np.ndarray:
    """How many replicas of each expert every unit (rank or node) holds: [L, P] -> [L, units, E]."""
    L, P = phy2log.shape
    unit = np.repeat(np.arange(num_units), P // num_units)
    counts = np.zeros((L, num_units, num_experts), np.float32)
    np.add.at(counts, (np.arange(L)[:, None], unit[None, :], phy2log), 1)
    return counts


def _relabel_units(new: np.ndarray, old: np.ndarray, num_units: int, num_experts: int) -> np.ndarray:
    """Permute whole units (contiguous slot blocks) of `new` to overlap `old` most: [L, P] -> [L, P]."""
    L, P = new.shape
    overlap = _unit_counts(new, num_units, num_experts) @ _unit_counts(old, num_units, num_experts).transpose(0, 2, 1)
    target = _greedy_match(overlap)  # [L, units]: new unit u goes to position target[u]
    out = np.empty_like(new)
    blocks = new.reshape(L, num_units, -1)
    out.reshape(L, num_units, -1)[np.arange(L)[:, None], target] = blocks
    return out


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """k for the k-th occurrence (in order) of each key: keys [n] -> [n]."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    idx = np.arange(len(keys))
    run_start = np.maximum.accumulate(np.where(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]], idx, 0))
    occ = np.empty_like(idx)
    occ[order] = idx - run_start
    return occ


def _keep_slots_within_ranks(new: np.ndarray, old: np.ndarray, num_ranks: int) -> np.ndarray:
    """Reorder each rank's new experts so any expert the rank already held keeps its old slot."""
    L, P = new.shape
    S = P // num_ranks
    cell = (np.arange(L)[:, None] * num_ranks + np.arange(P)[None, :] // S).ravel()  # (layer, rank)
    new_e, old_e = new.ravel(), old.ravel()
    E = int(max(new_e.max(), old_e.max())) + 1
    new_key = (cell * E + new_e) * S + _occurrence(cell * E + new_e)
    old_key = (cell * E + old_e) * S + _occurrence(cell * E + old_e)
    old_order = np.argsort(old_key)
    hit = np.searchsorted(old_key[old_order], new_key).clip(max=len(old_key) - 1)
    matched = old_key[old_order][hit] == new_key
    dest = np.full(L * P, -1, np.int64)
    dest[matched] = old_order[hit[matched]]  # flat slot each kept expert returns to
    free_slots = np.setdiff1d(np.arange(L * P), dest[matched])  # ascending, grouped by cell
    loose = np.flatnonzero(~matched)
    loose = loose[np.argsort(cell[loose], kind="stable")]  # same per-cell counts as free_slots
    dest[loose] = free_slots
    out = np.empty_like(new_e)
    out[dest] = new_e
    return out.reshape(L, P)


def _preserve(new: np.ndarray, old: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """numpy core of `preserve_slots`."""
    L, P = new.shape
    E = int(max(new.max(), old.max())) + 1
    relabeled = new
    if num_nodes > 1:
        relabeled = _relabel_units(relabeled, old, num_nodes, E)
    gpus_per_node = num_gpus // num_nodes
    if gpus_per_node > 1:  # relabel GPUs inside each node: treat (layer, node) as a row
        rows = lambda a: a.reshape(L * num_nodes, P // num_nodes)  # noqa: E731
        relabeled = _relabel_units(rows(relabeled), rows(old), gpus_per_node, E).reshape(L, P)
    # the matching is greedy: per layer, keep whichever of planned / relabeled order moves fewer slots
    kept_plain = _keep_slots_within_ranks(new, old, num_gpus)
    kept_relabeled = _keep_slots_within_ranks(relabeled, old, num_gpus)
    better = ((kept_relabeled != old).sum(1) <= (kept_plain != old).sum(1))[:, None]
    return np.where(better, kept_relabeled, kept_plain)


def preserve_slots(phy2log: torch.Tensor, old_phy2log: torch.Tensor, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Same rank loads as `phy2log`, but as many slots as possible keep `old_phy2log`'s expert.

    phy2log, old_phy2log [L, P] -> [L, P]. Free choices only: which node hosts each planned node,
    which GPU of that node hosts each planned GPU (greedy max-overlap matching), and the slot order
    inside each GPU (experts already on that GPU keep their slot).
    """
    return torch.from_numpy(_preserve(phy2log.long().cpu().numpy(), old_phy2log.long().cpu().numpy(),
                                      num_nodes, num_gpus))


def _check_load(load: torch.Tensor, name: str) -> None:
    if not isinstance(load, torch.Tensor) or load.dtype in (torch.bool,) or load.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor")
    if not bool(torch.isfinite(load.double()).all()) or bool((load < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")


# =============================================================================================
# 3. ExpertLocation
# =============================================================================================
def _log2phy_np(phy2log: np.ndarray, num_experts: int, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """phy2log [L, P] -> (log2phy [L, E, width] -1 padded, replicas in slot order; logcnt [L, E])."""
    L, P = phy2log.shape
    rows = np.arange(L)[:, None]
    logcnt = np.zeros((L, num_experts), np.int64)
    np.add.at(logcnt, (rows, phy2log), 1)
    width = int(logcnt.max()) if width is None else width
    if int(logcnt.max()) > width:
        raise ValueError(f"an expert has {int(logcnt.max())} replicas; log2phy holds only {width}")
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending
    expert = np.take_along_axis(phy2log, order, 1)
    first = np.take_along_axis(logcnt.cumsum(1) - logcnt, expert, 1)  # first sorted position
    log2phy = np.full((L, num_experts, width), -1, np.int64)
    log2phy[rows, expert, np.arange(P) - first] = order
    return log2phy, logcnt


class ExpertLocation:
    """Which logical expert every physical slot holds, in the three equivalent forms the kernels read.

    phy2log [L, P] int64; log2phy [L, E, X] int32 (-1 padded); logcnt [L, E] int32; num_ranks G.
    Fixed shapes and storage: updates are `copy_` into the same tensors, one layer at a time.
    """

    def __init__(self, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_ranks: int):
        L, P = phy2log.shape
        if log2phy.shape[:2] != (L, logcnt.shape[1]) or logcnt.shape[0] != L or P % num_ranks:
            raise ValueError(f"inconsistent shapes phy2log {tuple(phy2log.shape)}, log2phy "
                             f"{tuple(log2phy.shape)}, logcnt {tuple(logcnt.shape)}, num_ranks {num_ranks}")
        self.phy2log, self.log2phy, self.logcnt, self.num_ranks = phy2log, log2phy, logcnt, num_ranks

    num_layers = property(lambda self: self.phy2log.shape[0])
    num_physical = property(lambda self: self.phy2log.shape[1])
    num_experts = property(lambda self: self.logcnt.shape[1])
    width = property(lambda self: self.log2phy.shape[2])

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_experts: int, num_ranks: int,
                     width: int | None = None) -> "ExpertLocation":
        """Build from phy2log [L, P]; width X defaults to P - E + 1 (the most any expert can hold)."""
        phy2log = phy2log.long()
        P = phy2log.shape[1]
        if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
            raise ValueError(f"phy2log holds expert ids outside [0, {num_experts})")
        log2phy, logcnt = _log2phy_np(phy2log.cpu().numpy(), num_experts,
                                      P - num_experts + 1 if width is None else width)
        if (logcnt == 0).any():
            layer, expert = np.argwhere(logcnt == 0)[0].tolist()
            raise ValueError(f"expert {expert} of layer {layer} has no slot")
        return cls(phy2log.cpu().clone(), torch.from_numpy(log2phy).to(torch.int32),
                   torch.from_numpy(logcnt).to(torch.int32), num_ranks)

    @classmethod
    def trivial(cls, num_layers: int, num_experts: int, num_physical: int, num_ranks: int,
                device: str | torch.device = "cpu") -> "ExpertLocation":
        """Slot p holds expert p % E (redundant slots start as copies of experts 0..R-1)."""
        phy2log = (torch.arange(num_physical) % num_experts).expand(num_layers, -1)
        loc = cls.from_phy2log(phy2log, num_experts, num_ranks)
        return cls(*(t.to(device) for t in (loc.phy2log, loc.log2phy, loc.logcnt)), num_ranks)

    @classmethod
    def of_model(cls, model, num_ranks: int) -> "ExpertLocation":
        """Wrap model.phy2log / log2phy / logcnt themselves (same storage: writes reach the model)."""
        return cls(model.phy2log, model.log2phy, model.logcnt, num_ranks)

    def to(self, device) -> "ExpertLocation":
        return ExpertLocation(self.phy2log.to(device), self.log2phy.to(device), self.logcnt.to(device), self.num_ranks)

    def copy_layer_(self, layer_idx: int, other: "ExpertLocation") -> None:
        """Overwrite one layer's maps in place with `other`'s (which may live on another device)."""
        width = other.width
        if width > self.width and bool((other.log2phy[layer_idx, :, self.width:] >= 0).any()):
            raise ValueError(f"layer {layer_idx} needs {width} replica columns; this location has {self.width}")
        self.phy2log[layer_idx].copy_(other.phy2log[layer_idx])
        self.log2phy[layer_idx].fill_(-1)
        w = min(width, self.width)
        self.log2phy[layer_idx, :, :w].copy_(other.log2phy[layer_idx, :, :w])
        self.logcnt[layer_idx].copy_(other.logcnt[layer_idx])

    def set_layer_(self, layer_idx: int, phy2log_row: torch.Tensor) -> None:
        """Point one layer at a new placement phy2log_row [P], rebuilding its log2phy / logcnt rows."""
        row = ExpertLocation.from_phy2log(phy2log_row.view(1, -1), self.num_experts, self.num_ranks, self.width)
        self.phy2log[layer_idx].copy_(row.phy2log[0])
        self.log2phy[layer_idx].copy_(row.log2phy[0])
        self.logcnt[layer_idx].copy_(row.logcnt[0])

    def changed_slots(self, other: "ExpertLocation") -> torch.Tensor:
        """[L] number of slots whose expert differs from `other`'s."""
        return (self.phy2log.cpu() != other.phy2log.cpu()).sum(1)

    def rank_load(self, logical_load: torch.Tensor) -> torch.Tensor:
        """Predicted [L, G] rank load for logical_load [L, E] (even split over replicas)."""
        return rank_load(replica_load(logical_load, self.phy2log), self.num_ranks)


# =============================================================================================
# 4. Record files (sglang formats): read only as tensors / JSON, never arbitrary pickles
# =============================================================================================
MAX_RECORD_BYTES = 1 << 30
MAX_RECORD_ELEMENTS = 1 << 28
RECORD_KEYS = ("logical_count", "physical_to_logical_map")
# a dump also carries the placement its counts were recorded under, under a name that
# --init-expert-location ignores (sglang: a physical_to_logical_map would be used as the placement)
LAST_MAP_KEY = "last_physical_to_logical_map"


def _record_tensor(name: str, value, ndims: tuple[int, ...]) -> torch.Tensor:
    """Validate one record entry: a real, finite, non-negative, modestly sized tensor (or nested list)."""
    if isinstance(value, list):
        try:
            value = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"record '{name}' is not a rectangular array of numbers: {e}") from None
    if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
        raise ValueError(f"record '{name}' must be a tensor or nested list, got {type(value).__name__}")
    if value.layout != torch.strided or value.dtype == torch.bool or value.is_complex() or value.is_quantized:
        raise ValueError(f"record '{name}' must be a dense real tensor, got {value.dtype} {value.layout}")
    if value.dim() not in ndims or 0 in value.shape:
        raise ValueError(f"record '{name}' must have {' or '.join(map(str, ndims))} non-empty dims, got {tuple(value.shape)}")
    if value.numel() > MAX_RECORD_ELEMENTS:
        raise ValueError(f"record '{name}' has {value.numel()} elements (limit {MAX_RECORD_ELEMENTS})")
    value = value.detach().cpu().double()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"record '{name}' contains NaN or infinity")
    if bool((value < 0).any()):
        raise ValueError(f"record '{name}' contains negative values")
    return value


def load_record(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an EPLB record: a .pt (torch.load weights_only=True), a .json file, or a JSON string.

    Returns {"logical_count": [S, L, E] float64} and/or {"physical_to_logical_map": [L, P] int64}.
    Anything else (pickled objects, wrong types or shapes, NaN, negatives, oversize) raises ValueError.
    """
    text = str(source)
    if text.lstrip().startswith("{"):
        raw = _parse_json(text)
    else:
        if not os.path.isfile(text):
            raise ValueError(f"record file {text!r} does not exist")
        if os.path.getsize(text) > MAX_RECORD_BYTES:
            raise ValueError(f"record file {text!r} is larger than {MAX_RECORD_BYTES} bytes")
        if text.endswith(".json"):
            with open(text) as f:
                raw = _parse_json(f.read())
        else:
            try:
                raw = torch.load(text, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - every failure of an untrusted file is a refusal
                raise ValueError(f"record file {text!r} refused (only tensors and plain containers "
                                 f"are accepted): {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(raw, dict) or not any(k in raw for k in RECORD_KEYS):
        raise ValueError(f"a record must be a dict with one of {RECORD_KEYS}")
    record = {}
    if "logical_count" in raw:
        count = _record_tensor("logical_count", raw["logical_count"], (2, 3))
        record["logical_count"] = count if count.dim() == 3 else count.unsqueeze(0)
    for key in ("physical_to_logical_map", LAST_MAP_KEY):
        if key in raw:
            p2l = _record_tensor(key, raw[key], (2,))
            if not bool((p2l == p2l.round()).all()):
                raise ValueError(f"record '{key}' must hold integer expert ids")
            record[key] = p2l.long()
    return record


def _parse_json(text: str):
    if len(text) > MAX_RECORD_BYTES:
        raise ValueError("JSON record too large")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"malformed JSON record: {e}") from None


def save_record(path: str | os.PathLike, record: dict[str, torch.Tensor]) -> None:
    """Write a record as JSON (path ends in .json) or with torch.save (tensors only)."""
    if str(path).endswith(".json"):
        with open(path, "w") as f:
            json.dump({k: v.tolist() for k, v in record.items()}, f)
    else:
        torch.save({k: v.cpu() for k, v in record.items()}, path)


def initial_location(spec: str | None, num_layers: int, num_experts: int, num_physical: int, num_ranks: int,
                     num_groups: int = 1, num_nodes: int = 1, refine: bool = True) -> ExpertLocation:
    """`--init-expert-location`: "trivial"/None, or a record (path or JSON string) with either a
    physical_to_logical_map [L, P] (used as is) or a logical_count [S, L, E] (planned, summed over S)."""
    if spec is None or spec == "trivial":
        return ExpertLocation.trivial(num_layers, num_experts, num_physical, num_ranks)
    record = load_record(spec)
    if "physical_to_logical_map" in record:
        phy2log = record["physical_to_logical_map"]
        if tuple(phy2log.shape) != (num_layers, num_physical):
            raise ValueError(f"physical_to_logical_map has shape {tuple(phy2log.shape)}, the model needs "
                             f"{(num_layers, num_physical)}")
        return ExpertLocation.from_phy2log(phy2log, num_experts, num_ranks)
    count = record["logical_count"]
    if tuple(count.shape[1:]) != (num_layers, num_experts):
        raise ValueError(f"logical_count has shape {tuple(count.shape)}, the model needs [steps, "
                         f"{num_layers}, {num_experts}]")
    phy2log, _, _ = rebalance_experts(count.sum(0), num_physical, num_groups, num_nodes, num_ranks, refine=refine)
    return ExpertLocation.from_phy2log(phy2log, num_experts, num_ranks)


# =============================================================================================
# 5. Load recorder
# =============================================================================================
class ExpertLoadRecorder:
    """Per-step physical counts → a ring of the last `window` steps, kept physical and logical.

    `load` [L, P] int32 is what the engine hands to model.forward(load=...); `step(phy2log)` after
    each forward folds it into the ring through the placement that produced it (so a rebalance in
    the middle of a window is attributed correctly) and zeroes it. The ring always runs (EPLB reads
    it); start/stop/reset/dump are sglang's recording session on top, capped at `session_capacity`.
    """

    def __init__(self, num_layers: int, num_physical: int, num_experts: int, window: int,
                 device: str | torch.device = "cpu", session_capacity: int = 1000):
        L, P, E = num_layers, num_physical, num_experts
        self.num_experts, self.window = E, window
        self.load = torch.zeros(L, P, dtype=torch.int32, device=device)
        self.physical = torch.zeros(window, L, P, dtype=torch.int32, device=device)  # ring
        self.logical = torch.zeros(window, L, E, dtype=torch.int64, device=device)  # ring
        self.steps = 0  # steps ever recorded into the ring
        self.recording = False
        self.session: deque[torch.Tensor] = deque(maxlen=session_capacity)

    def step(self, phy2log: torch.Tensor) -> None:
        """Close one forward step: ring ← load (and its logical fold), session too; load ← 0."""
        slot = self.steps % self.window
        self.physical[slot].copy_(self.load)
        self.logical[slot].zero_().scatter_add_(1, phy2log.to(self.load.device).long(), self.load.long())
        if self.recording:
            self.session.append(self.logical[slot].to("cpu", copy=True))
        self.steps += 1
        self.load.zero_()

    def _last(self, ring: torch.Tensor, steps: int | None) -> torch.Tensor:
        n = min(self.steps, self.window, self.window if steps is None else steps)
        idx = (torch.arange(self.steps - n, self.steps) % self.window).to(ring.device)
        return ring.index_select(0, idx)

    def logical_load(self, steps: int | None = None) -> torch.Tensor:
        """[L, E] int64: the last `steps` (default: the whole window) steps' logical counts, summed."""
        return self._last(self.logical, steps).sum(0)

    def physical_load(self, steps: int | None = None) -> torch.Tensor:
        """[L, P] int64: the last `steps` steps' physical counts, summed."""
        return self._last(self.physical, steps).long().sum(0)

    def start(self) -> None:
        """sglang /start_expert_distribution_record: clear the session and record into it."""
        self.session.clear()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def reset(self) -> None:
        """Forget everything: ring, session, pending counts."""
        self.load.zero_(), self.physical.zero_(), self.logical.zero_()
        self.session.clear()
        self.steps = 0

    def dump(self, path: str | os.PathLike | None = None, phy2log: torch.Tensor | None = None) -> dict:
        """sglang /dump_expert_distribution_record: {"logical_count": [steps, L, E]} (+ the current
        placement as "last_physical_to_logical_map" if given); written with torch.save / JSON when
        `path` is set. The session is cleared afterwards, as sglang does."""
        steps = list(self.session) or [torch.zeros_like(self.logical[0]).cpu()]
        record = {"logical_count": torch.stack(steps)}
        if phy2log is not None:
            record[LAST_MAP_KEY] = phy2log.detach().cpu().long()
        if path is not None:
            save_record(path, record)
        self.session.clear()
        return record


# =============================================================================================
# 6. Moving expert weights
# =============================================================================================
def copy_schedule(old_row: list[int], new_row: list[int], num_ranks: int) -> list[tuple[int, int]]:
    """Order the copies that turn old_row's slots into new_row's, in place, with one spare slot.

    old_row, new_row: [P] expert per slot -> [(dst, src)], slot -1 meaning the spare buffer. Each
    changed slot is copied from a holder of its expert in the old placement (an unchanged holder
    first, then one on the same rank). A slot is overwritten only after every copy reading it is
    done; a cycle (a permutation) is broken by parking one slot in the spare: changed + cycles copies.
    """
    P = len(old_row)
    per_rank = P // num_ranks
    holders: dict[int, list[int]] = {}
    for slot, e in enumerate(old_row):
        holders.setdefault(e, []).append(slot)
    src = {}
    for dst, e in enumerate(new_row):
        if old_row[dst] == e:
            continue
        if e not in holders:
            raise ValueError(f"expert {e} has no replica in the old placement: nothing to copy from")
        src[dst] = min(holders[e], key=lambda q: (old_row[q] != new_row[q], q // per_rank != dst // per_rank, q))
    readers: dict[int, int] = {}
    for q in src.values():
        readers[q] = readers.get(q, 0) + 1
    schedule, pending = [], dict(src)
    ready = [p for p in pending if readers.get(p, 0) == 0]
    while pending:
        if not ready:  # only cycles left: park one slot's expert in the spare, redirect its readers
            p = next(iter(pending))
            if readers.get(-1, 0):
                raise AssertionError("spare slot still in use")
            schedule.append((-1, p))
            for d, q in pending.items():
                if q == p:
                    pending[d] = -1
            readers[-1], readers[p] = readers[p], 0
            ready.append(p)
            continue
        p = ready.pop()
        q = pending.pop(p)
        schedule.append((p, q))
        readers[q] -= 1
        if readers[q] == 0 and q in pending:
            ready.append(q)
    return schedule


class LocalMover:
    """Moves one layer's slots inside this process (all G virtual ranks hold their slots here).

    The mover interface, shared with ep.LockstepMover (real ranks over torch.distributed):
        move_layer(weights: list[Tensor [P_local, ...]], old_row [P], new_row [P], layer) -> int bytes moved
    `weights` are the layer's slot-stacked tensors (w1, w3, w2 and any scales), changed in place.
    """

    def __init__(self, num_ranks: int = 1):
        self.num_ranks = num_ranks
        self.spare: dict[tuple, torch.Tensor] = {}  # one slot's worth per tensor shape / dtype / device

    def move_layer(self, weights: list[torch.Tensor], old_row: torch.Tensor, new_row: torch.Tensor,
                   layer: int | None = None) -> int:
        old, new = old_row.tolist(), new_row.tolist()
        if len(old) != weights[0].shape[0]:
            raise ValueError(f"LocalMover needs all {len(old)} slots in this process, got {weights[0].shape[0]}")
        schedule = copy_schedule(old, new, self.num_ranks)
        slot_bytes = sum(w[0].numel() * w[0].element_size() for w in weights)
        for w in weights:
            key = (tuple(w.shape[1:]), w.dtype, w.device)
            spare = self.spare.get(key)
            if spare is None:
                spare = self.spare[key] = torch.empty_like(w[0])
            for dst, src in schedule:
                (spare if dst < 0 else w[dst]).copy_(spare if src < 0 else w[src])
        return slot_bytes * sum(dst >= 0 for dst, _ in schedule)  # the spare's copies are not moves


@dataclass
class MoveStats:
    layers: int = 0
    slots_changed: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    longest_step_seconds: float = 0.0


class Rebalancer:
    """Applies a target placement to the model's weights and maps, layer by layer, in place.

    For each layer: the mover copies the changed slots, then that layer's maps are copied, so a
    layer's maps and weights always agree between forward steps. `layers_per_step=None` moves all
    layers in the first `step()`; otherwise `step()` moves that many (call it once per forward).
    """

    def __init__(self, model, location: ExpertLocation, mover=None):
        self.model, self.location = model, location
        self.mover = mover if mover is not None else LocalMover(location.num_ranks)
        self.target: ExpertLocation | None = None
        self.pending: list[int] = []
        self.layers_per_step: int | None = None
        self.stats = MoveStats()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def begin(self, target: ExpertLocation, layers_per_step: int | None = None) -> None:
        if self.busy:
            raise RuntimeError("a rebalance is already in progress")
        changed = target.changed_slots(self.location)
        self.target, self.layers_per_step, self.stats = target, layers_per_step, MoveStats()
        self.pending = [layer for layer in range(self.location.num_layers) if changed[layer] > 0]

    def apply_layer(self, layer: int) -> None:
        old_row, new_row = self.location.phy2log[layer].cpu(), self.target.phy2log[layer].cpu()
        self.stats.bytes_moved += self.mover.move_layer(self.model.expert_weights(layer), old_row, new_row, layer)
        self.stats.slots_changed += int((old_row != new_row).sum())
        self.location.copy_layer_(layer, self.target)  # weights first, then that layer's maps
        self.stats.layers += 1

    def step(self) -> int:
        """Move the next chunk of layers; returns how many were moved."""
        if not self.pending:
            return 0
        n = len(self.pending) if self.layers_per_step is None else self.layers_per_step
        chunk, self.pending = self.pending[:n], self.pending[n:]
        t0 = time.perf_counter()
        for layer in chunk:
            self.apply_layer(layer)
        _synchronize(self.location.phy2log.device)
        seconds = time.perf_counter() - t0
        self.stats.seconds += seconds
        self.stats.longest_step_seconds = max(self.stats.longest_step_seconds, seconds)
        return len(chunk)

    def run(self, target: ExpertLocation) -> MoveStats:
        """All layers now."""
        self.begin(target, None)
        self.step()
        return self.stats


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =============================================================================================
# 7. Manager: the engine's hook
# =============================================================================================
@dataclass
class EPLBConfig:
    """EPLB options (defaults mirror sglang's where it has them).

    algorithm: "global" (replicate + pack over all ranks) or "hierarchical" (node-local replicas).
    DSV4 has no expert groups, so "hierarchical" uses num_groups = E by default: every expert is its
    own group, experts are balanced over nodes first and replicated only inside their node.
    """
    num_ranks: int = 1
    rebalance_num_iterations: int = 1000
    window: int | None = None  # steps of load used to plan; default = rebalance_num_iterations
    algorithm: str = "global"
    num_nodes: int = 1
    num_groups: int | None = None
    layers_per_step: int | None = None  # None: all layers at once
    min_balancedness: float = 1.0  # skip when the window's balancedness is already >= this
    refine: bool = True
    preserve_slots: bool = True
    init_expert_location: str | None = None
    history: int = 256  # balancedness samples kept for /eplb/state


@dataclass
class RebalanceRecord:
    step: int
    balancedness_before: float
    balancedness_predicted: float
    balancedness_measured: float | None = None
    slots_changed: int = 0
    bytes_moved: int = 0
    plan_seconds: float = 0.0
    move_seconds: float = 0.0
    longest_step_seconds: float = 0.0
    layers_moved: int = 0
    finished_step: int | None = None
    forced: bool = False


class EPLBManager:
    """Record → plan → move → measure, driven by `after_step()` once per forward step.

    model: a dsv4_mini.DSV4Model (buffers phy2log / log2phy / logcnt, expert_weights(layer)).
    Hand `manager.load` to model.forward(load=...), then call `manager.after_step()`.
    Under torchrun only rank 0 has a manager: it records (every rank routes the same batch, so its
    counts are everyone's), plans, and moves through `ep.LockstepMover`, which announces each layer
    move so the other ranks apply the same rows (`ep.run_worker`).
    The period (rebalance_num_iterations) counts from the end of the previous move, so the
    "measured after" window always completes before the next plan.
    """

    def __init__(self, model, config: EPLBConfig, mover=None):
        if config.algorithm not in ("global", "hierarchical"):
            raise ValueError(f"algorithm must be 'global' or 'hierarchical', got {config.algorithm!r}")
        self.model, self.config = model, config
        self.location = ExpertLocation.of_model(model, config.num_ranks)
        L, P, E = self.location.num_layers, self.location.num_physical, self.location.num_experts
        if config.algorithm == "hierarchical":
            self.num_groups, self.num_nodes = config.num_groups or E, config.num_nodes
            if self.num_groups % self.num_nodes or E % self.num_groups or config.num_ranks % self.num_nodes:
                raise ValueError(f"hierarchical needs E % groups == groups % nodes == ranks % nodes == 0 "
                                 f"(E={E}, groups={self.num_groups}, nodes={self.num_nodes}, ranks={config.num_ranks})")
        else:
            self.num_groups, self.num_nodes = 1, 1
        self.window = config.window or config.rebalance_num_iterations
        device = self.location.phy2log.device
        self.recorder = ExpertLoadRecorder(L, P, E, self.window, device)
        self.rebalancer = Rebalancer(model, self.location, mover)
        self.step_count = 0
        self.last_check = 0
        self.records: deque[RebalanceRecord] = deque(maxlen=32)
        self.history: deque[tuple[int, float]] = deque(maxlen=config.history)
        self.counters = {"rebalances_total": 0, "rebalances_skipped_total": 0, "rebalance_seconds_total": 0.0,
                         "bytes_moved_total": 0, "slots_changed_total": 0}
        if config.init_expert_location not in (None, "trivial"):
            start = initial_location(config.init_expert_location, L, E, P, config.num_ranks,
                                     self.num_groups, self.num_nodes, config.refine)
            self.rebalancer.run(start.to(device))

    @property
    def load(self) -> torch.Tensor:
        """[L, P] int32 counts of the current step: pass to model.forward(load=...)."""
        return self.recorder.load

    def after_step(self) -> None:
        """Call after every forward step (engine thread, between forwards)."""
        self.recorder.step(self.location.phy2log)
        self.step_count += 1
        if self.rebalancer.busy:
            self.rebalancer.step()
            self._finish_if_done()
        self._measure_if_due()
        if not self.rebalancer.busy and self.step_count - self.last_check >= self.config.rebalance_num_iterations:
            self.rebalance()
        if self.step_count % max(1, self.window // 10) == 0:
            self.history.append((self.step_count, self.balancedness()))

    def balancedness(self, steps: int | None = None) -> float:
        """Measured: mean over layers of the last `steps` steps' per-layer balancedness."""
        return float(self.layer_balancedness(steps).mean())

    def layer_balancedness(self, steps: int | None = None) -> torch.Tensor:
        return balancedness(rank_load(self.recorder.physical_load(steps).cpu(), self.config.num_ranks))

    def plan(self, logical_load: torch.Tensor) -> ExpertLocation:
        """New placement for logical_load [L, E] (CPU), keeping slots where it can."""
        old = self.location.phy2log.cpu() if self.config.preserve_slots else None
        phy2log, _, _ = rebalance_experts(logical_load.cpu(), self.location.num_physical, self.num_groups,
                                          self.num_nodes, self.config.num_ranks,
                                          refine=self.config.refine, old_phy2log=old)
        return ExpertLocation.from_phy2log(phy2log, self.location.num_experts, self.config.num_ranks,
                                           self.location.width).to(self.location.phy2log.device)

    def rebalance(self, force: bool = False) -> dict:
        """Plan on the window's logical load and start moving (now, or over the next steps).

        Returns {"status": "started" | "skipped" | "busy" | "no_load", ...}.
        """
        if self.rebalancer.busy:
            return {"status": "busy"}
        self.last_check = self.step_count
        logical = self.recorder.logical_load().cpu()
        if int(logical.sum()) == 0:
            return {"status": "no_load"}
        before = self.balancedness()
        if before >= self.config.min_balancedness and not force:
            self.counters["rebalances_skipped_total"] += 1
            log.info("eplb step %d: skip rebalance, balancedness %.3f >= %.3f",
                     self.step_count, before, self.config.min_balancedness)
            return {"status": "skipped", "balancedness": before}
        t0 = time.perf_counter()
        target = self.plan(logical)
        plan_seconds = time.perf_counter() - t0
        predicted = float(balancedness(target.rank_load(logical)).mean())
        self._log_unmeasured()
        self.records.append(RebalanceRecord(self.step_count, before, predicted, plan_seconds=plan_seconds, forced=force))
        self.rebalancer.begin(target, self.config.layers_per_step)
        self.rebalancer.step()
        self._finish_if_done()
        return {"status": "started", "balancedness_before": before, "balancedness_predicted": predicted}

    def _finish_if_done(self) -> None:
        rec = self.records[-1] if self.records else None
        if self.rebalancer.busy or rec is None or rec.finished_step is not None:
            return
        stats = self.rebalancer.stats
        rec.finished_step = self.last_check = self.step_count  # the next period starts after the move
        rec.slots_changed, rec.bytes_moved = stats.slots_changed, stats.bytes_moved
        rec.move_seconds, rec.longest_step_seconds, rec.layers_moved = stats.seconds, stats.longest_step_seconds, stats.layers
        self.counters["rebalances_total"] += 1
        self.counters["rebalance_seconds_total"] += rec.plan_seconds + rec.move_seconds
        self.counters["bytes_moved_total"] += rec.bytes_moved
        self.counters["slots_changed_total"] += rec.slots_changed

    def _measure_steps(self) -> int:
        return min(self.window, self.config.rebalance_num_iterations)

    def _measure_if_due(self) -> None:
        rec = self.records[-1] if self.records else None
        if rec is None or rec.finished_step is None or rec.balancedness_measured is not None:
            return
        if self.step_count - rec.finished_step >= self._measure_steps():
            rec.balancedness_measured = self.balancedness(self._measure_steps())
            self._log_record(rec)

    def _log_unmeasured(self) -> None:
        rec = self.records[-1] if self.records else None
        if rec is not None and rec.finished_step is not None and rec.balancedness_measured is None:
            self._log_record(rec)

    def _log_record(self, rec: RebalanceRecord) -> None:
        measured = "n/a" if rec.balancedness_measured is None else f"{rec.balancedness_measured:.3f}"
        log.info("eplb rebalance at step %d: balancedness %.3f -> predicted %.3f -> measured %s | "
                 "slots changed %d | moved %.1f MiB | plan %.1f ms | move %.1f ms (%d layers, longest step %.1f ms)",
                 rec.step, rec.balancedness_before, rec.balancedness_predicted, measured, rec.slots_changed,
                 rec.bytes_moved / 2**20, rec.plan_seconds * 1e3, rec.move_seconds * 1e3, rec.layers_moved,
                 rec.longest_step_seconds * 1e3)

    def metrics(self) -> dict:
        """Flat numbers for Prometheus: counters plus current balancedness (overall and per layer)."""
        per_layer = self.layer_balancedness()
        return {**self.counters, "balancedness": float(per_layer.mean()),
                "balancedness_per_layer": per_layer.tolist(), "steps": self.step_count}

    def state_rank_tokens(self) -> list[int]:
        """[G] routed (token, k) choices each rank served over the window, summed over layers."""
        return rank_load(self.recorder.physical_load().cpu(), self.location.num_ranks).sum(0).long().tolist()

    def state(self) -> dict:
        """JSON-able snapshot for /eplb/state."""
        loc = self.location
        logical = self.recorder.logical_load().cpu()
        physical = self.recorder.physical_load().cpu()
        ranks = rank_load(physical, loc.num_ranks)  # [L, G]
        config = asdict(self.config)
        config.update(num_groups=self.num_groups, num_nodes=self.num_nodes, window=self.window)
        return {
            "config": config,
            "num_layers": loc.num_layers, "num_experts": loc.num_experts, "num_physical": loc.num_physical,
            "num_ranks": loc.num_ranks, "step": self.step_count, "window_steps": min(self.recorder.steps, self.window),
            "phy2log": loc.phy2log.cpu().tolist(), "logcnt": loc.logcnt.cpu().tolist(),
            "logical_load": logical.tolist(), "rank_load": ranks.long().tolist(),
            "balancedness_per_layer": balancedness(ranks).tolist(),
            "balancedness_history": [list(x) for x in self.history],
            "rebalance_in_progress": {"layers_left": len(self.rebalancer.pending)} if self.rebalancer.busy else None,
            "rebalances": [asdict(r) for r in self.records],
            "counters": dict(self.counters),
            "balancedness": self.balancedness(),
        }


# =============================================================================================
# 8. CLI
# =============================================================================================
def _plan_command(args) -> None:
    record = load_record(args.record)
    if "logical_count" not in record:
        raise SystemExit("the record has no logical_count to plan from")
    load = record["logical_count"].sum(0)  # [L, E]
    L, E = load.shape
    P, G = args.num_replicas, args.num_gpus
    if LAST_MAP_KEY in record and record[LAST_MAP_KEY].shape == (L, P):
        before_map, before_name = record[LAST_MAP_KEY], "recorded"
    else:
        before_map, before_name = ExpertLocation.trivial(L, E, P, G).phy2log, "trivial"
    t0 = time.perf_counter()
    phy2log, _, logcnt = rebalance_experts(load, P, args.num_groups, args.num_nodes, G, refine=not args.no_refine)
    ms = (time.perf_counter() - t0) * 1e3
    before = balancedness(rank_load(replica_load(load, before_map), G))
    after = balancedness(rank_load(replica_load(load, phy2log), G))
    print(f"record: {args.record}  steps={record['logical_count'].shape[0]}  L={L}  E={E}  tokens={int(load.sum())}")
    policy = "hierarchical" if args.num_groups > 1 and args.num_groups % args.num_nodes == 0 else "global"
    print(f"plan: P={P}  G={G}  groups={args.num_groups}  nodes={args.num_nodes}  policy={policy}  ({ms:.1f} ms)\n")
    print(f"{'layer':>5}  {'tokens':>10}  {before_name + ' bal':>12}  {'planned bal':>11}  hottest expert (replicas)")
    for layer in range(L):
        hot = int(load[layer].argmax())
        print(f"{layer:5d}  {int(load[layer].sum()):10d}  {before[layer]:12.3f}  {after[layer]:11.3f}  "
              f"{hot} ({int(logcnt[layer, hot])})")
    print(f"{'mean':>5}  {'':>10}  {before.mean():12.3f}  {after.mean():11.3f}")
    hist = torch.bincount(logcnt.flatten())
    print("\nreplicas per expert: " + ", ".join(f"{c}x: {int(n)}" for c, n in enumerate(hist.tolist()) if n))
    print(f"slots per rank: {P // G}")
    if args.out:
        save_record(args.out, {"physical_to_logical_map": phy2log})
        print(f"placement written to {args.out}")


def _demo_command(args) -> None:
    import dsv4_mini  # the model is only needed here
    import weights

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = dsv4_mini.ModelConfig.tiny() if args.tiny else dsv4_mini.ModelConfig.mini()
    E, G, L, W = config.n_routed_experts, args.num_ranks, config.num_hidden_layers, args.steps
    P = E + args.redundant
    model = weights.build_model(config, seed=0, num_physical_experts=P)
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=10**9, window=W,
                                            layers_per_step=args.layers_per_step))
    gen = torch.Generator().manual_seed(0)
    hot_tokens = torch.randperm(config.vocab_size, generator=gen)[:64]  # a skewed workload:
    zipf = 1.0 / torch.arange(1, 65, dtype=torch.float64)  # 64 tokens, Zipf-distributed

    def run(steps: int) -> None:
        for _ in range(steps):
            ids = hot_tokens[torch.multinomial(zipf, args.batch * 16, replacement=True, generator=gen)]
            model.forward(ids.view(args.batch, 16), load=manager.load)
            manager.after_step()

    print(f"dsv4-mini {'tiny' if args.tiny else 'mini'}: L={L} E={E} P={P} G={G} ({P // G} slots per rank); "
          f"window {W} steps of {args.batch}x16 skewed tokens\n")
    probe = hot_tokens[:16].view(1, 16)
    logits_before = model.logits(probe)
    run(W)
    before = manager.layer_balancedness()
    rank_before = rank_load(manager.recorder.physical_load().cpu(), G)
    result = manager.rebalance(force=True)
    print(f"rebalance planned on {W} steps: predicted balancedness {result['balancedness_predicted']:.3f}")
    while manager.records[-1].balancedness_measured is None:  # the move, then a full window after it
        run(1)
    after = manager.layer_balancedness()
    rank_after = rank_load(manager.recorder.physical_load().cpu(), G)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="eplb.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a placement from a recorded load (sglang or dsv4-mini record)")
    p.add_argument("record", help=".pt / .json record file or a JSON string with logical_count")
    p.add_argument("--num-replicas", type=int, required=True)
    p.add_argument("--num-gpus", type=int, required=True)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--no-refine", action="store_true", help="plain DeepSeek greedy")
    p.add_argument("--out", help="write the placement (physical_to_logical_map) here, .json or .pt")
    d = sub.add_parser("demo", help="one rebalance end to end on the built-in model")
    d.add_argument("--tiny", action="store_true", help="tiny config (fast) instead of mini")
    d.add_argument("--num-ranks", type=int, default=4)
    d.add_argument("--redundant", type=int, default=4)
    d.add_argument("--steps", type=int, default=20, help="steps per window (load before, then after the move)")
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--layers-per-step", type=int, default=None)
    args = parser.parse_args(argv)
    {"plan": _plan_command, "demo": _demo_command}[args.command](args)


if __name__ == "__main__":
    main()
