"""Engine: token ids in, token ids out. Owns the model, the KV cache slots and the sampler.

The model is only ever called from the engine thread. One `Engine.step()`:

1. drop aborted requests (their cache slots are free again at once),
2. admit waiting requests into free cache slots,
3. one batched decode forward: every request past its prompt feeds its last token,
4. one prefill chunk (at most `prefill_chunk` prompt tokens of the oldest request still
   prefilling), so a long prompt never stalls the decoders for more than one chunk,
5. EPLB bookkeeping on the step's `[L, P]` load counts (and, when due, a rebalance).

Work that must not overlap a forward (EPLB state, rebalance, record control) is handed in with
`Engine.call(fn)` and runs between steps. The engine knows nothing about text: stop strings are
matched by the server, which aborts the request when one hits.

Sampling (sampler.py) happens on the device for the whole batch; a request that asks for logprobs finds
them in `seq.logprobs` (one entry per output token, appended before that token's callback) and
`seq.prompt_logprobs` (one per prompt token, the first None; filled while the prompt is prefilled).

Tokens reach their callbacks one step late, on purpose: step n's tokens are sampled at the end of
step n (its requests' state, finish reasons and freed slots are final then), but handed to the
callbacks in step n+1 right after its forward is launched, so on a GPU the host work of delivering
them (text, streaming) runs while the GPU computes the next step instead of between steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from runner import ModelRunner
from sampler import SEED_MASK, SamplingParams, TokenLogprobs

__all__ = ["Engine", "EngineStats", "QueueFull", "SamplingParams", "Sequence", "TokenLogprobs"]


class QueueFull(Exception):
    """The waiting queue is at --max-queue, or the engine is draining."""


# Callback signature: (token_id or None, finish_reason or None). Called on the engine thread.
TokenCallback = Callable[[int | None, str | None], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""
    prompt_ids: list[int]
    params: SamplingParams
    on_token: TokenCallback
    id: int = -1
    slot: int = -1
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int = 0  # the request's seed, or one from the engine's seeded stream (set at admission)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # per prompt token (params.prompt_logprobs)
    callback_failed: bool = False

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class EngineStats:
    """Published after every step; read by /metrics from another thread (one reference swap)."""
    running: int = 0
    waiting: int = 0
    slots_in_use: int = 0
    num_slots: int = 0


class Engine:
    def __init__(self, model, *, max_batch_size: int, max_seq_len: int, max_queue: int,
                 eos_token_ids: tuple[int, ...] = (), prefill_chunk: int = 256, seed: int = 0,
                 eplb=None, peers=None, decode_graphs: bool = False, num_token_ids: int | None = None,
                 prefill_tail: int = 0, run_ahead: bool | None = None):
        self.model = model
        # ep.LockstepModel under torchrun: the other ranks follow every step, so idle ticks are
        # sent to them too (ranks never fall out of step) and they are told to stop at the end.
        self.peers = peers
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.prefill_tail = prefill_tail  # last prompt tokens fed through the batched one-token step
        self.eplb = eplb                      # eplb.EPLBManager or None
        self.cache = model.new_cache(max_batch_size, max_seq_len)
        self.device = next(model.parameters()).device
        # Run-ahead (see runner.ModelRunner): on by default where it pays, i.e. CUDA graphs, whose launch
        # returns at once. With peers too: the other ranks follow the steps in the order they are sent
        # (a step launched ahead and then dropped is redone on every rank alike). Under EPLB a step
        # launched ahead counts its load apart and only once kept, and no step is launched ahead over
        # an expert move (_may_move_experts).
        if run_ahead is None:
            run_ahead = self.device.type == "cuda"
        self.runner = ModelRunner(model, self.cache, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                  num_token_ids=num_token_ids, decode_graphs=decode_graphs,
                                  run_ahead=bool(run_ahead))
        self.free_slots = list(range(max_batch_size - 1, -1, -1))   # pop() hands out slot 0 first
        self.running: list[Sequence] = []                            # engine thread only
        # Cross-thread inbox: guarded by one lock, drained at the start of each step.
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._aborted: set[int] = set()
        self._calls: collections.deque = collections.deque()
        self._outbox: list[tuple[Sequence, int | None, str | None]] = []   # engine thread: see module doc
        self._ids = itertools.count()
        self._seed_stream = torch.Generator().manual_seed(seed)    # seeds for unseeded requests
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats(num_slots=max_batch_size)
        self.last_error: BaseException | None = None

    @property
    def run_ahead(self) -> bool:
        return self.runner.run_ahead

    # ---------------------------------------------------------------- called from other threads

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request. Raises QueueFull when the queue is full, the engine is draining or dead."""
        if not seq.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if self.crashed:
            raise QueueFull
        with self._lock:
            if self._draining or len(self._waiting) >= self.max_queue:
                raise QueueFull
            seq.id = next(self._ids)
            self._waiting.append(seq)
        self._wakeup.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request (client gone, stop string hit). Its slot is freed at the next step."""
        with self._lock:
            self._aborted.add(seq.id)
        self._wakeup.set()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn on the engine thread between two steps; the future holds its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.crashed or self._stopped:
            future.set_exception(RuntimeError(f"the engine is not running ({self.last_error or 'stopped'})"))
            return future
        with self._lock:
            self._calls.append((fn, future))
        self._wakeup.set()
        return future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> None:
        """Stop admitting; let in-flight requests finish for up to timeout_s, then end the rest
        with finish_reason "abort" (clients still get a well-formed end of stream)."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop()

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.eplb is not None:
            self.eplb.close()  # its judging process, if any

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._calls or self._aborted) or bool(self.running or self._outbox)

    @property
    def crashed(self) -> bool:
        """The engine thread ended without being stopped (a fatal error, e.g. a lost EP rank)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stopped

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        try:
            while not self._stopped:
                if not self.has_work():
                    if self.eplb is not None and self.eplb.move_pending_layers():
                        continue  # a started rebalance finishes when traffic stops, one chunk per pass
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    if self.peers is not None:
                        self.peers.idle()
                    continue
                self.step()
        except Exception as error:  # only fatal errors get here (a lost rank): the engine is dead
            self.last_error = error
            self._end_all("abort")
            self._fail_calls()
            raise
        self._end_all("abort")
        self._fail_calls()
        if self.peers is not None:
            self.peers.stop()

    def _fail_calls(self) -> None:
        """Calls queued when the loop ends get an error, not an endless wait."""
        with self._lock:
            calls, self._calls = list(self._calls), collections.deque()
        for _, future in calls:
            future.set_exception(RuntimeError("the engine stopped before running this call"))

    def step(self) -> None:
        """schedule -> run -> deliver."""
        self._run_calls()
        decode_rows, prefill_seq = self._schedule()
        if decode_rows or prefill_seq is not None:
            try:
                self._run(decode_rows, prefill_seq)
            except Exception as error:  # noqa: BLE001 - a failed step ends its requests, never the engine
                self.last_error = error
                self._end_all("abort")
                if self.eplb is not None:
                    self.eplb.load.zero_()  # a half-counted step must not leak into the next one
                # ...unless a rank is lost, or other ranks may already be inside this step's collectives
                if getattr(error, "fatal", False) or self.peers is not None:
                    raise
        if not self.running:  # no next forward to overlap the last deliveries with
            self._deliver()
        self._publish_stats()

    # ---------------------------------------------------------------- schedule

    def _schedule(self) -> tuple[list[Sequence], Sequence | None]:
        """Free aborted slots, admit waiting requests, and pick this step's work: the rows of the batched
        one-token step (decoders, and prompts with at most `prefill_tail` tokens left: under CUDA graphs
        a graphed row costs far less than an eager prefill forward) and the oldest longer prompt, which
        gets one chunk of at most `prefill_chunk` tokens (a long prompt never stalls the decoders for
        more than one chunk)."""
        self._drop_aborted()
        self._admit()
        decode_rows = [s for s in self.running if not s.prefilling or
                       len(s.prompt_ids) - s.num_prefilled <= self._prompt_tail(s)]
        prefill_seq = next((s for s in self.running if len(s.prompt_ids) - s.num_prefilled > self._prompt_tail(s)), None)
        return decode_rows, prefill_seq

    def _prompt_tail(self, seq: Sequence) -> int:
        """Prompt tokens fed through the one-token step: none when the request wants prompt logprobs
        (every position's logits come from the prefill) or no tokens at all."""
        if seq.params.prompt_logprobs is not None or seq.params.max_tokens == 0:
            return 0
        return self.prefill_tail

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = list(self._calls), collections.deque()
        if calls and self.eplb is not None:
            self.runner.drop_ahead()  # a call may move experts: no step launched before it is kept
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as error:  # noqa: BLE001 - the caller sees the error, the engine goes on
                future.set_exception(error)
                if getattr(error, "fatal", False):  # ...unless it was a lost rank (e.g. mid-rebalance)
                    raise

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if aborted:
                self._waiting = collections.deque(s for s in self._waiting if s.id not in aborted)
        for seq in [s for s in self.running if s.id in aborted]:
            self._finish(seq, "abort", notify=False)

    def _admit(self) -> None:
        while self.free_slots:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.cache.reset(seq.slot)
            seed = seq.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_stream))
            seq.seed = seed & SEED_MASK
            if seq.params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]  # the first prompt token has no context to be predicted from
            self.runner.admit(seq)
            self.running.append(seq)

    # ---------------------------------------------------------------- run

    def _run(self, decode_rows: list[Sequence], prefill_seq: Sequence | None) -> None:
        load = self.eplb.load if self.eplb is not None else None  # [L, P] counts of this step
        if decode_rows:
            self._decode(decode_rows, load, run_ahead=not self._may_move_experts())
        else:
            self.runner.drop_ahead()
        if prefill_seq is not None:
            self._prefill_chunk(prefill_seq, load)
        if self.eplb is not None:
            self.eplb.after_step()  # fold the counts; maybe move expert weights

    def _may_move_experts(self) -> bool:
        """Whether this step's eplb.after_step() may move expert weights and maps (a move in progress
        goes on, or a rebalance check is due). A step launched ahead of it would have been counted
        with the old placement and folded with the new one, so none is launched then."""
        return self.eplb is not None and self.eplb.may_move_after_next_step()

    def _decode(self, rows: list[Sequence], load, run_ahead: bool) -> None:
        """One batched one-token step over `rows`."""
        positions = [s.num_prefilled if s.prefilling else s.num_tokens - 1 for s in rows]  # [B]
        logits = self.runner.decode(rows, positions, load)
        self._deliver()  # the previous step's tokens, while the GPU runs this one
        wants = []  # rows whose logits give a new token: decoders, and prompts that fed their last token
        for i, seq in enumerate(rows):
            if seq.prefilling:
                seq.num_prefilled += 1
                if seq.prefilling:
                    continue  # a prompt token: its logits predict nothing we need
            wants.append(i)
        if wants:
            sampled = self.runner.next_tokens(rows, positions, logits, wants, run_ahead)
            for i, (token, logprobs) in zip(wants, sampled):
                self._accept(rows[i], token, logprobs)

    def _prefill_chunk(self, seq: Sequence, load) -> None:
        """The next chunk of a long prompt (down to `prefill_tail` tokens left, which then go through
        the batched one-token steps)."""
        end = min(seq.num_prefilled + self.prefill_chunk, len(seq.prompt_ids) - self._prompt_tail(seq))
        chunk = seq.prompt_ids[seq.num_prefilled:end]
        want_prompt_logprobs = seq.params.prompt_logprobs is not None
        logits = self.runner.prefill(seq, chunk, load, all_logits=want_prompt_logprobs)  # [1 or len(chunk), V]
        self._deliver()
        if want_prompt_logprobs:
            seq.prompt_logprobs += self.runner.prompt_logprobs(seq, seq.num_prefilled, logits)
        seq.num_prefilled += len(chunk)
        if seq.prefilling:
            return
        if seq.params.max_tokens == 0:  # the prompt only (e.g. its logprobs): no token to draw
            self._finish(seq, "length", notify=False)
            self._outbox.append((seq, None, "length"))
            return
        token, logprobs = self.runner.sample_rows([seq], logits[-1:])[0]
        self._accept(seq, token, logprobs)

    # ---------------------------------------------------------------- deliver

    def _accept(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record one sampled token and queue it for delivery; the request's finish is decided here
        (so its slot is free for the next step), its callbacks run in `_deliver`."""
        seq.output_ids.append(token)
        if seq.params.logprobs is not None:
            seq.logprobs.append(logprobs)
        reason = None
        if (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, notify=False)
        self._outbox.append((seq, token, reason))

    def _deliver(self) -> None:
        """Run the queued callbacks in order. A callback that fails ends its own request only."""
        outbox, self._outbox = self._outbox, []
        for seq, token, reason in outbox:
            if seq.callback_failed:
                continue
            try:
                seq.on_token(token, reason)
            except Exception as error:  # noqa: BLE001
                self.last_error, seq.callback_failed = error, True
                if seq in self.running:
                    self._finish(seq, "abort", notify=False)
                    try:
                        seq.on_token(None, "abort")
                    except Exception:  # noqa: BLE001 - the callback itself is what failed
                        pass

    def _finish(self, seq: Sequence, reason: str, notify: bool = True) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        if notify:
            seq.on_token(None, reason)

    def _end_all(self, reason: str) -> None:
        self.runner.drop_ahead()
        self._deliver()  # tokens already sampled go out before the end of their streams
        for seq in list(self.running):
            self._finish(seq, reason)
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            seq.finish_reason = reason
            seq.on_token(None, reason)
        self._publish_stats()

    def _publish_stats(self) -> None:
        with self._lock:
            waiting = len(self._waiting)
        self.stats = EngineStats(running=len(self.running), waiting=waiting,
                                 slots_in_use=len(self.running), num_slots=self.cache.num_slots)
