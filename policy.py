"""EPLB policy: does a new expert placement pay for its move? Decided on CPU snapshots of the recorded
load and of the placement, away from the engine: `Judge` holds only sizes and options, so a check can
run in another process (eplb.EPLBManager does that on a GPU server: planning is ~10 ms of Python that
would otherwise hold the GIL the engine thread needs between decode steps).

    recorder snapshot (ring of W steps, decayed load) ─► plans on two load estimates, without the last
    half period ─► heldout_gain on that half period, with its jackknife noise ─► layers_worth_moving
    ─► Verdict(record, target phy2log or None)

Shapes: L MoE layers, E logical experts, P physical slots, G ranks, K blocks of held-out steps.
The recorder (eplb.ExpertLoadRecorder) and placements (eplb.ExpertLocation) are used through their
methods and tensors only; this module does not import eplb.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from planner import balancedness, rank_load, rebalance_experts, replica_load

__all__ = ["PlanGain", "MoveDecision", "blocks_rank_load", "heldout_gain", "layers_worth_moving", "SKIP_REASONS",
           "MOVE_REASONS", "RebalanceRecord", "Verdict", "Judge", "init_judge_process"]


# ---------------------------------------------------------------- does a plan pay? (pure functions)
class PlanGain(NamedTuple):
    """A plan's balancedness gain over the current placement, measured on held-out load."""
    layer_gain: torch.Tensor  # [L] float64: balancedness under the plan minus under the current placement
    layer_noise: torch.Tensor  # [L] float64: jackknife standard error of layer_gain
    replicates: torch.Tensor  # [K, L] float64: layer_gain with each block of held-out steps left out


class MoveDecision(NamedTuple):
    layers: torch.Tensor  # [L] bool: the layers to move
    reason: str  # "plan_pays" | "layers_pay" | "gain_below_margin"
    gain: float  # the whole plan's gain of the model figure (mean over layers)
    noise: float  # its jackknife standard error
    margin: float  # min_gain + noise_sigmas * noise: what `gain` had to exceed for the whole plan to move


def blocks_rank_load(blocks: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Rank load of K blocks of logical load under one placement: blocks [K, L, E], phy2log [L, P] -> [K, L, G]."""
    K, L, E = blocks.shape
    slot_load = replica_load(blocks.reshape(K * L, E), phy2log.cpu().repeat(K, 1))  # [K*L, P]
    return rank_load(slot_load, num_ranks).view(K, L, num_ranks)


def heldout_gain(current: torch.Tensor, planned: torch.Tensor) -> PlanGain:
    """How much a plan raises balancedness on load it was not fitted to, and how noisy that figure is.

    current, planned [K, L, G]: rank load of K consecutive blocks of held-out steps under the current
    placement and under the plan. The gain is taken over all K blocks together; its noise is the
    jackknife standard error over the blocks (each left out once): it shrinks as held-out load grows
    and widens with routing noise. K = 1 gives noise 0.
    """
    current, planned = current.double(), planned.double()
    gain = balancedness(planned.sum(0)) - balancedness(current.sum(0))  # [L]
    replicates = balancedness(planned.sum(0) - planned) - balancedness(current.sum(0) - current)  # [K, L]
    return PlanGain(gain, _jackknife_error(replicates), replicates)


def _jackknife_error(replicates: torch.Tensor) -> torch.Tensor:
    """Standard error from leave-one-out replicates [K, ...] -> [...]: sqrt((K-1)/K * sum (r - mean)^2)."""
    K = replicates.shape[0]
    return ((K - 1) / K * (replicates - replicates.mean(0)).pow(2).sum(0)).sqrt()


def layers_worth_moving(gain: PlanGain, changed: torch.Tensor, min_gain: float, noise_sigmas: float,
                        per_layer: bool) -> MoveDecision:
    """Which layers of a plan to move, if any: a move must beat the noise of its own estimate.

    gain: from `heldout_gain`; changed [L] bool: the layers the plan changes. The whole plan pays, and
    all its changed layers move, when its model gain (mean over layers) exceeds min_gain +
    noise_sigmas x its noise. Otherwise, per_layer, a layer moves alone when its own gain exceeds
    min_gain + noise_sigmas x its own noise (a layer's move costs only its own bytes).
    """
    model_gain = float(gain.layer_gain.mean())
    noise = float(_jackknife_error(gain.replicates.mean(1)))
    margin = min_gain + noise_sigmas * noise
    pays = model_gain > margin
    alone = gain.layer_gain > min_gain + noise_sigmas * gain.layer_noise  # [L]
    layers = changed & (alone | pays if per_layer else torch.full_like(changed, pays))
    reason = "gain_below_margin" if not bool(layers.any()) else "plan_pays" if pays else "layers_pay"
    return MoveDecision(layers, reason, model_gain, noise, margin)


# ---------------------------------------------------------------- records and verdicts
SKIP_REASONS = ("balanced_enough", "not_enough_steps", "no_change", "gain_below_margin")
MOVE_REASONS = ("plan_pays", "layers_pay", "forced")


@dataclass
class RebalanceRecord:
    """One rebalance decision: a move, or a skip and why. Balancedness is the mean over layers of
    mean / max rank load; gains are differences of it. "Held-out" figures are predicted on the last
    `heldout_steps` steps, which the plan was not fitted to."""
    step: int
    balancedness_before: float  # measured over the window, current placement
    balancedness_predicted: float | None = None  # held-out: the placement moved to (skipped: the whole plan)
    balancedness_measured: float | None = None  # over the window after the move
    slots_changed: int = 0
    bytes_moved: int = 0
    plan_seconds: float = 0.0
    move_seconds: float = 0.0
    longest_step_seconds: float = 0.0
    layers_moved: int = 0
    finished_step: int | None = None
    forced: bool = False
    decision: str = "moved"  # "moved" | "skipped"
    reason: str = ""  # one of MOVE_REASONS / SKIP_REASONS
    detail: str = ""  # the decision in words (the log line)
    plan_load: str | None = None  # the load the plan was fitted to: "decayed" | "recent" | "all"
    heldout_steps: int = 0
    balancedness_heldout: float | None = None  # held-out: the current placement
    gain_predicted: float | None = None  # held-out gain of the whole plan
    gain_noise: float | None = None  # its jackknife standard error
    gain_margin: float | None = None  # min_gain + gain_noise_sigmas * gain_noise
    layers_planned: int = 0  # layers the whole plan changes
    slots_planned: int = 0  # slots, and bytes, the whole plan would move
    bytes_planned: int = 0


class Verdict(NamedTuple):
    """A check's outcome, decided on snapshots (Judge.decide), applied by eplb.EPLBManager._act."""
    record: RebalanceRecord | None  # None: no load recorded yet (not counted as a check)
    target: torch.Tensor | None  # phy2log [L, P] (CPU) to move to; None: a skip (record says why)
    restart_decayed: torch.Tensor | None = None  # the recent load won: the decayed load [L, E] to restart from


class Candidate(NamedTuple):
    load_name: str  # which load estimate the plan was fitted to
    plan: torch.Tensor  # phy2log [L, P] (CPU)
    gain: PlanGain
    heldout_balancedness: float  # the current placement's, on the held-out steps


# ---------------------------------------------------------------- the check
def changed_slots(phy2log: torch.Tensor, current) -> torch.Tensor:
    """[L] slots whose expert differs between phy2log [L, P] and the `current` placement."""
    return (phy2log.cpu() != current.phy2log.cpu()).sum(1)


@dataclass(frozen=True)
class Judge:
    """One rebalance check, from snapshots to a Verdict. Sizes and options only (picklable): the
    manager's `config` (an eplb.EPLBConfig), its window, the placement's sizes and one slot's bytes."""
    config: object
    window: int
    num_experts: int
    num_physical: int
    num_groups: int
    num_nodes: int
    slot_bytes: int

    def plan(self, logical_load: torch.Tensor, current) -> torch.Tensor:
        """phy2log [L, P] (CPU) for logical_load [L, E], keeping the slots of `current` where it can."""
        old = current.phy2log.cpu() if self.config.preserve_slots else None
        phy2log, _, _ = rebalance_experts(logical_load.cpu(), self.num_physical, self.num_groups, self.num_nodes,
                                          self.config.num_ranks, refine=self.config.refine, old_phy2log=old)
        return phy2log

    def decide(self, recorder, current, step: int, force: bool) -> Verdict:
        """Decide on CPU snapshots of the recorded load (recorder) and the placement (current); nothing
        else is read or changed, so this may run on a worker thread or in another process."""
        config = self.config
        if int(recorder.logical_load().sum()) == 0:
            return Verdict(None, None)
        measured = balancedness(rank_load(recorder.physical_load(), config.num_ranks))  # [L]
        rec = RebalanceRecord(step, float(measured.mean()), forced=force)
        if rec.balancedness_before >= config.min_balancedness and not force:
            return _skipped(rec, "balanced_enough", f"measured balancedness {rec.balancedness_before:.3f} >= "
                            f"min balancedness {config.min_balancedness:.3f}")
        t0 = time.perf_counter()
        rec.heldout_steps = max(1, min(config.rebalance_num_iterations, self.window, recorder.steps) // 2)
        best = self._best_candidate(recorder, current, rec.heldout_steps, fallback_to_all=force)
        if best is None:
            return _skipped(rec, "not_enough_steps", f"no steps before the {rec.heldout_steps} held-out ones "
                            "to fit a plan to")
        changed = changed_slots(best.plan, current) > 0  # [L]
        decision = layers_worth_moving(best.gain, changed, config.min_gain, config.gain_noise_sigmas,
                                       config.per_layer)
        layers = changed if force else decision.layers
        self._fill_prediction(rec, best, current, decision, layers)
        if not bool(layers.any()):
            rec.plan_seconds = time.perf_counter() - t0
            reason = "no_change" if not bool(changed.any()) else decision.reason
            rec.reason = reason
            return _skipped(rec, reason, self._describe(rec, 0, current.num_layers))
        target = self._move_target(recorder, current, best, layers, rec)
        rec.plan_seconds = time.perf_counter() - t0
        rec.reason = "forced" if force else decision.reason
        rec.detail = self._describe(rec, int((changed_slots(target, current) > 0).sum()), current.num_layers)
        # the recent load won: traffic has changed, the decayed memory restarts from those steps (computed
        # here on the snapshot; steps recorded between it and the move are dropped from the memory too)
        restart = recorder.decayed_load_of_last(2 * rec.heldout_steps) if best.load_name == "recent" else None
        return Verdict(rec, target, restart)

    def _best_candidate(self, recorder, current, heldout: int, fallback_to_all: bool) -> Candidate | None:
        """Plan on each load estimate of `recorder` without the last `heldout` steps; the larger held-out
        gain over the `current` placement wins.

        "decayed": every earlier step, halved every half-life (steady: the usual winner);
        "recent": the `heldout` steps before those (follows a change of traffic within one period).
        None when neither has load yet, unless fallback_to_all: then a plan on all load ("all"),
        judged on its own steps.
        """
        recent = recorder.logical_steps(2 * heldout)[:-heldout]  # [<= heldout, L, E]
        estimates = {"decayed": recorder.decayed_load(heldout), "recent": recent.sum(0)}
        estimates = {name: load for name, load in estimates.items() if float(load.sum()) > 0}
        if not estimates and fallback_to_all:
            estimates = {"all": recorder.decayed_load()}
        steps = recorder.logical_steps(heldout)  # [h, L, E]
        blocks = torch.stack([b.sum(0) for b in steps.tensor_split(min(8, len(steps)))])  # [K, L, E]
        now = blocks_rank_load(blocks, current.phy2log, self.config.num_ranks)  # [K, L, G]
        best = None
        for name, load in estimates.items():
            plan = self.plan(load, current)
            gain = heldout_gain(now, blocks_rank_load(blocks, plan, self.config.num_ranks))
            if best is None or float(gain.layer_gain.mean()) > float(best.gain.layer_gain.mean()):
                best = Candidate(name, plan, gain, float(balancedness(now.sum(0)).mean()))
        return best

    def _move_target(self, recorder, current, best: Candidate, layers: torch.Tensor,
                     rec: RebalanceRecord) -> torch.Tensor:
        """phy2log [L, P] to move to: `current` with `layers` [L] bool of a plan refitted to the winning
        load with the held-out steps added (more and fresher load, fitted the same way as the plan judged)."""
        load = recorder.decayed_load()
        if best.load_name == "recent":
            load = recorder.logical_steps(2 * rec.heldout_steps).sum(0)
        plan = self.plan(load, current)
        slots = changed_slots(plan, current)
        rec.layers_planned, rec.slots_planned = int((slots > 0).sum()), int(slots.sum())
        rec.bytes_planned = rec.slots_planned * self.slot_bytes
        return torch.where(layers.view(-1, 1), plan, current.phy2log.cpu())  # [L, P]

    def _fill_prediction(self, rec: RebalanceRecord, best: Candidate, current, decision: MoveDecision,
                         layers: torch.Tensor) -> None:
        """The judged plan's figures into `rec` (a skip's predicted balancedness: the whole plan's)."""
        slots = changed_slots(best.plan, current)  # [L]
        moving = layers if bool(layers.any()) else slots > 0
        rec.plan_load, rec.balancedness_heldout = best.load_name, best.heldout_balancedness
        rec.balancedness_predicted = best.heldout_balancedness + float(best.gain.layer_gain[moving].sum()) / len(slots)
        rec.gain_predicted, rec.gain_noise, rec.gain_margin = decision.gain, decision.noise, decision.margin
        rec.layers_planned, rec.slots_planned = int((slots > 0).sum()), int(slots.sum())
        rec.bytes_planned = rec.slots_planned * self.slot_bytes

    def _describe(self, rec: RebalanceRecord, layers_moving: int, num_layers: int) -> str:
        """The decision in words: the log line and the record's `detail`."""
        moved = layers_moving > 0
        head = f"move {layers_moving}/{num_layers} layers ({rec.reason})" if moved else f"skip ({rec.reason})"
        c = self.config
        return (f"{head}: held-out balancedness {rec.balancedness_heldout:.3f} -> "
                f"{'predicted' if moved else 'plan would reach'} {rec.balancedness_predicted:.3f} "
                f"({rec.heldout_steps} steps); plan on {rec.plan_load} load: gain {rec.gain_predicted:+.3f} vs margin "
                f"{rec.gain_margin:.3f} (min gain {c.min_gain:g} + {c.gain_noise_sigmas:g} x noise "
                f"{rec.gain_noise:.3f}) | whole plan: {rec.layers_planned} layers, {rec.slots_planned} slots, "
                f"{rec.bytes_planned / 2**20:.1f} MiB")


def _skipped(rec: RebalanceRecord, reason: str, detail: str) -> Verdict:
    rec.decision, rec.reason, rec.detail = "skipped", reason, detail
    return Verdict(rec, None)


def init_judge_process() -> None:
    """A judging process's start: one CPU thread for its torch ops (the engine's process needs the
    cores; a check's tensors are small). The manager's warm-up check then pays the one-off costs."""
    torch.set_num_threads(1)
