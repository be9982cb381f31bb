"""Model runner: runs the model for the engine. Token ids and positions in, logits and tokens out.

* `DecodeGraphs`: the one-token decode step, padded to a batch bucket; replayed from CUDA graphs on
  a GPU, run eagerly (padded the same way) on a CPU.
* `ModelRunner`: launches the decode step and prefill chunks, moves inputs to the device without
  waiting for queued GPU work, samples the next tokens (`sample_next`), and queues the next decode
  step ahead of time when it can (`RunAhead`).

The engine (engine.py) decides which requests run; this file decides how.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4_mini import DSV4Model, KVCache

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (logits / T would overflow)


def sample_next(logits: Tensor, params, generator: torch.Generator | None) -> int:
    """One token from one row of fp32 logits [V]: greedy at temperature 0 (and below 1e-5, where
    logits / T would overflow), else top-k → top-p → multinomial with the request's own generator
    (so a seeded request replays exactly). `params`: engine.SamplingParams."""
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
            g = dict(inputs=self._padding(size), padding=self._padding(size), load=self._load_buffer())
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

    def _load_buffer(self) -> Tensor:
        model = self.model
        return torch.zeros(model.config.num_hidden_layers, model.num_physical_experts, dtype=torch.int32,
                           device=self.device)

    @torch.no_grad()
    def _capture(self, size: int) -> dict:
        dev = self.device
        padding = self._padding(size)
        inputs = padding.clone()  # all rows padding while warming up and capturing: only scratch is touched
        load = self._load_buffer()
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
    """A decode step queued before the previous step's tokens reached the host (see RunAhead)."""
    seqs: list  # the engine.Sequence rows it runs, in order
    positions: list[int]  # [B]
    logits: Tensor  # [B, V] on the device, computed once the GPU gets there


class ModelRunner:
    """Runs the model for the engine, on the engine thread. `seqs` are engine.Sequence objects.

    decode_graphs: the decode step goes through DecodeGraphs (CUDA graphs on a GPU; on a CPU the same
    padded step, so a request's rounding never depends on its neighbours). Without it (torchrun: every
    rank must see each forward) the decode step is a plain eager forward.
    run_ahead: on CUDA with graphs, queue the next greedy step before this step's tokens reach the host.
    """

    def __init__(self, model, cache: KVCache, *, max_batch_size: int, max_seq_len: int,
                 num_token_ids: int | None, decode_graphs: bool, run_ahead: bool):
        self.model, self.cache, self.max_seq_len = model, cache, max_seq_len
        # Ids >= num_token_ids are embedding rows the tokenizer never produces (the model's vocab is
        # padded past it): they are never sampled, so every generated token has text.
        self.num_token_ids = num_token_ids
        self.device = next(model.parameters()).device
        self.decoder = None
        if decode_graphs:
            self.decoder = DecodeGraphs(model, cache, max_batch_size)
            self.decoder.capture_all()
        self.run_ahead = run_ahead and self.decoder is not None
        self.ahead: AheadStep | None = None

    # ------------------------------------------------------------ forward steps

    def decode(self, seqs: list, positions: list[int], load: Tensor | None) -> Tensor:
        """Launch one one-token step over these rows -> logits [B, V] (on CUDA, not yet computed).
        Each row feeds its next prompt token (a short prompt tail) or its last output token. A step
        already queued ahead for these very rows and positions is used instead of a new one."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.seqs == seqs and ahead.positions == positions:
            return ahead.logits
        # (a step queued for other rows is dropped: redoing a position rewrites the same cache entries)
        tokens = [s.prompt_ids[s.num_prefilled] if s.prefilling else s.output_ids[-1] for s in seqs]
        return self._decode_step(self.device_tensor(tokens), positions, seqs, load)

    def prefill(self, seq, chunk: list[int], load: Tensor | None) -> Tensor:
        """One eager forward over a chunk of seq's prompt -> logits of its last token [1, V]."""
        input_ids = torch.tensor([chunk], device=self.device)
        start_pos = torch.tensor([seq.num_prefilled], device=self.device)
        slot_ids = torch.tensor([seq.slot], device=self.device)
        return self.model.forward(input_ids, start_pos, self.cache, slot_ids, load=load, last_only=True)

    def drop_ahead(self) -> None:
        self.ahead = None

    def _decode_step(self, input_ids: Tensor, positions: list[int], seqs: list, load: Tensor | None) -> Tensor:
        start_pos = self.device_tensor(positions)
        slot_ids = self.device_tensor([s.slot for s in seqs])
        if self.decoder is not None:
            return self.decoder.run(input_ids, start_pos, slot_ids, load)
        return self.model.forward(input_ids.view(-1, 1), start_pos, self.cache, slot_ids, load=load, last_only=True)

    # ------------------------------------------------------------ next tokens

    def next_tokens(self, seqs: list, positions: list[int], logits: Tensor, wants: list[int]) -> list[int | BaseException]:
        """The next token of each row in `wants` (rows whose logits predict a token). When every one
        is greedy and run-ahead is on, the next step is queued before these tokens reach the host."""
        want_seqs = [seqs[i] for i in wants]
        if self.run_ahead and all(s.params.temperature < GREEDY_BELOW for s in want_seqs):
            greedy = self._greedy(logits)  # [B] on the device
            host, ready = self._copy_to_host(greedy)  # queued before the next step...
            self._launch_ahead(seqs, positions, greedy)
            ready()  # ...so this waits for this step only, with the next one already queued behind it
            host = host.tolist()
            return [host[i] for i in wants]
        return self.sample_rows(want_seqs, logits[wants])

    def sample_rows(self, seqs: list, logits: Tensor) -> list[int | BaseException]:
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

    def _greedy(self, logits: Tensor) -> Tensor:
        if self.num_token_ids is not None:
            logits = logits[:, :self.num_token_ids]
        return logits.argmax(-1)

    def _launch_ahead(self, seqs: list, positions: list[int], greedy: Tensor) -> None:
        """Run-ahead: queue the next step before this one's tokens reach the host, so the GPU never
        waits for the host between steps. Every row here is greedy, so its next input is known on the
        device (this step's argmax) or on the host (its next prompt token). Rows that will finish now
        by length are left out; if the batch still differs at the next step (an EOS, a new or aborted
        request) that step is recomputed, which rewrites the same cache entries with the same values."""
        rows = [i for i, s in enumerate(seqs) if s.prefilling or
                (len(s.output_ids) + 1 < s.params.max_tokens and s.num_tokens + 1 < self.max_seq_len)]
        if not rows:
            return
        kept = [seqs[i] for i in rows]
        prompt_token = self.device_tensor([s.prompt_ids[s.num_prefilled] if s.prefilling else -1 for s in kept])
        if len(rows) < len(seqs):
            greedy = greedy.index_select(0, self.device_tensor(rows))
        next_ids = torch.where(prompt_token >= 0, prompt_token, greedy)
        next_positions = [positions[i] + 1 for i in rows]
        self.ahead = AheadStep(kept, next_positions, self._decode_step(next_ids, next_positions, kept, None))

    # ------------------------------------------------------------ host <-> device

    def device_tensor(self, values: list[int]) -> Tensor:
        """Host ints -> device tensor without waiting for the GPU work already queued: a plain
        torch.tensor(values, device="cuda") synchronises the stream, which would undo the run-ahead."""
        if self.device.type != "cuda":
            return torch.tensor(values, device=self.device)
        return torch.tensor(values, pin_memory=True).to(self.device, non_blocking=True)

    def _copy_to_host(self, t: Tensor):
        """Queue a device->host copy: -> (host tensor, wait()); wait() releases the GIL while it waits."""
        if self.device.type != "cuda":
            return t.cpu(), lambda: None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done.synchronize
