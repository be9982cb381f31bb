"""Expert-parallel load balancing (EPLB) for dsv4-mini: where experts live, how busy they are, and
how to move them between forward steps without changing a single output bit.

    per-step physical counts [L, P] ─► ExpertLoadRecorder (ring of W steps, folded to logical [L, E])
        ─► planner.rebalance_experts ─► new phy2log [L, P]
        ─► Rebalancer: per layer, the mover copies the changed slots, then that layer's maps

Shapes: L MoE layers, E logical experts, P physical slots (P = E + redundant), G expert-parallel
ranks, S = P // G slots per rank (slot p lives on rank p // S), X = P - E + 1 replica columns.

Top to bottom:
1. ExpertLocation, initial_location   phy2log / log2phy / logcnt, wrapping the model's buffers in place
2. ExpertLoadRecorder                 per-step [L, P] buffer for model.forward(load=...), ring window, dumps
3. slot_sources, copy_schedule,       which slot each moved expert is copied from (shared with
   LocalMover, Rebalancer             ep.DistributedMover), in-place moves, layer by layer
4. EPLBConfig, EPLBManager            the engine hook: record → judge → move → measure, state for HTTP
5. CLI                                `python eplb.py plan RECORD ...`, `python eplb.py demo`

The planner (planner.py), the policy that judges whether a plan pays (policy.py) and the record
files (records.py) are their own modules; the demo lives in eplb_demo.py.
"""
from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import copy
import itertools
import logging
import multiprocessing
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from planner import (balancedness, check_plan_sizes, logical_to_physical, placement_policy, rank_load,
                     rebalance_experts, replica_load)
from policy import SKIP_REASONS, Judge, RebalanceRecord, Verdict, init_judge_process
from records import LAST_MAP_KEY, load_record, save_record

log = logging.getLogger("dsv4.eplb")

__all__ = [
    "ExpertLocation", "initial_location", "ExpertLoadRecorder", "SlotTransfer", "slot_sources", "copy_schedule",
    "LocalMover", "SecondsHistogram", "MoveStats", "Rebalancer", "EPLBConfig", "EPLBManager",
]

# =============================================================================================
# 1. Locations: where every expert lives
# =============================================================================================
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
        log2phy, logcnt = (torch.from_numpy(a).to(torch.int32) for a in logical_to_physical(
            phy2log.cpu().numpy(), num_experts, P - num_experts + 1 if width is None else width))
        if not bool(logcnt.all()):
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(f"expert {expert} of layer {layer} has no slot")
        return cls(phy2log.cpu().clone(), log2phy, logcnt, num_ranks)

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
# 2. Load recorder
# =============================================================================================
def host_copy(t: torch.Tensor, wait: bool = True) -> torch.Tensor:
    """A CPU copy of t (never t itself). wait=False, from a GPU: a pinned copy queued behind the work
    already on the device, readable once an event recorded after it has completed (.cpu() would wait)."""
    if wait or not t.is_cuda:
        return t.to("cpu", copy=True)
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class ExpertLoadRecorder:
    """Per-step physical counts → a ring of the last `window` steps, kept physical and logical,
    and a decayed logical total over all steps.

    `load` [L, P] int32 is what the engine hands to model.forward(load=...); `step(phy2log)` after
    each forward folds it into the ring through the placement that produced it (so a rebalance in
    the middle of a window is attributed correctly) and zeroes it. The ring always runs (EPLB reads
    it); start/stop/dump are sglang's recording session on top, capped at `session_capacity`.
    `decayed` [L, E] float64 weighs every step's logical load by 0.5 ** (age / half_life): at small
    batch one window is mostly sampling noise, a long memory is not (None: no decay).
    """

    def __init__(self, num_layers: int, num_physical: int, num_experts: int, window: int,
                 device: str | torch.device = "cpu", session_capacity: int = 1000, half_life: float | None = None):
        L, P, E = num_layers, num_physical, num_experts
        self.window = window
        self.load = torch.zeros(L, P, dtype=torch.int32, device=device)
        self.physical = torch.zeros(window, L, P, dtype=torch.int32, device=device)  # ring
        self.logical = torch.zeros(window, L, E, dtype=torch.int64, device=device)  # ring
        self.decay = 0.5 ** (1.0 / half_life) if half_life else 1.0  # per step
        self.decayed = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.steps = 0  # steps ever recorded into the ring
        self.recording = False
        self.session: deque[torch.Tensor] = deque(maxlen=session_capacity)

    def step(self, phy2log: torch.Tensor) -> None:
        """Close one forward step: ring ← load (and its logical fold), session too; load ← 0."""
        slot = self.steps % self.window
        self.physical[slot].copy_(self.load)
        self.logical[slot].zero_().scatter_add_(1, phy2log.to(self.load.device).long(), self.load.long())
        self.decayed.mul_(self.decay).add_(self.logical[slot])
        if self.recording:
            self.session.append(self.logical[slot].to("cpu", copy=True))
        self.steps += 1
        self.load.zero_()

    def _last(self, ring: torch.Tensor, steps: int | None) -> torch.Tensor:
        n = min(self.steps, self.window, self.window if steps is None else steps)
        # built on the ring's device: a host-built index would be a pageable copy, which waits for the GPU
        idx = torch.arange(self.steps - n, self.steps, device=ring.device) % self.window
        return ring.index_select(0, idx)

    def logical_load(self, steps: int | None = None) -> torch.Tensor:
        """[L, E] int64: the last `steps` (default: the whole window) steps' logical counts, summed."""
        return self._last(self.logical, steps).sum(0)

    def physical_load(self, steps: int | None = None) -> torch.Tensor:
        """[L, P] int64: the last `steps` steps' physical counts, summed."""
        return self._last(self.physical, steps).long().sum(0)

    def logical_steps(self, steps: int) -> torch.Tensor:
        """[n, L, E] int64: each of the last n = min(steps, recorded, window) steps' logical counts, oldest first."""
        return self._last(self.logical, steps)

    def decayed_load(self, skip_recent: int = 0) -> torch.Tensor:
        """[L, E] float64: the decayed load of every step but the last `skip_recent` (at most a window)."""
        return (self.decayed - self.decayed_load_of_last(skip_recent)).clamp(min=0)


    def decayed_load_of_last(self, steps: int) -> torch.Tensor:
        """[L, E] float64: the decayed load of only the last `steps` steps (at most a window)."""
        recent = self.logical_steps(steps)  # [n, L, E]
        age = torch.arange(recent.shape[0] - 1, -1, -1, dtype=torch.float64, device=recent.device)
        return torch.einsum("s,sle->le", self.decay ** age, recent.double())

    def to_host(self, wait: bool = True) -> ExpertLoadRecorder:
        """A CPU copy of the rings and the decayed load (no session, no recording): a rebalance check
        reads dozens of figures from them, and on a GPU each read would wait for the device.
        wait=False: see host_copy."""
        host = copy.copy(self)
        for name in ("load", "physical", "logical", "decayed"):
            setattr(host, name, host_copy(getattr(self, name), wait))
        host.recording, host.session = False, deque()
        return host

    def start(self) -> None:
        """sglang /start_expert_distribution_record: clear the session and record into it."""
        self.session.clear()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def dump(self, path: str | os.PathLike | None = None, phy2log: torch.Tensor | None = None) -> dict:
        """sglang /dump_expert_distribution_record: {"logical_count": [steps, L, E]} (+ the current
        placement as "last_physical_to_logical_map" if given); written with torch.save / JSON when
        `path` is set. The session is cleared afterwards, as sglang does. Nothing recorded since the
        session started or was last dumped: ValueError (a step of zeros would plan as real load)."""
        if not self.session:
            raise ValueError("nothing to dump: no forward step was recorded since "
                             "/start_expert_distribution_record or the last dump"
                             + ("" if self.recording else " (recording is stopped)"))
        record = {"logical_count": torch.stack(list(self.session))}
        if phy2log is not None:
            record[LAST_MAP_KEY] = phy2log.detach().cpu().long()
        if path is not None:
            save_record(path, record)
        self.session.clear()
        return record


# =============================================================================================
# 3. Moving expert weights
# =============================================================================================
class SlotTransfer(NamedTuple):
    """Destination slot `dst_slot` receives logical expert `expert` from `src_slot` (global slot ids)."""
    expert: int
    dst_slot: int
    src_slot: int


def slot_sources(old_row: list[int], new_row: list[int], num_ranks: int) -> list[SlotTransfer]:
    """Where each changed slot copies its new expert from. old_row, new_row: [P] expert per slot.

    The one source policy of both movers (LocalMover here, ep.DistributedMover across ranks). A pure
    function of the two rows, sorted by (expert, dst_slot): every rank derives the same list, so
    matching sends and receives line up. The source is an old holder of the expert (replicas hold
    identical weights, so any holder gives the same bits): one on the destination's own rank if
    there is one, a local copy without network, preferring a holder that keeps its expert (it is
    never overwritten, so the copy need not wait); otherwise the expert's remote receivers are
    dealt round-robin over all its holders, so no single rank sends everything.
    """
    per_rank = len(old_row) // num_ranks
    holders: dict[int, list[int]] = {}
    for slot, e in enumerate(old_row):
        holders.setdefault(e, []).append(slot)
    dealt: dict[int, int] = {}  # remote receivers of each expert so far
    transfers = []
    for dst, e in enumerate(new_row):
        if old_row[dst] == e:
            continue
        if e not in holders:
            raise ValueError(f"expert {e} has no replica in the old placement: nothing to copy from")
        local = [q for q in holders[e] if q // per_rank == dst // per_rank]
        if local:
            src = min(local, key=lambda q: (old_row[q] != new_row[q], q))
        else:
            src = holders[e][dealt.get(e, 0) % len(holders[e])]
            dealt[e] = dealt.get(e, 0) + 1
        transfers.append(SlotTransfer(e, dst, src))
    return sorted(transfers)


def copy_schedule(transfers: list[SlotTransfer]) -> list[tuple[int, int]]:
    """Order one layer's copies so they run in place with one spare slot.

    transfers (from `slot_sources`) -> [(dst, src)], slot -1 meaning the spare. A slot is
    overwritten only after every copy reading it is done; a cycle (a permutation) is broken by
    parking one slot in the spare first: len(transfers) + cycles copies.
    """
    pending = {t.dst_slot: t.src_slot for t in transfers}
    readers: dict[int, int] = {}
    for q in pending.values():
        readers[q] = readers.get(q, 0) + 1
    schedule = []
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
        transfers = slot_sources(old, new, self.num_ranks)
        schedule = copy_schedule(transfers)
        for w in weights:
            key = (tuple(w.shape[1:]), w.dtype, w.device)
            spare = self.spare.get(key)
            if spare is None:
                spare = self.spare[key] = torch.empty_like(w[0])
            for dst, src in schedule:
                (spare if dst < 0 else w[dst]).copy_(spare if src < 0 else w[src])
        slot_bytes = sum(w[0].numel() * w[0].element_size() for w in weights)
        return slot_bytes * len(transfers)  # the spare's copies are not moves


# Upper bounds (seconds) of the move-step histogram: a step that moves expert weights is a stall for
# every request in flight, from sub-millisecond (one small layer) to seconds (all layers of a big model).
MOVE_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SecondsHistogram:
    """Durations counted into fixed buckets (Prometheus `le` semantics): memory stays one count per
    bucket however many steps are observed."""

    def __init__(self, bounds: tuple[float, ...] = MOVE_STEP_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        """{"buckets": [[upper bound or "+Inf", cumulative count], ...], "sum", "count"}."""
        cumulative = list(itertools.accumulate(self.counts))
        bounds = [*self.bounds, "+Inf"]
        return {"buckets": [[b, c] for b, c in zip(bounds, cumulative)], "sum": self.sum, "count": cumulative[-1]}


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
        self.changed_slots: list[list[int]] = []      # per layer: slots the latest move rewrites
        self.step_seconds = SecondsHistogram()         # every moving step's duration, all moves

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def begin(self, target: ExpertLocation, layers_per_step: int | None = None) -> None:
        if self.busy:
            raise RuntimeError("a rebalance is already in progress")
        changed = target.changed_slots(self.location)
        self.target, self.layers_per_step, self.stats = target, layers_per_step, MoveStats()
        differs = (target.phy2log.cpu() != self.location.phy2log.cpu())
        self.changed_slots = [row.nonzero().flatten().tolist() for row in differs]
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
        self.step_seconds.observe(seconds)
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
# 4. Manager: the engine's hook
# =============================================================================================
@dataclass
class EPLBConfig:
    """EPLB options (defaults mirror sglang's where it has them).

    algorithm: "global" (replicate + pack over all ranks) or "hierarchical" (node-local replicas).
    DSV4 has no expert groups, so "hierarchical" uses num_groups = E by default: every expert is its
    own group, experts are balanced over nodes first and replicated only inside their node.
    The policy (see `layers_worth_moving`): plans are fitted to load that leaves out the last half
    period of steps and move only where their gain on those steps beats min_gain + gain_noise_sigmas
    standard errors; min_gain < 0 with gain_noise_sigmas = 0 moves whatever changes.
    """
    num_ranks: int = 1
    rebalance_num_iterations: int = 1000
    window: int | None = None  # steps kept one by one (held-out and measured load); default = the period
    algorithm: str = "global"
    num_nodes: int = 1
    num_groups: int | None = None
    layers_per_step: int | None = None  # None: all layers at once
    min_balancedness: float = 1.0  # skip when the window's balancedness is already >= this
    load_half_life: float | None = None  # steps; the decayed load estimate's half-life (None: 4 windows)
    min_gain: float = 0.01  # a move must raise held-out balancedness by more than this ...
    gain_noise_sigmas: float = 2.0  # ... plus this many standard errors of that estimate
    per_layer: bool = True  # decide layer by layer (False: the whole plan or nothing)
    refine: bool = True
    preserve_slots: bool = True
    init_expert_location: str | None = None
    history: int = 256  # balancedness samples kept for /eplb/state (mean and per layer)
    background_checks: bool = False  # decide due checks in another process while decoding goes on


class EPLBManager:
    """Record → decide → move → measure, driven by `after_step()` once per forward step.

    model: a dsv4_mini.DSV4Model (buffers phy2log / log2phy / logcnt, expert_weights(layer)).
    Hand `manager.load` to model.forward(load=...), then call `manager.after_step()`.
    Under torchrun only rank 0 has a manager: it records (every rank routes the same batch, so its
    counts are everyone's), plans, and moves through `ep.LockstepMover`, which announces each layer
    move so the other ranks apply the same rows (`ep.run_worker`).
    Every period (rebalance_num_iterations, counted from the end of the previous move, so the
    "measured after" window completes first) it decides whether a new placement pays: plans fitted
    to load without the last half period are judged on that half period against the current
    placement; a skip is recorded with its reason like a move.
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
        self.half_life = config.load_half_life or 4 * self.window
        device = self.location.phy2log.device
        self.recorder = ExpertLoadRecorder(L, P, E, self.window, device, half_life=self.half_life)
        self.rebalancer = Rebalancer(model, self.location, mover)
        self.slot_bytes = sum(w[0].numel() * w[0].element_size() for w in model.expert_weights(0))
        self.judge = Judge(config, self.window, E, P, self.num_groups, self.num_nodes, self.slot_bytes)
        self.step_count = 0
        self.last_check = 0
        self.records: deque[RebalanceRecord] = deque(maxlen=64)
        # (step, [L] per-layer balancedness of the window then), sampled every window/10 steps and kept
        # on the model's device until read: a host read per sample would stall the steps queued ahead
        self._samples: deque[tuple[int, torch.Tensor]] = deque(maxlen=config.history)
        self.counters = {"rebalances_total": 0, "rebalances_skipped_total": 0, "rebalance_checks_total": 0,
                         "rebalance_seconds_total": 0.0, "bytes_moved_total": 0, "slots_changed_total": 0}
        self.skipped_by_reason = dict.fromkeys(SKIP_REASONS, 0)
        self._moving: RebalanceRecord | None = None  # the move in progress
        self._unmeasured: RebalanceRecord | None = None  # a finished move waiting for its window
        # background checks (config): a process judges (planning is Python that would hold the GIL the
        # engine thread needs between steps); a thread waits for the snapshot copies and for that process
        self._judges: concurrent.futures.ProcessPoolExecutor | None = None
        self._courier: concurrent.futures.ThreadPoolExecutor | None = None
        self._check: concurrent.futures.Future | None = None  # a background check in flight -> Verdict
        self._verdict_ready = False  # that check was done at the last after_step: the next one applies it
        if config.init_expert_location not in (None, "trivial"):
            start = initial_location(config.init_expert_location, L, E, P, config.num_ranks,
                                     self.num_groups, self.num_nodes, config.refine)
            self.rebalancer.run(start.to(device))
        if config.num_ranks > 1:
            self._warm_up()

    def _warm_up(self) -> None:
        """Judge once on made-up load at start, where checks will run (in the judging process, not
        waited for, or here): the first plan pays one-off costs (numpy imports its submodules lazily,
        first-use kernels) that would stall the first real check or move by ~0.15 s (measured on the
        H200 host)."""
        L, P, E = self.location.num_layers, self.location.num_physical, self.location.num_experts
        recorder = ExpertLoadRecorder(L, P, E, 4)
        for _ in range(4):
            recorder.load.fill_(1)
            recorder.step(self.location.phy2log.cpu())
        current = self.location.to("cpu")
        if self.config.background_checks:
            # spawn, never fork: this process may hold CUDA state; one CPU thread, set by the initializer
            self._judges = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=init_judge_process)
            self._courier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="eplb-check")
            self._judges.submit(self.judge.decide, recorder, current, 0, True)
        else:
            self.judge.decide(recorder, current, 0, force=True)
        self._window_balancedness()  # ...and the device work of a balancedness sample (first launches load kernels)

    def close(self) -> None:
        """Stop the judging process of background checks (a check in flight is dropped); later checks,
        if any, run on the engine thread."""
        for pool in (self._judges, self._courier):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._judges = self._courier = self._check = None
        self._verdict_ready = False
        self.config.background_checks = False

    @property
    def load(self) -> torch.Tensor:
        """[L, P] int32 counts of the current step: pass to model.forward(load=...)."""
        return self.recorder.load

    def after_step(self) -> None:
        """Call after every forward step (engine thread, between forwards)."""
        self.recorder.step(self.location.phy2log)
        self.step_count += 1
        self._move_chunk()
        self._measure_if_due()
        if self._verdict_ready:  # seen ready at the last step, so no step was launched ahead of this one
            self._apply_background_verdict()
        elif (self._rebalance_due(self.step_count) and self.config.num_ranks > 1 and not self.rebalancer.busy
              and self._check is None):
            if self.config.background_checks:
                self._start_background_check()
            else:
                self.rebalance()
        self._verdict_ready = self._check is not None and self._check.done()
        if self.step_count % max(1, self.window // 10) == 0:
            self._samples.append((self.step_count, self._window_balancedness()))

    def _rebalance_due(self, step_count: int) -> bool:
        return step_count - self.last_check >= self.config.rebalance_num_iterations

    def may_move_after_next_step(self) -> bool:
        """Whether the next after_step() may move expert weights and maps (a move in progress goes on, a
        background verdict is ready, or a check on this thread is due): the engine launches no step
        ahead of such a step."""
        due_here = self._rebalance_due(self.step_count + 1) and not self.config.background_checks
        return self.rebalancer.busy or self._verdict_ready or due_here

    def _apply_background_verdict(self) -> None:
        check, self._check, self._verdict_ready = self._check, None, False
        try:
            verdict = check.result()
        except concurrent.futures.BrokenExecutor as error:  # killed (e.g. out of memory)
            log.error("eplb: the judging process died (%s); checks run on the engine thread from now on", error)
            self.close()
            return
        self._act(verdict)

    def move_pending_layers(self) -> bool:
        """From the engine's idle loop (no step in flight): move the next chunk of a rebalance in
        progress, or start the move of a background verdict that is in, so a started rebalance finishes
        when traffic stops. Returns whether it moved any."""
        if not self.rebalancer.busy and self._check is not None and self._check.done():
            self._apply_background_verdict()
        return self._move_chunk()

    def _move_chunk(self) -> bool:
        if not self.rebalancer.busy:
            return False
        self.rebalancer.step()
        self._finish_if_done()
        return True

    def balancedness(self, steps: int | None = None) -> float:
        """Measured: mean over layers of the last `steps` steps' per-layer balancedness."""
        return float(self.layer_balancedness(steps).mean())

    def layer_balancedness(self, steps: int | None = None) -> torch.Tensor:
        """[L] float64 on the CPU: per-layer balancedness of the last `steps` steps (default: the window)."""
        return self._window_balancedness(steps).cpu()

    def _window_balancedness(self, steps: int | None = None) -> torch.Tensor:
        """The same on the recorder's device, without waiting for it."""
        return balancedness(rank_load(self.recorder.physical_load(steps), self.config.num_ranks))

    def history(self) -> tuple[list[tuple[int, float]], list[tuple[int, list[float]]]]:
        """The balancedness samples: ([(step, mean over layers)], [(step, [L] per layer)]), oldest first."""
        if not self._samples:
            return [], []
        steps = [step for step, _ in self._samples]
        per_layer = torch.stack([b for _, b in self._samples]).cpu()  # [S, L]: one read for all samples
        return list(zip(steps, per_layer.mean(1).tolist())), list(zip(steps, per_layer.tolist()))

    def plan(self, logical_load: torch.Tensor, current: ExpertLocation | None = None) -> ExpertLocation:
        """New placement (on the CPU) for logical_load [L, E], keeping the slots of `current` (default:
        the model's placement) where it can."""
        return self._location(self.judge.plan(logical_load, self.location if current is None else current))

    def _location(self, phy2log: torch.Tensor) -> ExpertLocation:
        """phy2log [L, P] -> an ExpertLocation (CPU) with this model's sizes."""
        return ExpertLocation.from_phy2log(phy2log, self.location.num_experts, self.config.num_ranks,
                                           self.location.width)

    def rebalance(self, force: bool = False) -> dict:
        """Decide now whether a new placement pays and, if so, start moving it (now, or over the next steps).

        force (POST /eplb/rebalance): move every layer the best plan changes, whatever its gain.
        Returns {"status": "started" | "skipped", **the RebalanceRecord} or {"status": "busy" |
        "no_load" | "nothing_to_balance", ...}; only "started" and "skipped" are counted. A check
        running in the background is superseded (its verdict is dropped).
        """
        if self.config.num_ranks == 1:
            return {"status": "nothing_to_balance",
                    "reason": "one rank: every expert already runs on it, there is no load to even out"}
        if self.rebalancer.busy:
            return {"status": "busy", "layers_left": len(self.rebalancer.pending)}
        self._check, self._verdict_ready = None, False
        self.last_check = self.step_count
        return self._act(self.judge.decide(self.recorder.to_host(), self.location.to("cpu"), self.step_count, force))

    def _start_background_check(self) -> None:
        """The due check in the judging process, on snapshots queued behind the work already on the
        device (nothing waits for the GPU here); its verdict is applied by a later after_step()."""
        self.last_check = self.step_count
        loc = self.location
        recorder = self.recorder.to_host(wait=False)
        current = ExpertLocation(*(host_copy(t, wait=False) for t in (loc.phy2log, loc.log2phy, loc.logcnt)),
                                 loc.num_ranks)
        copied = torch.cuda.Event() if loc.phy2log.is_cuda else None
        if copied is not None:
            copied.record()

        def judge(step: int = self.step_count, judges=self._judges) -> Verdict:  # on the courier thread
            if copied is not None:
                copied.synchronize()
            # pageable copies of the pinned snapshots: they reach the process through shared memory
            host_current = ExpertLocation(*(host_copy(t) for t in (current.phy2log, current.log2phy, current.logcnt)),
                                          current.num_ranks)
            return judges.submit(self.judge.decide, recorder.to_host(), host_current, step, False).result()

        self._check = self._courier.submit(judge)

    def _act(self, verdict: Verdict) -> dict:
        """Apply a check's verdict (engine thread): count and record it, and start the move if any."""
        rec = verdict.record
        if rec is None:
            return {"status": "no_load"}
        self.counters["rebalance_checks_total"] += 1
        if verdict.target is None:
            self.counters["rebalances_skipped_total"] += 1
            self.skipped_by_reason[rec.reason] += 1
            self.records.append(rec)
            log.info("eplb step %d: %s", rec.step, rec.detail)
            return {"status": "skipped", **asdict(rec)}
        if verdict.restart_decayed is not None:
            self.recorder.decayed.copy_(verdict.restart_decayed)
        log.info("eplb step %d: %s", rec.step, rec.detail)
        self._log_unmeasured()
        self._moving = rec
        self.records.append(rec)
        self.rebalancer.begin(self._location(verdict.target), self.config.layers_per_step)
        self._move_chunk()
        return {"status": "started", **asdict(rec)}

    def _finish_if_done(self) -> None:
        rec = self._moving
        if self.rebalancer.busy or rec is None:
            return
        stats = self.rebalancer.stats
        rec.finished_step = self.last_check = self.step_count  # the next period starts after the move
        rec.slots_changed, rec.bytes_moved = stats.slots_changed, stats.bytes_moved
        rec.move_seconds, rec.longest_step_seconds, rec.layers_moved = stats.seconds, stats.longest_step_seconds, stats.layers
        self.counters["rebalances_total"] += 1
        self.counters["rebalance_seconds_total"] += rec.plan_seconds + rec.move_seconds
        self.counters["bytes_moved_total"] += rec.bytes_moved
        self.counters["slots_changed_total"] += rec.slots_changed
        self._moving, self._unmeasured = None, rec

    def _measure_steps(self) -> int:
        return min(self.window, self.config.rebalance_num_iterations)

    def _measure_if_due(self) -> None:
        rec = self._unmeasured
        if rec is not None and self.step_count - rec.finished_step >= self._measure_steps():
            rec.balancedness_measured = self.balancedness(self._measure_steps())
            self._log_unmeasured()

    def _log_unmeasured(self) -> None:
        """The measured line of the last finished move (measurement window cut short if still open)."""
        rec, self._unmeasured = self._unmeasured, None
        if rec is None:
            return
        measured = "n/a" if rec.balancedness_measured is None else f"{rec.balancedness_measured:.3f}"
        log.info("eplb rebalance at step %d: balancedness %.3f -> predicted %.3f -> measured %s | "
                 "slots changed %d | moved %.1f MiB | plan %.1f ms | move %.1f ms (%d layers, longest step %.1f ms)",
                 rec.step, rec.balancedness_before, rec.balancedness_predicted, measured, rec.slots_changed,
                 rec.bytes_moved / 2**20, rec.plan_seconds * 1e3, rec.move_seconds * 1e3, rec.layers_moved,
                 rec.longest_step_seconds * 1e3)

    def metrics(self) -> dict:
        """Flat numbers for Prometheus: counters, skips by reason, the last decision's predicted gain,
        and current balancedness (overall and per layer)."""
        per_layer = self.layer_balancedness()
        last = next((r for r in reversed(self.records) if r.gain_predicted is not None), None)
        return {**self.counters, "balancedness": float(per_layer.mean()),
                "balancedness_per_layer": per_layer.tolist(), "steps": self.step_count,
                "rebalance_in_progress": int(self.rebalancer.busy),
                "move_step_seconds": self.rebalancer.step_seconds.snapshot(),
                "rebalances_skipped_by_reason": dict(self.skipped_by_reason),
                "last_gain_predicted": None if last is None else last.gain_predicted,
                "last_gain_margin": None if last is None else last.gain_margin,
                "rebalance_layers_left": len(self.rebalancer.pending)}

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
        config.update(num_groups=self.num_groups, num_nodes=self.num_nodes, window=self.window,
                      load_half_life=self.half_life)
        history, layer_history = self.history()
        in_progress = None
        if self.rebalancer.busy:
            in_progress = {"layers_left": len(self.rebalancer.pending), "step": self._moving.step}
        return {
            "config": config,
            "num_layers": loc.num_layers, "num_experts": loc.num_experts, "num_physical": loc.num_physical,
            "num_ranks": loc.num_ranks, "step": self.step_count, "window_steps": min(self.recorder.steps, self.window),
            "phy2log": loc.phy2log.cpu().tolist(), "logcnt": loc.logcnt.cpu().tolist(),
            "logical_load": logical.tolist(), "rank_load": ranks.long().tolist(),
            "balancedness_per_layer": balancedness(ranks).tolist(),
            "balancedness_history": [list(x) for x in history],
            # [step, [L]] samples; rounded, since the page polls this every second at 43+ layers
            "layer_balancedness_history": [[step, [round(b, 4) for b in row]] for step, row in layer_history],
            "changed_slots": self.rebalancer.changed_slots,
            "rebalance_in_progress": in_progress,
            "rebalances": [asdict(r) for r in self.records],
            "counters": dict(self.counters),
            "rebalances_skipped_by_reason": dict(self.skipped_by_reason),
            "balancedness": self.balancedness(),
        }


# =============================================================================================
# 5. CLI
# =============================================================================================
def _checked_plan_input(parser: argparse.ArgumentParser, args) -> dict[str, torch.Tensor]:
    """The record, if it and every size can be planned with; else one line (parser.error exits 2)."""
    try:
        record = load_record(args.record)
        if "logical_count" not in record:
            raise ValueError(f"{args.record}: the record has no logical_count to plan from")
        _, num_layers, num_experts = record["logical_count"].shape
        check_plan_sizes(num_layers, num_experts, args.num_replicas, args.num_groups, args.num_nodes,
                         args.num_gpus)
    except ValueError as error:
        parser.error(str(error))
    if placement_policy(args.num_groups, args.num_nodes) == "global" and max(args.num_groups, args.num_nodes) > 1:
        parser.error(f"--num-groups {args.num_groups} --num-nodes {args.num_nodes} would be ignored: the "
                     "hierarchical policy needs --num-groups > 1 and a multiple of --num-nodes")
    return record


def _plan_command(parser: argparse.ArgumentParser, args) -> None:
    record = _checked_plan_input(parser, args)
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
    policy = placement_policy(args.num_groups, args.num_nodes)
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


MAX_DEMO_STEPS, MAX_DEMO_BATCH = 10_000, 256   # the demo runs on a CPU; larger is a typo


def _demo_command(parser: argparse.ArgumentParser, args) -> None:
    import dsv4_mini  # lazy: the demo builds a model, and nothing else in eplb.py needs the model
    import eplb_demo

    if not (1 <= args.steps <= MAX_DEMO_STEPS and 1 <= args.batch <= MAX_DEMO_BATCH
            and (args.layers_per_step is None or args.layers_per_step >= 1) and args.redundant >= 0):
        parser.error(f"needs --steps in 1..{MAX_DEMO_STEPS}, --batch in 1..{MAX_DEMO_BATCH}, "
                     f"--layers-per-step >= 1, --redundant >= 0")
    config = dsv4_mini.ModelConfig.tiny() if args.tiny else dsv4_mini.ModelConfig.mini()
    try:   # the demo plans E + redundant slots over --num-ranks: the planner's own limits
        experts = config.n_routed_experts
        check_plan_sizes(config.num_hidden_layers, experts, experts + args.redundant, 1, 1, args.num_ranks)
    except ValueError as error:
        parser.error(f"--redundant {args.redundant} --num-ranks {args.num_ranks}: {error}")

    eplb_demo.run_demo(tiny=args.tiny, num_ranks=args.num_ranks, redundant=args.redundant, steps=args.steps,
                       batch=args.batch, layers_per_step=args.layers_per_step)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="eplb.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    # allow_abbrev=False: a shortened flag is an error, never silently another flag
    p = sub.add_parser("plan", help="plan a placement from a recorded load (sglang or dsv4-mini record)",
                       allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("record", help=".pt / .json record file or a JSON string with logical_count")
    p.add_argument("--num-replicas", type=int, required=True, metavar="P", help="physical slots per layer")
    p.add_argument("--num-gpus", type=int, required=True, metavar="G", help="ranks the slots split over")
    p.add_argument("--num-groups", type=int, default=1, help="expert groups (hierarchical policy when > 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (hierarchical: groups split over them)")
    p.add_argument("--no-refine", action="store_true", help="plain DeepSeek greedy")
    p.add_argument("--out", help="write the placement (physical_to_logical_map) here, .json or .pt")
    d = sub.add_parser("demo", help="one rebalance end to end on the built-in model", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--tiny", action="store_true", help="tiny config (fast) instead of mini")
    d.add_argument("--num-ranks", type=int, default=4, help="virtual EP ranks")
    d.add_argument("--redundant", type=int, default=4, help="redundant expert slots")
    d.add_argument("--steps", type=int, default=20, help="steps per window (load before, then after the move)")
    d.add_argument("--batch", type=int, default=4, help="sequences of 16 tokens per step")
    d.add_argument("--layers-per-step", type=int, default=None, help="layers moved per step (default: all)")
    args = parser.parse_args(argv)
    {"plan": _plan_command, "demo": _demo_command}[args.command](sub.choices[args.command], args)


if __name__ == "__main__":
    main()
