"""Expert parallelism over torch.distributed: process group, lock-step batches, cross-rank expert moves.

`torchrun --nproc-per-node G serve.py --eplb --ep-size G` starts G processes. Rank 0 owns HTTP,
tokenizer, scheduler and sampling; every rank runs the same forward on the same batch, computes only
its own P/G expert slots (`kernels.moe_experts(..., slot_offset)`) and the partial MoE outputs are
summed with all-reduce inside the model. This file holds what needs more than one process:

1. `setup_rank` – one process's start: join the process group (gloo on CPU, NCCL on CUDA) with a
     long timeout while ranks load, build the model with only this rank's slots, then serve on a
     group with a short timeout, so a dead or hung rank turns into an error (`RankFailure`), never
     a silent hang. Rank 0 and the workers start the same way (`RankContext`).
2. `StepChannel` – rank 0 broadcasts each step's work (forward, cache reset, layer move, idle, stop);
     `LockstepModel` / `LockstepCache` / `LockstepMover` are rank 0's side, `run_worker` the others',
     so every rank runs the same steps and collectives in the same order.
3. `DistributedMover` – applies one layer of a rebalance plan: only changed slots move, each from
     the source `eplb.slot_sources` picks (a holder on the same rank: a local copy; else received
     through batch_isend_irecv in bounded chunks, senders spread over all old holders).
     `move_layer_checked` adds the canary (`slot_fingerprints` before and after).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from dsv4_mini import MoETimer
from eplb import ExpertLocation, slot_sources
from runner import DecodeGraphs


STARTUP_TIMEOUT_S = 1800.0  # loading a big checkpoint can take long on one node; serving steps cannot


def torchrun_rank() -> int:
    """This process's RANK in the torchrun job (0 outside torchrun)."""
    return int(os.environ.get("RANK", 0))


def torchrun_world_size() -> int:
    """Processes in the torchrun job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def launched_by_torchrun() -> bool:
    """Any torchrun job, a world of one included: it takes the same expert-parallel path (process
    group, step channel, all-reduce), so that path's own cost can be measured on one GPU."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_expert_parallel(device: torch.device) -> tuple[int, int]:
    """Join the torchrun job (backend follows the device). Returns (rank, world_size)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size()


def serving_group(timeout_s: float):
    """Call on every rank once its model is built: wait for all (startup timeout), then the group the
    steps run on, whose short timeout turns a dead or hung peer into an error instead of a hang."""
    dist.barrier()
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class RankContext:
    """One torchrun process, ready to run steps: rank 0 wraps it in `LockstepModel`/`LockstepMover`,
    the other ranks hand it to `run_worker`."""
    rank: int
    world_size: int
    model: Any                  # holds only this rank's P/G expert slots
    group: Any                  # the serving group (short timeout)
    channel: StepChannel        # rank 0 → every rank: what the next step is
    mover: DistributedMover     # this rank's part of a cross-rank expert move


def setup_rank(device: torch.device | str, build_model: Callable[[int, int], Any], timeout_s: float) -> RankContext:
    """The same start on every rank. `build_model(rank, world_size)` returns the model holding only
    this rank's expert slots; `timeout_s` is how long a serving collective may wait for a peer."""
    device = torch.device(device)
    rank, world = init_expert_parallel(device)
    model = build_model(rank, world)
    group = serving_group(timeout_s)
    # The MoE layers all-reduce their partial outputs over `group`; the timer shows a straggler rank.
    model.ep_group, model.moe_timer = group, MoETimer(device)
    return RankContext(rank, world, model, group, StepChannel(group, device), DistributedMover(rank, world, group))


# ---------------------------------------------------------------- lock-step batches

class RankFailure(RuntimeError):
    """A collective failed or timed out: some rank died or hangs. Nothing can run any more."""
    fatal = True


def collective(fn, *args, **kwargs):
    """Run one torch.distributed call; turn any failure (peer gone, timeout) into RankFailure."""
    try:
        return fn(*args, **kwargs)
    except RankFailure:
        raise
    except Exception as error:  # gloo/NCCL raise RuntimeError subclasses with the peer's story
        raise RankFailure(f"expert-parallel peer lost: {error}") from error


STEP_IDLE, STEP_FORWARD, STEP_RESET_SLOT, STEP_NEW_CACHE, STEP_MOVE_LAYER, STEP_STOP = range(6)
STEP_DECODE_GRAPHS = 6  # build DecodeGraphs over the cache and capture every bucket (all ranks together)
STEP_DECODE = 7         # one padded one-token step through DecodeGraphs: payload = ids, positions, slots


class StepChannel:
    """Rank 0 → all ranks: what the next step is. Two broadcasts: a fixed header, then the payload.

    header = [kind, n_parts, len_0, ..., len_7]; the payload is the parts (int64 vectors: a forward's
    input_ids, positions, slot ids, shapes; a layer move's new phy2log row) concatenated, so every
    rank can rebuild exactly what rank 0 runs.

    Rank 0 never waits for the GPU here: the header holds only sizes known on the host and goes up
    from pinned memory, parts already on the device (a decode step's inputs, maybe this step's sampled
    tokens) stay there, and NCCL broadcasts are ordered on the stream like kernels. So a decode step
    can be announced while the previous one still runs (run-ahead). The other ranks read the header
    on the host (they must know what to run); that wait is theirs alone.
    """

    MAX_PARTS = 8

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        self.group = group
        self.device = torch.device(device)

    def send(self, kind: int, parts: list[torch.Tensor]) -> None:
        assert len(parts) <= self.MAX_PARTS
        lengths = [p.numel() for p in parts] + [0] * (self.MAX_PARTS - len(parts))
        header = self._on_device(torch.tensor([kind, len(parts), *lengths], dtype=torch.int64))
        collective(dist.broadcast, header, src=0, group=self.group)
        if parts:
            payload = torch.cat([self._on_device(p).to(torch.int64).reshape(-1) for p in parts])
            collective(dist.broadcast, payload, src=0, group=self.group)

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host or device tensor -> the channel's device, never waiting for queued GPU work: a host
        tensor goes through pinned memory (a pageable copy would stall the host)."""
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def recv(self) -> tuple[int, list[torch.Tensor]]:
        header = torch.empty(2 + self.MAX_PARTS, dtype=torch.int64, device=self.device)
        collective(dist.broadcast, header, src=0, group=self.group)
        kind, n = int(header[0]), int(header[1])
        if n == 0:
            return kind, []
        lengths = header[2:2 + n].tolist()
        payload = torch.empty(sum(lengths), dtype=torch.int64, device=self.device)
        collective(dist.broadcast, payload, src=0, group=self.group)
        return kind, list(payload.split(lengths))


# ---------------------------------------------------------------- cross-rank expert moves

class DistributedMover:
    """Moves one layer's changed slots between ranks. `weights`: this rank's [P_local, ...] tensors.

    Sources come from `eplb.slot_sources`, the same list on every rank (and the same policy as the
    single-process LocalMover).
    """

    def __init__(self, rank: int, num_ranks: int, group=None, chunk_size: int = 32):
        self.rank, self.num_ranks, self.group, self.chunk_size = rank, num_ranks, group, chunk_size

    def move_layer(self, weights: list[torch.Tensor], old_row: torch.Tensor, new_row: torch.Tensor) -> int:
        """Apply the slot changes of one layer in place. Returns the bytes written into this rank's
        slots (local copies and received)."""
        per_rank = old_row.numel() // self.num_ranks
        first = self.rank * per_rank
        mine = lambda slot: first <= slot < first + per_rank  # noqa: E731
        transfers = slot_sources(old_row.tolist(), new_row.tolist(), self.num_ranks)
        staged: list[tuple[int, list[torch.Tensor]]] = []  # (local dst slot, new tensors)
        # Local copies are staged first: later writes must not clobber a slot another copy reads.
        for t in transfers:
            if mine(t.dst_slot) and mine(t.src_slot):
                staged.append((t.dst_slot - first, [w[t.src_slot - first].clone() for w in weights]))
        remote = [t for t in transfers if t.src_slot // per_rank != t.dst_slot // per_rank]
        for start in range(0, len(remote), self.chunk_size):  # bounded batches: big ones hang NCCL
            ops, inbox = [], []
            for t in remote[start:start + self.chunk_size]:
                src_rank, dst_rank = t.src_slot // per_rank, t.dst_slot // per_rank
                if src_rank == self.rank:
                    for w in weights:
                        ops.append(dist.P2POp(dist.isend, w[t.src_slot - first].contiguous(), dst_rank, self.group))
                elif dst_rank == self.rank:
                    bufs = [torch.empty_like(w[0]) for w in weights]
                    ops += [dist.P2POp(dist.irecv, b, src_rank, self.group) for b in bufs]
                    inbox.append((t.dst_slot - first, bufs))
            if ops:
                for req in collective(dist.batch_isend_irecv, ops):
                    collective(req.wait)
            staged += inbox
        for local_slot, tensors in staged:
            for w, t in zip(weights, tensors):
                w[local_slot].copy_(t)
        slot_bytes = sum(w[0].numel() * w[0].element_size() for w in weights)
        return slot_bytes * len(staged)


FINGERPRINT_CHUNK = 1 << 18  # bytes per slot per step of slot_fingerprints: its int32 temporaries stay 2 MiB per slot


def slot_fingerprints(weights: list[torch.Tensor], group=None, num_ranks: int = 1) -> torch.Tensor:
    """[P] int64 fingerprint of every global slot's bytes (gathered from all ranks).

    Per slot, the sum over its raw bytes b_j (every tensor in `weights`, any dtype: bf16, fp8, packed
    fp4 and their scales alike) of b_j * (j mod 251 + 1): position-dependent weights, so permuted or
    partially copied tensors differ. Integer sums, so a slot's fingerprint does not depend on where it
    sits among the slots (a float64 matvec's rounding did, and a moved slot then failed the canary).
    """
    local = None
    for w in weights:
        data = w.reshape(w.shape[0], -1).contiguous().view(torch.uint8)  # [P_local, bytes per slot]
        fp = torch.zeros(data.shape[0], dtype=torch.int64, device=data.device)
        for j0 in range(0, data.shape[1], FINGERPRINT_CHUNK):
            chunk = data[:, j0:j0 + FINGERPRINT_CHUNK].to(torch.int32)  # [P_local, C]
            pos = torch.arange(j0, j0 + chunk.shape[1], device=data.device, dtype=torch.int32) % 251 + 1
            fp += (chunk * pos).sum(1)  # each term < 2^16; the sum accumulates in int64
        local = fp if local is None else local + fp
    if num_ranks == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(num_ranks)]
    collective(dist.all_gather, gathered, local, group=group)
    return torch.cat(gathered)


def expert_fingerprints(slot_fp: torch.Tensor, phy2log_row: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fingerprint of each logical expert, read from the first slot holding it (-1: held by none)."""
    fp = torch.full((num_experts,), -1, dtype=slot_fp.dtype, device=slot_fp.device)
    for slot in reversed(range(phy2log_row.numel())):
        fp[int(phy2log_row[slot])] = slot_fp[slot]
    return fp


def check_canary(weights, new_row, expected_expert_fp, group=None, num_ranks=1) -> None:
    """After a move: every slot must hold exactly its planned expert's weights."""
    got = slot_fingerprints(weights, group, num_ranks)
    want = expected_expert_fp[new_row.to(expected_expert_fp.device)]
    bad = (got != want).nonzero().flatten().tolist()
    if bad:  # fatal: the ranks' weights and maps no longer agree
        raise RankFailure(f"EPLB canary failed: slots {bad[:16]} do not hold their planned experts")


# ---------------------------------------------------------------- rank 0 side: the engine's model

class LockstepModel:
    """Rank 0's stand-in for the model: every forward and cache reset is first broadcast, so the
    other ranks run the same step. Everything else is the model's own (attribute passthrough)."""

    def __init__(self, model, channel: StepChannel, group=None):
        self._model, self._channel, self._group = model, channel, group
        # per-rank MoE seconds stay on the device (no host sync per step); read on request
        world, device = dist.get_world_size(group), model.phy2log.device
        self._moe_last = torch.zeros(world, dtype=torch.float64, device=device)  # [G] last step
        self._moe_total = torch.zeros_like(self._moe_last)                       # [G] since start

    @property
    def rank_moe_seconds(self) -> torch.Tensor:
        """[G] seconds each rank spent in its own experts during the last step (host copy)."""
        return self._moe_last.cpu()

    @property
    def rank_moe_seconds_total(self) -> torch.Tensor:
        """[G] the same since the server started (host copy)."""
        return self._moe_total.cpu()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def parameters(self):
        return self._model.parameters()

    def new_cache(self, num_slots: int, max_seq_len: int):
        self._channel.send(STEP_NEW_CACHE, [torch.tensor([num_slots, max_seq_len])])
        return LockstepCache(self._model.new_cache(num_slots, max_seq_len), self._channel)

    def forward(self, input_ids, start_pos, cache, slot_ids, load=None, last_only=False):
        B, S = input_ids.shape
        self._channel.send(STEP_FORWARD, [input_ids, start_pos, slot_ids, torch.tensor([B, S, int(last_only)])])
        with fatal_after_broadcast():
            logits = self._model.forward(input_ids, start_pos, cache.inner, slot_ids, load=load, last_only=last_only)
            self.after_step()
        return logits

    def after_step(self) -> None:
        """Every step ends with the all-gather of per-rank MoE seconds (queued on the device)."""
        self._moe_last = gather_moe_seconds(self._model, self._group)
        self._moe_total += self._moe_last

    def decode_graphs(self, cache: LockstepCache, max_batch_size: int) -> LockstepDecodeGraphs:
        """runner.ModelRunner's decode-step driver under expert parallelism (see LockstepDecodeGraphs)."""
        return LockstepDecodeGraphs(self, cache, max_batch_size)

    def idle(self) -> None:
        """Keep the other ranks in step (and prove they are alive) while there is no work."""
        self._channel.send(STEP_IDLE, [])
        gather_moe_seconds(self._model, self._group)

    def stop(self) -> None:
        self._channel.send(STEP_STOP, [])
        shutdown(self._group)


class LockstepCache:
    def __init__(self, inner, channel: StepChannel):
        self.inner, self._channel = inner, channel

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self, slot: int) -> None:
        self._channel.send(STEP_RESET_SLOT, [torch.tensor([slot])])
        with fatal_after_broadcast():
            self.inner.reset(slot)


class LockstepDecodeGraphs:
    """Rank 0's DecodeGraphs: every rank holds the same batch-bucket graphs (captured together, each
    with the MoE all-reduce inside: NCCL collectives are capturable) and replays the same one per
    step. `run` broadcasts the step's inputs (device tensors, stream-ordered: no host sync), then
    replays rank 0's own graph; the other ranks run their DecodeGraphs on the same inputs, so all
    pad to the same bucket. On CPU (gloo cannot be captured) it is DecodeGraphs' padded eager step.
    Expert moves rewrite weights and maps in place, so graphs stay valid across rebalances."""

    def __init__(self, lockstep: LockstepModel, cache: LockstepCache, max_batch_size: int):
        self.lockstep, self.channel = lockstep, lockstep._channel
        self.channel.send(STEP_DECODE_GRAPHS, [torch.tensor([max_batch_size])])
        with fatal_after_broadcast():
            self.inner = DecodeGraphs(lockstep._model, cache.inner, max_batch_size)

    def __getattr__(self, name):  # buckets, new_load_buffer, ...
        if name == "inner":  # not built (a failed start): no endless lookup
            raise AttributeError(name)
        return getattr(self.inner, name)

    def capture_all(self) -> None:
        with fatal_after_broadcast():  # the other ranks capture the same buckets in the same order
            self.inner.capture_all()

    def run(self, input_ids, start_pos, slot_ids, load=None):
        self.channel.send(STEP_DECODE, [input_ids.view(-1), start_pos.view(-1), slot_ids.view(-1)])
        with fatal_after_broadcast():
            logits = self.inner.run(input_ids, start_pos, slot_ids, load)
            self.lockstep.after_step()
        return logits


class LockstepMover:
    """Rank 0's mover: announces the layer move, then takes part in it like every other rank."""

    def __init__(self, model, channel: StepChannel, mover: DistributedMover, canary: bool):
        self.model, self.channel, self.mover, self.canary = model, channel, mover, canary

    def move_layer(self, weights, old_row, new_row, layer: int) -> int:
        self.channel.send(STEP_MOVE_LAYER, [torch.tensor([layer]), new_row])
        with fatal_after_broadcast():
            return move_layer_checked(self.mover, self.model, weights, old_row, new_row, self.canary)


@contextlib.contextmanager
def fatal_after_broadcast():
    """Once rank 0 has announced a step, the other ranks are inside it: any error on rank 0 from
    here on leaves them waiting in a collective, so it must end the server, not just the request."""
    try:
        yield
    except RankFailure:
        raise
    except Exception as error:
        raise RankFailure(f"rank 0 failed inside a lock-step operation: {error!r}") from error


def move_layer_checked(mover: DistributedMover, model, weights, old_row, new_row, canary: bool) -> int:
    """The same on every rank: move one layer's slots; with `canary`, prove every slot now holds
    its planned expert (fingerprints gathered from all ranks before and after). Returns the bytes
    written into slots on all ranks together."""
    expected = None
    if canary:
        before = slot_fingerprints(weights, mover.group, mover.num_ranks)
        expected = expert_fingerprints(before, old_row, model.config.n_routed_experts)
    written = torch.tensor([mover.move_layer(weights, old_row, new_row)], dtype=torch.int64,
                           device=weights[0].device)
    if canary:
        check_canary(weights, new_row, expected, mover.group, mover.num_ranks)
    collective(dist.all_reduce, written, group=mover.group)
    return int(written)


def shutdown(group) -> None:
    """Leave together: a barrier first, so no rank tears down its connections while a peer still
    talks to it (gloo aborts the process then), and then the process group itself. NCCL's teardown
    waits on peers that may have exited already (a rank hung in destroy_process_group until torchrun
    killed it, on two H200s), so there the process group ends with the process."""
    collective(dist.barrier, group=group)
    if "nccl" not in str(dist.get_backend()):
        dist.destroy_process_group()


def gather_moe_seconds(model, group) -> torch.Tensor:
    """[G] seconds each rank spent in its own expert slots during the last step, on the model's
    device (NCCL only moves CUDA tensors; on CUDA nothing here waits for the GPU). Also a liveness
    check: it needs every rank, so a dead or hung rank turns into an error (gloo: here; NCCL: its
    watchdog, after --ep-timeout, ends the process)."""
    device = model.phy2log.device
    timer = model.moe_timer
    mine = timer.take_seconds().to(device) if timer is not None else torch.zeros(1, dtype=torch.float64, device=device)
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size(group))]
    collective(dist.all_gather, out, mine, group=group)
    return torch.cat(out)


# ---------------------------------------------------------------- ranks 1..G-1

def run_worker(model, channel: StepChannel, mover: DistributedMover, canary: bool) -> None:
    """Follow rank 0 step by step until it says stop. Logits are computed and dropped: rank 0 samples."""

    location = ExpertLocation.of_model(model, mover.num_ranks)
    cache = decoder = None
    while True:
        kind, parts = channel.recv()
        if kind == STEP_STOP:
            shutdown(mover.group)
            return
        if kind == STEP_NEW_CACHE:
            num_slots, max_seq_len = parts[0].tolist()
            cache = model.new_cache(num_slots, max_seq_len)
        elif kind == STEP_RESET_SLOT:
            cache.reset(int(parts[0]))
        elif kind == STEP_DECODE_GRAPHS:
            decoder = DecodeGraphs(model, cache, int(parts[0]))
            decoder.capture_all()
        elif kind == STEP_DECODE:
            input_ids, start_pos, slot_ids = parts
            decoder.run(input_ids, start_pos, slot_ids, load=None)
            gather_moe_seconds(model, mover.group)
        elif kind == STEP_FORWARD:
            B, S, last_only = parts[3].tolist()
            device = model.phy2log.device
            input_ids = parts[0].view(B, S).to(device)
            model.forward(input_ids, parts[1].to(device), cache, parts[2].to(device), load=None,
                          last_only=bool(last_only))
            gather_moe_seconds(model, mover.group)
        elif kind == STEP_IDLE:
            gather_moe_seconds(model, mover.group)
        elif kind == STEP_MOVE_LAYER:
            layer, new_row = int(parts[0]), parts[1].cpu()
            old_row = location.phy2log[layer].cpu().clone()
            move_layer_checked(mover, model, model.expert_weights(layer), old_row, new_row, canary)
            location.set_layer_(layer, new_row)
        else:
            raise RuntimeError(f"unknown step kind {kind} from rank 0")
