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


class QueueFull(Exception):
    """The waiting queue is at --max-queue, or the engine is draining."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # 0 = greedy
    top_p: float = 1.0           # 1 = off
    top_k: int = 0               # 0 = off
    seed: int | None = None      # None: drawn from the engine's seeded stream
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


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
    generator: torch.Generator | None = None
    callback_failed: bool = False

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of fp32 logits [V]: greedy at temperature 0 (and below 1e-5, where
    logits / T would overflow), else top-k → top-p → multinomial with the request's own generator
    (so a seeded request replays exactly)."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits.float().cpu() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[mass_before >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


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
        # Ids >= num_token_ids are embedding rows the tokenizer never produces (the model's vocab is
        # padded past it): they are never sampled, so every generated token has text.
        self.num_token_ids = num_token_ids
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
        # Decode through dsv4_mini.DecodeGraphs: CUDA graphs on GPU; on CPU a padded eager step whose
        # rounding does not depend on the batch. Not under torchrun: every rank must see each forward.
        self.decoder = None
        if decode_graphs:
            from dsv4_mini import DecodeGraphs
            self.decoder = DecodeGraphs(model, self.cache, max_batch_size)
            self.decoder.capture_all()
        self.device = next(model.parameters()).device
        # Run-ahead (see _launch_ahead): on by default where it pays, i.e. CUDA graphs, whose launch
        # returns at once. Never with EPLB (a step launched twice would count its load twice) or peers.
        if run_ahead is None:
            run_ahead = self.device.type == "cuda"
        self.run_ahead = bool(run_ahead) and self.decoder is not None and eplb is None and peers is None
        self._ahead: tuple | None = None  # (rows, positions, logits) of the step launched ahead
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
        self._run_calls()
        self._drop_aborted()
        self._admit()
        if self.running:
            load = self.eplb.load if self.eplb is not None else None   # [L, P] counts of this step
            try:
                self._decode(load)
                self._prefill_one_chunk(load)
                if self.eplb is not None:
                    self.eplb.after_step()   # fold the counts; maybe move expert weights
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

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = list(self._calls), collections.deque()
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
            seq.generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
            self.running.append(seq)

    def _decode(self, load) -> None:
        """One batched one-token step. A request still prefilling joins it with its next prompt token
        once at most `prefill_tail` prompt tokens are left: under CUDA graphs a graphed row costs far
        less than an eager prefill forward (kernel launches, not math, dominate small steps)."""
        batch = [s for s in self.running if not s.prefilling or
                 len(s.prompt_ids) - s.num_prefilled <= self.prefill_tail]
        ahead, self._ahead = self._ahead, None
        if not batch:
            return
        # [B] the token each row feeds and its position: next prompt token, or the last output token
        positions = [s.num_prefilled if s.prefilling else s.num_tokens - 1 for s in batch]
        if ahead is not None and ahead[0] == batch and ahead[1] == positions:
            logits = ahead[2]  # launched during the last step, with these very rows and positions
        else:  # (a step launched ahead for other rows is dropped: redoing a position rewrites the same cache)
            tokens = [s.prompt_ids[s.num_prefilled] if s.prefilling else s.output_ids[-1] for s in batch]
            logits = self._forward(self._device_tensor(tokens), positions, batch, load)
        self._deliver()  # the previous step's tokens, while the GPU runs this one
        wants = []  # rows whose logits give a new token: decoders, and prompts that fed their last token
        for i, seq in enumerate(batch):
            if seq.prefilling:
                seq.num_prefilled += 1
                if seq.prefilling:
                    continue  # a prompt token: its logits predict nothing we need
            wants.append(i)
        if not wants:
            return
        want_seqs = [batch[i] for i in wants]
        if self.run_ahead and all(s.params.temperature < GREEDY_BELOW for s in want_seqs):
            greedy = self._greedy(logits)  # [B] on the device
            host, ready = self._copy_to_host(greedy)  # queued before the next step...
            self._launch_ahead(batch, positions, greedy)
            ready()  # ...so this waits for this step only, with the next one already queued behind it
            host = host.tolist()
            tokens = [host[i] for i in wants]
        else:
            tokens = self._sample_rows(want_seqs, logits[wants])
        for seq, token in zip(want_seqs, tokens):
            self._accept(seq, token)

    def _forward(self, input_ids: torch.Tensor, positions: list[int], batch: list[Sequence], load):
        """Launch one one-token step for these rows: -> logits [B, V] (on CUDA, not yet computed)."""
        start_pos = self._device_tensor(positions)
        slot_ids = self._device_tensor([s.slot for s in batch])
        if self.decoder is not None:
            return self.decoder.run(input_ids, start_pos, slot_ids, load)
        return self.model.forward(input_ids.view(-1, 1), start_pos, self.cache, slot_ids, load=load, last_only=True)

    def _device_tensor(self, values: list[int]) -> torch.Tensor:
        """Host ints -> device tensor without waiting for the GPU work already queued: a plain
        torch.tensor(values, device="cuda") synchronises the stream, which would undo the run-ahead."""
        if self.device.type != "cuda":
            return torch.tensor(values, device=self.device)
        return torch.tensor(values, pin_memory=True).to(self.device, non_blocking=True)

    def _copy_to_host(self, t: torch.Tensor):
        """Queue a device->host copy: -> (host tensor, wait()); wait() releases the GIL while it waits."""
        if self.device.type != "cuda":
            return t.cpu(), lambda: None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done.synchronize

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_token_ids is not None:
            logits = logits[:, :self.num_token_ids]
        return logits.argmax(-1)

    def _launch_ahead(self, batch: list[Sequence], positions: list[int], greedy: torch.Tensor) -> None:
        """Queue the next step before this one's tokens reach the host, so the GPU never waits for
        the host between steps. Every row here is greedy, so its next input is known on the device
        (this step's argmax) or on the host (its next prompt token). Rows that will finish now by
        length are left out; if the batch still differs at the next step (an EOS, a new or aborted
        request) that step is recomputed, which rewrites the same cache entries with the same values."""
        rows = [i for i, s in enumerate(batch) if s.prefilling or
                (len(s.output_ids) + 1 < s.params.max_tokens and s.num_tokens + 1 < self.max_seq_len)]
        if not rows:
            return
        seqs = [batch[i] for i in rows]
        prompt_token = self._device_tensor([s.prompt_ids[s.num_prefilled] if s.prefilling else -1 for s in seqs])
        if len(rows) < len(batch):
            greedy = greedy.index_select(0, self._device_tensor(rows))
        next_ids = torch.where(prompt_token >= 0, prompt_token, greedy)
        next_positions = [positions[i] + 1 for i in rows]
        self._ahead = (seqs, next_positions, self._forward(next_ids, next_positions, seqs, None))

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | BaseException]:
        """One token per row of device logits [B, V]: greedy rows by one argmax on the device (one small
        device->host copy for the whole batch), sampled rows on the host with their own generator.
        A row whose sampling fails gets its exception instead of a token (that request ends alone)."""
        if not seqs:
            return []
        greedy = [s.params.temperature < GREEDY_BELOW for s in seqs]
        # .cpu() waits for the GPU with the GIL released (the event loop streams meanwhile); then tolist
        out: list[int | BaseException] = self._greedy(logits).cpu().tolist() if any(greedy) else [0] * len(seqs)
        if self.num_token_ids is not None:
            logits = logits[:, :self.num_token_ids]
        sampled = [i for i, g in enumerate(greedy) if not g]
        if sampled:
            host_logits = logits[sampled].float().cpu()
            for i, row in zip(sampled, host_logits):
                try:
                    out[i] = sample_next(row, seqs[i].params, seqs[i].generator)
                except Exception as error:  # noqa: BLE001 - ends this request only
                    out[i] = error
        return out

    def _prefill_one_chunk(self, load) -> None:
        """One eager forward over the next chunk of the oldest long prompt (down to `prefill_tail`
        tokens left, which then go through the batched one-token steps)."""
        seq = next((s for s in self.running if len(s.prompt_ids) - s.num_prefilled > self.prefill_tail), None)
        if seq is None:
            return
        end = min(seq.num_prefilled + self.prefill_chunk, len(seq.prompt_ids) - self.prefill_tail)
        chunk = seq.prompt_ids[seq.num_prefilled:end]
        input_ids = torch.tensor([chunk], device=self.device)
        start_pos = torch.tensor([seq.num_prefilled], device=self.device)
        slot_ids = torch.tensor([seq.slot], device=self.device)
        logits = self.model.forward(input_ids, start_pos, self.cache, slot_ids, load=load, last_only=True)
        self._deliver()
        seq.num_prefilled += len(chunk)
        if not seq.prefilling:
            self._accept(seq, self._sample_rows([seq], logits)[0])

    def _accept(self, seq: Sequence, token: int | BaseException) -> None:
        """Record one sampled token and queue it for delivery; the request's finish is decided here
        (so its slot is free for the next step), its callbacks run in `_deliver`."""
        if isinstance(token, BaseException):  # its sampling failed: end this request only
            self.last_error = token
            self._finish(seq, "abort", notify=False)
            self._outbox.append((seq, None, "abort"))
            return
        seq.output_ids.append(token)
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
        self._ahead = None
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
