"""Model runner: runs the model for the engine. Token ids and positions in, logits and tokens out.

* `DecodeGraphs`: the one-token decode step, padded to a batch bucket; replayed from CUDA graphs on
  a GPU, run eagerly (padded the same way) on a CPU.
* `ModelRunner`: launches the decode step and prefill chunks, moves inputs to the device without
  waiting for queued GPU work, samples the next tokens on the device (`sampler.Sampler`), and queues
  the next decode step before this step's tokens reach the host (run-ahead).

The engine (engine.py) decides which requests run; this file decides how.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4_mini import DSV4Model, KVCache
from sampler import Sampler, StepSample, TokenLogprobs

# ---------------------------------------------------------------------------------------------------
# CUDA-graph decode
# ---------------------------------------------------------------------------------------------------

def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size: the batch sizes DecodeGraphs captures."""
    sizes = [1 << i for i in range(max(1, max_batch_size).bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Decode steps (one new token per row) replayed from CUDA graphs, one graph per batch bucket.

    Why: a decode step is thousands of small kernels; launched one by one from Python, the GPU
    waits on the host most of the time. A CUDA graph replays the whole step with one launch. Captured
    work must have fixed shapes, fixed addresses and no host syncs, hence:
    * the batch is padded up to a bucket size (batch_buckets); padded rows decode token 0 at
      position 0 in cache.scratch_slot, never a request's slot, and count nothing in `load`;
    * inputs are copied into static buffers the graph reads; logits come out in a static buffer;
    * compressed layers attend over entries [0, max_seq_len // m) with per-row masks (no
      data-dependent sizes), and the compressors use their one-token path (Compressor._decode_step);
    * the routing kernels count load into a graph-owned [L,P] buffer (padded rows excluded by the
      kernels' row count), which is added into the caller's `load` after replay.
    EPLB rewrites the expert maps and expert weights in place (never reallocating them), so graphs
    captured earlier stay valid across rebalances.

    run(input_ids [B], start_pos [B], slot_ids [B], load [L,P] | None) -> logits [B,V] fp32, a view
    of the bucket's output buffer (valid until the next run). Graphs are captured lazily, on the
    first run of each bucket.

    Not on CUDA, the same padded step runs eagerly, with at least CPU_MIN_ROWS rows: CPU BLAS
    rounds a 1-row and a 2-3-row product differently from a product of 4 or more rows, so with
    fewer rows a request's greedy tokens could depend on how many others share its decode step.
    """

    CPU_MIN_ROWS = 4

    def __init__(self, model: DSV4Model, cache: KVCache, max_batch_size: int | None = None):
        self.model, self.cache = model, cache
        self.max_batch_size = max_batch_size or cache.num_slots
        self.buckets = batch_buckets(self.max_batch_size)
        self.device = model.embed.weight.device
        self.use_graphs = self.device.type == "cuda"
        if self.use_graphs and (model.ep_group is not None or model.moe_timer is not None):
            raise ValueError("DecodeGraphs cannot capture collectives or timing events: not under expert parallelism")
        if self.use_graphs and os.environ.get("DSV4_KERNELS") == "torch":
            raise ValueError("DecodeGraphs needs the Triton kernels on CUDA (the torch twins sync the host)")
        self.graphs: dict[int, dict] = {}  # bucket -> {"graph", "inputs", "logits", "load"}

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture every bucket now (server start), so no request waits for a capture. CUDA only."""
        for size in self.buckets:
            if self.use_graphs and size not in self.graphs:
                self._capture(size)

    def bucket(self, batch_size: int) -> int:
        for size in self.buckets:
            if size >= batch_size:
                return size
        raise ValueError(f"batch of {batch_size} rows exceeds max_batch_size {self.max_batch_size}")

    @torch.no_grad()
    def run(self, input_ids: Tensor, start_pos: Tensor, slot_ids: Tensor, load: Tensor | None = None) -> Tensor:
        B = input_ids.shape[0]
        size = self.bucket(B)
        if self.use_graphs:
            g = self.graphs.get(size) or self._capture(size)
        else:
            size = max(size, self.CPU_MIN_ROWS)
            g = dict(inputs=self._padding(size), padding=self._padding(size), load=self.new_load_buffer())
        inputs = g["inputs"]  # [3, size] int64: token, position, slot per row
        inputs[:, B:].copy_(g["padding"][:, B:])
        inputs[0, :B].copy_(input_ids.view(B), non_blocking=True)
        inputs[1, :B].copy_(start_pos.view(B), non_blocking=True)
        inputs[2, :B].copy_(slot_ids.view(B), non_blocking=True)
        if self.use_graphs:
            g["graph"].replay()
        else:
            g["logits"] = self._step(inputs, g["load"])
        if load is not None:
            load.add_(g["load"])
        return g["logits"][:B]

    def _step(self, inputs: Tensor, load: Tensor) -> Tensor:
        """The captured work: a whole decode step on static buffers."""
        model, cache = self.model, self.cache
        input_ids, start, slot_ids = inputs[0].view(-1, 1), inputs[1], inputs[2]
        # padding is the tail of the bucket: the routing kernels count only the first rows, read
        # from the device at replay (the count is data here, not a Python int baked into the graph)
        num_valid = (slot_ids != cache.scratch_slot).sum().to(torch.int32).view(1)  # [1]
        load.zero_()
        return model.step(input_ids, start, slot_ids, cache, load, last_only=True,
                          seq_bound=cache.max_seq_len, num_valid_tokens=num_valid)

    def _padding(self, size: int) -> Tensor:
        """[3, size]: every row decodes token 0 at position 0 in the scratch slot."""
        return torch.tensor([0, 0, self.cache.scratch_slot], device=self.device).view(3, 1).repeat(1, size)

    def new_load_buffer(self) -> Tensor:
        model = self.model
        return torch.zeros(model.config.num_hidden_layers, model.num_physical_experts, dtype=torch.int32,
                           device=self.device)

    @torch.no_grad()
    def _capture(self, size: int) -> dict:
        dev = self.device
        padding = self._padding(size)
        inputs = padding.clone()  # all rows padding while warming up and capturing: only scratch is touched
        load = self.new_load_buffer()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm up off the capture: Triton/compile autotuning, allocator
            for _ in range(2):
                self._step(inputs, load)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(inputs, load)
        self.graphs[size] = g = dict(graph=graph, inputs=inputs, padding=padding, logits=logits, load=load)
        return g


# ---------------------------------------------------------------------------------------------------
# Model runner
# ---------------------------------------------------------------------------------------------------


@dataclass
class AheadStep:
    """A decode step queued before the previous step's tokens reached the host (see _launch_ahead)."""
    seqs: list  # the engine.Sequence rows it runs, in order
    positions: list[int]  # [B]
    logits: Tensor  # [B, V] on the device, computed once the GPU gets there
    load: Tensor | None  # [L, P] its own expert load counts (None: not counting)


# One sampled token per row: (token id, its logprobs if the request asked for them)
Sampled = tuple[int, TokenLogprobs | None]


class ModelRunner:
    """Runs the model for the engine, on the engine thread. `seqs` are engine.Sequence objects.

    decode_graphs: the decode step goes through DecodeGraphs (CUDA graphs on a GPU; on a CPU the same
    padded step, so a request's rounding never depends on its neighbours). Without it (torchrun: every
    rank must see each forward) the decode step is a plain eager forward.
    run_ahead: with decode graphs, queue the next decode step before this step's tokens reach the host
    (its inputs are this step's tokens, sampled on the device).

    Expert load: each forward counts into the `load` [L, P] it is given. A step launched ahead counts
    into its own buffer, which is added to the caller's `load` only when that step is used, so every
    step that is kept is counted exactly once and a discarded one not at all.
    """

    def __init__(self, model, cache: KVCache, *, max_batch_size: int, max_seq_len: int,
                 num_token_ids: int | None, decode_graphs: bool, run_ahead: bool):
        self.model, self.cache, self.max_seq_len = model, cache, max_seq_len
        # Ids >= num_token_ids are embedding rows the tokenizer never produces (the model's vocab is
        # padded past it): they are never sampled, so every generated token has text.
        self.num_token_ids = num_token_ids
        self.device = next(model.parameters()).device
        self.sampler = Sampler(cache.num_slots, num_token_ids, self.device)
        self.decoder = None
        if decode_graphs:
            self.decoder = DecodeGraphs(model, cache, max_batch_size)
            self.decoder.capture_all()
        self.sampler.warm_up(model.config.vocab_size)
        self.run_ahead = run_ahead and self.decoder is not None
        self.ahead: AheadStep | None = None
        self._ahead_load: Tensor | None = None  # [L, P] the ahead step's counts (one step ahead at most)
        self._counting = False  # the last decode step counted load: so does the step launched after it

    def admit(self, seq) -> None:
        """A request got cache slot seq.slot (its cache state is reset by the engine)."""
        self.sampler.admit(seq.slot, seq.params, seq.seed, self.model.config.vocab_size)

    # ------------------------------------------------------------ forward steps

    def decode(self, seqs: list, positions: list[int], load: Tensor | None) -> Tensor:
        """Launch one one-token step over these rows -> logits [B, V] (on CUDA, not yet computed).
        Each row feeds its next prompt token (a short prompt tail) or its last output token. A step
        already queued ahead for these very rows and positions is used instead of a new one."""
        ahead, self.ahead = self.ahead, None
        self._counting = load is not None
        if ahead is not None and ahead.seqs == seqs and ahead.positions == positions and (load is None) == (ahead.load is None):
            if load is not None:
                load.add_(ahead.load)
            return ahead.logits
        # (a step queued for other rows is dropped with its counts: redoing a position rewrites the
        # same cache entries)
        tokens = [s.prompt_ids[s.num_prefilled] if s.prefilling else s.output_ids[-1] for s in seqs]
        return self._decode_step(self.device_tensor(tokens), positions, seqs, load)

    def prefill(self, seq, chunk: list[int], load: Tensor | None, all_logits: bool = False) -> Tensor:
        """One eager forward over a chunk of seq's prompt -> logits of its last token [1, V], or of
        every chunk position [len(chunk), V] with `all_logits` (prompt logprobs)."""
        input_ids = torch.tensor([chunk], device=self.device)
        start_pos = torch.tensor([seq.num_prefilled], device=self.device)
        slot_ids = torch.tensor([seq.slot], device=self.device)
        logits = self.model.forward(input_ids, start_pos, self.cache, slot_ids, load=load, last_only=not all_logits)
        return logits if not all_logits else logits[0]

    def drop_ahead(self) -> None:
        self.ahead = None

    def _decode_step(self, input_ids: Tensor, positions: list[int], seqs: list, load: Tensor | None) -> Tensor:
        start_pos = self.device_tensor(positions)
        slot_ids = self.device_tensor([s.slot for s in seqs])
        if self.decoder is not None:
            return self.decoder.run(input_ids, start_pos, slot_ids, load)
        return self.model.forward(input_ids.view(-1, 1), start_pos, self.cache, slot_ids, load=load, last_only=True)

    # ------------------------------------------------------------ next tokens

    def next_tokens(self, seqs: list, positions: list[int], logits: Tensor, wants: list[int],
                    run_ahead: bool = True) -> list[Sampled]:
        """The next token of each row in `wants` (rows whose logits predict a token), sampled on the
        device. With run-ahead on (and `run_ahead`: the caller may forbid it for this step), the next
        step is queued before these tokens reach the host."""
        counted = [False] * len(seqs)
        for i in wants:
            counted[i] = True
        out = self.sampler.sample(logits, seqs, counted)
        host, ready = self._to_host(out)  # queued before the next step...
        if self.run_ahead and run_ahead:
            self._launch_ahead(seqs, positions, out.tokens)
        ready()  # ...so this waits for this step only, with the next one already queued behind it
        return self._rows(seqs, out, host, wants)

    def sample_rows(self, seqs: list, logits: Tensor) -> list[Sampled]:
        """One token per row of device logits [B, V] (a prompt's last chunk): sampled, then read back."""
        out = self.sampler.sample(logits, seqs, [True] * len(seqs))
        host, ready = self._to_host(out)
        ready()
        return self._rows(seqs, out, host, range(len(seqs)))

    def prompt_logprobs(self, seq, start: int, logits: Tensor) -> list[TokenLogprobs]:
        """Logprobs of prompt tokens start+1 .. start+len(logits) (those that exist) from the chunk's
        logits [n, V] (position j predicts token j + 1)."""
        targets = seq.prompt_ids[start + 1:start + 1 + logits.shape[0]]
        return self.sampler.prompt_logprobs(logits, targets, seq.params.prompt_logprobs) if targets else []

    def _launch_ahead(self, seqs: list, positions: list[int], sampled: Tensor) -> None:
        """Run-ahead: queue the next step before this one's tokens reach the host, so the GPU never
        waits for the host between steps. Each row's next input is known on the device (this step's
        sampled token) or on the host (its next prompt token). Rows that will finish now by length are
        left out; if the batch still differs at the next step (an EOS, a new or aborted request) that
        step is recomputed, which rewrites the same cache entries with the same values."""
        rows = [i for i, s in enumerate(seqs) if s.prefilling or
                (len(s.output_ids) + 1 < s.params.max_tokens and s.num_tokens + 1 < self.max_seq_len)]
        if not rows:
            return
        kept = [seqs[i] for i in rows]
        prompt_token = self.device_tensor([s.prompt_ids[s.num_prefilled] if s.prefilling else -1 for s in kept])
        if len(rows) < len(seqs):
            sampled = sampled.index_select(0, self.device_tensor(rows))
        next_ids = torch.where(prompt_token >= 0, prompt_token, sampled)
        next_positions = [positions[i] + 1 for i in rows]
        load = None
        if self._counting:
            if self._ahead_load is None:
                self._ahead_load = self.decoder.new_load_buffer()
            load = self._ahead_load.zero_()  # queued after the previous ahead step's counts were added
        self.ahead = AheadStep(kept, next_positions, self._decode_step(next_ids, next_positions, kept, load), load)

    # ------------------------------------------------------------ host <-> device

    def device_tensor(self, values: list[int]) -> Tensor:
        """Host ints -> device tensor without waiting for the GPU work already queued: a plain
        torch.tensor(values, device="cuda") synchronises the stream, which would undo the run-ahead."""
        if self.device.type != "cuda":
            return torch.tensor(values, device=self.device)
        return torch.tensor(values, pin_memory=True).to(self.device, non_blocking=True)

    def _to_host(self, out: StepSample):
        """Queue the device->host copies of a step's draws: -> (host tensors, wait()); wait() releases
        the GIL while it waits."""
        tensors = [out.tokens, *(out.logprobs or ())]
        if self.device.type != "cuda":
            return [t.cpu() for t in tensors], lambda: None
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done.synchronize

    @staticmethod
    def _rows(seqs: list, out: StepSample, host: list[Tensor], rows) -> list[Sampled]:
        """Host copies of a step's draws -> (token, logprobs) of these rows."""
        tokens = host[0].tolist()
        if out.logprobs is None:
            return [(tokens[i], None) for i in rows]
        chosen, top_ids, top_values = (t.tolist() for t in host[1:])
        result = []
        for i in rows:
            k = seqs[i].params.logprobs
            logprobs = None if k is None else TokenLogprobs(chosen[i], list(zip(top_ids[i][:k], top_values[i][:k])))
            result.append((tokens[i], logprobs))
        return result
