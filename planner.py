"""Expert placement planner: which logical expert every physical slot holds, so ranks carry equal load.

    load [L, E] ─► replicate the hottest ─► pack heaviest first ─► refine by swaps ─► keep old slots
                 ─► phy2log [L, P]

The first two steps are DeepSeek's EPLB greedy (deepseek-ai/EPLB) with its arithmetic, so
`refine=False` gives its placement exactly; the last two only ever help: the swaps never lower
balancedness and keeping slots changes no rank's load, only how many weights move.

API: `rebalance_experts` (DeepSeek's entry point and outputs), its `placement_policy` and
`check_plan_sizes`; the measures of a placement, `replica_load` → `rank_load` → `balancedness`;
`logical_to_physical`.

Shapes: L MoE layers, E logical experts, P physical slots (P = E + redundant), G ranks (GPUs),
S = P // G slots per rank: slot p lives on rank p // S. Pure functions. The greedy steps are numpy
on purpose (small torch CPU ops each pay an OpenMP barrier: milliseconds when the cores are busy
serving), each works on all rows (layers) at once.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["rebalance_experts", "placement_policy", "check_plan_sizes", "replica_load", "rank_load",
           "balancedness", "logical_to_physical"]

# Bounds on what a plan may ask for, so a typo cannot run for hours: more replicas per expert than
# this cannot help balance, and a released model plans well under 100k slots (L x P).
MAX_REPLICAS_PER_EXPERT = 64
MAX_PLANNED_SLOTS = 1 << 21


# ---------------------------------------------------------------- how good a placement is
def replica_load(logical_load: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """Predicted load of every slot when each expert's load splits evenly over its replicas.

    logical_load [L, E], phy2log [L, P] -> [L, P] float64.
    """
    load = logical_load.double().cpu()
    phy2log = phy2log.long().cpu()
    count = torch.zeros_like(load).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=load.dtype))
    return (load / count.clamp(min=1)).gather(1, phy2log)


def rank_load(slot_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Load per rank: slot_load [L, P] -> [L, G] float64; slot p sits on rank p // (P // G)."""
    L, P = slot_load.shape
    return slot_load.double().reshape(L, num_ranks, P // num_ranks).sum(-1)


def balancedness(rank_load: torch.Tensor) -> torch.Tensor:
    """Per-layer mean / max over ranks: rank_load [L, G] -> [L] float64; a zero-load layer is 1.0."""
    load = rank_load.double()
    peak = load.amax(-1)  # not .max(-1): its small-tensor CPU path can cost milliseconds (thread barrier)
    return torch.where(peak > 0, load.mean(-1) / peak.clamp(min=1e-300), torch.ones_like(peak))


def logical_to_physical(phy2log: np.ndarray, num_experts: int, width: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The inverse map, numpy: phy2log [L, P] -> (log2phy [L, E, width] -1 padded, each expert's
    slots in ascending order; logcnt [L, E]), int64. width defaults to the most replicas of any expert."""
    L, P = phy2log.shape
    rows = np.arange(L)[:, None]
    logcnt = np.zeros((L, num_experts), np.int64)
    np.add.at(logcnt, (rows, phy2log), 1)
    width = int(logcnt.max()) if width is None else width
    if int(logcnt.max()) > width:
        raise ValueError(f"an expert has {int(logcnt.max())} replicas; log2phy holds only {width}")
    order = np.argsort(phy2log, axis=1, kind="stable")  # [L, P] slots grouped by expert, ascending
    expert = np.take_along_axis(phy2log, order, 1)
    first = np.take_along_axis(logcnt.cumsum(1) - logcnt, expert, 1)  # expert's first sorted position
    log2phy = np.full((L, num_experts, width), -1, np.int64)
    log2phy[rows, expert, np.arange(P) - first] = order
    return log2phy, logcnt


# ---------------------------------------------------------------- DeepSeek's greedy steps
# Same arithmetic as deepseek-ai/EPLB: float32 loads and running sums, torch's default descending
# sort for the item order (not stable on CPU for n > 16, so it is called exactly the same way),
# the first index on ties of min / max.
def _replicate_hottest(w: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Add num_slots - n replicas one at a time, each to the expert with the most load per replica.

    w [X, n] float32 -> (slot_item [X, num_slots], count [X, n]) int64. Slot i < n holds item i; slot
    n + j the j-th pick (D'Hondt apportionment: it minimises the largest load per replica).
    """
    X, n = w.shape
    assert num_slots >= n
    rows = np.arange(X)
    slot_item = np.tile(np.arange(num_slots, dtype=np.int64), (X, 1))
    count = np.ones((X, n), np.int64)
    per_replica = w.copy()  # [X, n] = w / count, float32 like the original
    for slot in range(n, num_slots):
        best = per_replica.argmax(1)  # [X]
        slot_item[:, slot] = best
        count[rows, best] += 1
        per_replica[rows, best] = w[rows, best] / count[rows, best].astype(np.float32)
    return slot_item, count


def _pack_heaviest_first(w: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy LPT packing with exactly n / num_packs items per pack.

    w [X, n] float32 -> (pack [X, n], position in pack [X, n]) int64. Items go heaviest first into
    the lightest pack that still has room (lowest pack index on ties).
    """
    X, n = w.shape
    per_pack = n // num_packs
    assert n % num_packs == 0, "items must split evenly over packs"
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), np.int64)
    order = torch.from_numpy(np.ascontiguousarray(w, np.float32)).sort(-1, descending=True).indices.numpy()  # [X, n]
    rows = np.arange(X)
    pack_weight = np.zeros((X, num_packs), np.float32)
    pack_items = np.zeros((X, num_packs), np.int64)
    pack = np.empty((X, n), np.int64)
    position = np.empty((X, n), np.int64)
    for j in range(n):
        item = order[:, j]  # [X]
        best = np.where(pack_items < per_pack, pack_weight, np.inf).argmin(1)  # [X]
        pack[rows, item] = best
        position[rows, item] = pack_items[rows, best]
        pack_weight[rows, best] += w[rows, item]
        pack_items[rows, best] += 1
    return pack, position


# ---------------------------------------------------------------- refinement: swaps off the heaviest pack
def _best_swaps(w, load, members, pack, rows, candidates, tol):
    """For each row, the swap (an item of the heaviest pack <-> a candidate item) that lowers the
    heaviest pack most while keeping the partner pack below the old maximum.

    w [X, n] float64, load [X, m], members [X, m, per_pack], pack [X, n]; rows [A]; candidates [A, C]
    item ids -> (found [A] bool, heavy pack [A], position in it [A], partner item [A]).
    """
    heavy = load[rows].argmax(1)  # [A]
    heavy_load = load[rows, heavy][:, None, None]  # [A, 1, 1]
    heavy_items = members[rows, heavy]  # [A, per_pack]
    gap = (heavy_load[:, :, 0] - load[rows[:, None], pack[rows[:, None], candidates]])[:, None, :]
    d = w[rows[:, None], heavy_items][:, :, None] - w[rows[:, None], candidates][:, None, :]  # [A, per_pack, C]
    t = tol[rows][:, None, None]
    ok = (d > t) & (d < gap - t)
    pair_max = np.maximum(heavy_load - d, heavy_load - gap + d)
    best = np.where(ok, pair_max, np.inf).reshape(len(rows), -1).argmin(1)
    C = candidates.shape[1]
    found = ok.reshape(len(rows), -1)[np.arange(len(rows)), best]
    return found, heavy, best // C, candidates[np.arange(len(rows)), best % C]


def _refine_by_swaps(w: np.ndarray, pack: np.ndarray, position: np.ndarray, num_packs: int,
                     max_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Lower each row's heaviest pack by swapping one of its items with a lighter item elsewhere.

    w [X, n] float64, pack / position [X, n] from `_pack_heaviest_first` (changed in place and
    returned). Swapping a (heaviest pack h) with b (pack r) by d = w_a - w_b is taken only if
    0 < d < load_h - load_r: the pair's larger load drops below load_h, so the maximum never rises
    and balancedness is never below the greedy's. Per round every row takes its best swap.
    """
    X, n = w.shape
    per_pack = n // num_packs
    rows = np.arange(X)
    members = np.empty((X, num_packs, per_pack), np.int64)  # item held at (pack, position)
    members[rows[:, None], pack, position] = np.arange(n)
    load = w[rows[:, None, None], members].sum(-1)  # [X, m]
    tol = 1e-12 * np.maximum(load.sum(1), 1.0)  # [X]: ignore rounding-only "improvements"
    active = rows
    for _ in range(max_rounds):
        if active.size == 0:
            break
        # cheap first: partners from the lightest pack only; rows without a swap there try all items
        lightest = members[active, load[active].argmin(1)]  # [A, per_pack]
        found, heavy, pos, b = _best_swaps(w, load, members, pack, active, lightest, tol)
        retry = active[~found]
        if retry.size:
            all_items = np.broadcast_to(np.arange(n), (retry.size, n))
            f2, h2, p2, b2 = _best_swaps(w, load, members, pack, retry, all_items, tol)
            heavy[~found], pos[~found], b[~found] = h2, p2, b2
            found[~found] = f2
        active, heavy, pos, b = active[found], heavy[found], pos[found], b[found]
        a = members[active, heavy, pos]
        other, other_pos = pack[active, b], position[active, b]
        delta = w[active, a] - w[active, b]
        pack[active, a], position[active, a] = other, other_pos
        pack[active, b], position[active, b] = heavy, pos
        members[active, heavy, pos], members[active, other, other_pos] = b, a
        load[active, heavy] -= delta
        load[active, other] += delta
    return pack, position


# ---------------------------------------------------------------- the placement
def _inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """Row-wise: perm [X, n] -> inv [X, n] with inv[perm[i]] = i."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _place_groups_then_replicas(w: np.ndarray, exact: np.ndarray, num_slots: int, num_groups: int,
                                num_nodes: int, num_gpus: int, refine: bool) -> np.ndarray:
    """DeepSeek's hierarchical policy: expert groups onto nodes, replicas inside each node, the
    node's replicas onto its GPUs. One group on one node is the global policy.

    w [L, E] float32, exact [L, E] float64 (for the refinement) -> phy2log [L, P] int64. The swaps
    run inside each node, so an expert's replicas stay on its node.
    """
    L, E = w.shape
    assert E % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_slots % num_gpus == 0
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    gpus_per_node, slots_per_gpu, node_experts = num_gpus // num_nodes, num_slots // num_gpus, E // num_nodes
    take = lambda a, idx: np.take_along_axis(a, idx, axis=1)  # noqa: E731
    # 1. whole groups onto nodes; node k gets the node-ordered ("middle") ids [k*E/N, (k+1)*E/N)
    group_load = w.reshape(L, num_groups, group_size).sum(-1, dtype=np.float32)  # [L, groups]
    group_node, group_pos = _pack_heaviest_first(group_load, num_nodes)
    log2mlog = (((group_node * groups_per_node + group_pos) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse_permutation(log2mlog)
    # 2. replicas inside each node: a row per (layer, node), [L*N, E/N] -> [L*N, P/N]
    mlog_load = take(w, mlog2log).reshape(-1, node_experts)
    phy2mlog, mlogcnt = _replicate_hottest(mlog_load, num_slots // num_nodes)
    # 3. the node's replicas onto its GPUs, the same slot count on each
    phy_load = take(mlog_load / mlogcnt.astype(np.float32), phy2mlog)  # [L*N, P/N] float32
    gpu, pos = _pack_heaviest_first(phy_load, gpus_per_node)
    if refine and gpus_per_node > 1 and slots_per_gpu > 1:
        exact_phy = take(take(exact, mlog2log).reshape(-1, node_experts) / mlogcnt, phy2mlog)
        gpu, pos = _refine_by_swaps(exact_phy, gpu, pos, gpus_per_node)
    pphy2phy = _inverse_permutation(gpu * slots_per_gpu + pos)
    pphy2mlog = take(phy2mlog, pphy2phy).reshape(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, E, node_experts)[None, :, None]).reshape(L, -1)
    return take(mlog2log, pphy2mlog)  # [L, P]


# ---------------------------------------------------------------- keeping experts where they are
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


def _replicas_per_unit(phy2log: np.ndarray, num_units: int, num_experts: int) -> np.ndarray:
    """How many replicas of each expert every unit (rank or node) holds: [L, P] -> [L, units, E]."""
    L, P = phy2log.shape
    unit = np.repeat(np.arange(num_units), P // num_units)
    counts = np.zeros((L, num_units, num_experts), np.float32)
    np.add.at(counts, (np.arange(L)[:, None], unit[None, :], phy2log), 1)
    return counts


def _relabel_units(new: np.ndarray, old: np.ndarray, num_units: int, num_experts: int) -> np.ndarray:
    """Permute whole units (contiguous slot blocks) of `new` to overlap `old` most: [L, P] -> [L, P]."""
    L, P = new.shape
    overlap = (_replicas_per_unit(new, num_units, num_experts)
               @ _replicas_per_unit(old, num_units, num_experts).transpose(0, 2, 1))  # [L, units, units]
    target = _greedy_match(overlap)  # [L, units]: new unit u goes to position target[u]
    out = np.empty_like(new)
    out.reshape(L, num_units, -1)[np.arange(L)[:, None], target] = new.reshape(L, num_units, -1)
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
    new_key = (cell * E + new_e) * S + _occurrence(cell * E + new_e)  # (cell, expert, k-th replica)
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


def _keep_old_slots(new: np.ndarray, old: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
    """Same rank loads as `new` [L, P], but as many slots as possible keep `old`'s expert.

    Free choices only: which node hosts each planned node, which GPU of that node hosts each
    planned GPU (greedy max-overlap matching), and the slot order inside each GPU.
    """
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


# ---------------------------------------------------------------- the entry point
def placement_policy(num_groups: int, num_nodes: int) -> str:
    """Which of DeepSeek's two policies `rebalance_experts` runs: "hierarchical" (expert groups
    packed onto nodes, replicas inside each node) when several groups split evenly over the nodes,
    else "global" (replicate, then pack onto all GPUs)."""
    return "hierarchical" if num_groups > 1 and num_groups % num_nodes == 0 else "global"


def check_plan_sizes(num_layers: int, num_experts: int, num_replicas: int, num_groups: int, num_nodes: int,
                     num_gpus: int) -> None:
    """ValueError naming the first size `rebalance_experts` cannot plan with."""
    for name, value in [("num_layers", num_layers), ("num_experts", num_experts), ("num_replicas", num_replicas),
                        ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_gpus", num_gpus)]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    most = MAX_REPLICAS_PER_EXPERT * num_experts
    if not num_experts <= num_replicas <= most:
        raise ValueError(f"num_replicas must be between the {num_experts} experts and {most} "
                         f"({MAX_REPLICAS_PER_EXPERT} per expert), got {num_replicas}")
    if num_layers * num_replicas > MAX_PLANNED_SLOTS:
        raise ValueError(f"{num_layers} layers x {num_replicas} replicas is more than {MAX_PLANNED_SLOTS} "
                         "slots to plan")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if placement_policy(num_groups, num_nodes) == "hierarchical":
        if num_experts % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide the {num_experts} experts")
        if num_gpus % num_nodes:
            raise ValueError(f"num_nodes ({num_nodes}) must divide num_gpus ({num_gpus})")


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, refine: bool = True, old_phy2log: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan a placement: DeepSeek EPLB's entry point and semantics, plus the two cheap improvements.

    weight [L, E] load per logical expert (real, finite, >= 0); num_replicas = P, a multiple of
    num_gpus -> (phy2log [L, P] int64, log2phy [L, E, X'] int64 -1 padded with X' = logcnt.max(),
    logcnt [L, E] int64).

    The policy is `placement_policy(num_groups, num_nodes)`. refine=False is DeepSeek's greedy
    exactly. old_phy2log [L, P]: keep experts in the slots they already hold where the plan
    allows; rank loads are the same, only fewer weights move.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype == torch.bool or weight.is_complex():
        raise ValueError("weight must be a real-valued tensor")
    if not bool(torch.isfinite(weight.double()).all()) or bool((weight < 0).any()):
        raise ValueError("weight must be finite and >= 0")
    L, E = weight.shape  # [L, E]
    check_plan_sizes(L, E, num_replicas, num_groups, num_nodes, num_gpus)
    if placement_policy(num_groups, num_nodes) == "global":  # one group on one node
        num_groups = num_nodes = 1
    weight = weight.detach().cpu()
    phy2log = _place_groups_then_replicas(weight.float().numpy(), weight.double().numpy(), num_replicas,
                                          num_groups, num_nodes, num_gpus, refine)
    if old_phy2log is not None:
        phy2log = _keep_old_slots(phy2log, old_phy2log.long().cpu().numpy(), num_nodes, num_gpus)
    log2phy, logcnt = logical_to_physical(phy2log, E)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
