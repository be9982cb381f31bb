"""dsv4-mini's front door: the CLI and the process roles.

    python serve.py --eplb --ep-size 4 --ep-num-redundant-experts 4
    torchrun --nproc-per-node 2 serve.py --eplb --ep-size 2 --ep-num-redundant-experts 4

One process (or torchrun's rank 0) serves HTTP (app.py) while the model loads on a thread, then runs
the engine (engine.py); under torchrun ranks 1..G-1 only hold their expert slots and follow rank 0's
steps (ep.py). SIGTERM to rank 0 drains the requests in flight, then stops every rank.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
import uvicorn

import dsv4_mini
import ep
import eplb
import weights
from app import PROBE_PATHS, Runtime, create_app
from engine import Engine
from text import load_tokenizer

log = logging.getLogger("dsv4.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# ====================================================================== CLI

PRESETS = ("mini", "tiny", "flash")
MAX_EPLB_WINDOW = 100_000


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, except where there is none (None, or a flag that
    is off): there the help says what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a misspelt or shortened flag is an error, never silently another flag.
    # Aliases spell what sglang and vLLM users type (--model, --enable-eplb, ...).
    p = argparse.ArgumentParser(
        prog="serve.py", description="OpenAI-compatible server for DeepSeek-V4 MoE models with EPLB.",
        formatter_class=HelpWithDefaults, allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--model-path", "--model", metavar="DIR",
                   help="checkpoint directory (config.json, *.safetensors, tokenizer.json); without it: the "
                        "built-in model of --preset with deterministic random weights and built-in tokenizer")
    m.add_argument("--preset", choices=PRESETS, default="mini",
                   help="built-in config when --model-path is not given (tiny: for tests)")
    m.add_argument("--num-layers", type=int, metavar="N",
                   help="keep only the first N layers (e.g. a released-width config truncated for a bench)")
    m.add_argument("--served-model-name", metavar="NAME",
                   help="model id in the API; without it: dsv4-<preset> (dsv4-mini by default) or the "
                        "--model-path directory's name")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weight dtype; auto = float32 on CPU (exact, batch-stable greedy), bfloat16 on CUDA")
    m.add_argument("--seed", type=int, default=0, help="seed for built-in weights and for unseeded requests")
    m.add_argument("--init-device", choices=("cpu", "model"), default="cpu",
                   help="where the built-in random weights are drawn: cpu = the exact, machine-independent "
                        "init; model = on the model's device (fast for released widths, e.g. --preset flash: "
                        "on CUDA the weights differ from the cpu init, deterministic per GPU type)")
    m.add_argument("--expert-dtype", choices=("bf16", "fp8", "fp4"), default=None,
                   help="how routed experts are kept in memory: bf16 = the --dtype weights; fp8 = e4m3 with "
                        "128x128 ue8m0 block scales; fp4 = packed e2m1 with one ue8m0 scale per 32 inputs "
                        "(the released format). Default: the checkpoint's stored format (--model-path), "
                        "else bf16")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every path but /health, /health_generate "
                        "and /metrics (the docs and /openapi.json included)")
    s.add_argument("--max-batch-size", type=int, default=64, help="KV cache slots = requests running at once")
    s.add_argument("--max-seq-len", type=int, default=1024, help="prompt + completion tokens per request")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill forward")
    s.add_argument("--prefill-tail", type=int, default=-1,
                   help="the last N prompt tokens of a request go through the batched one-token (CUDA-graph) "
                        "step instead of an eager prefill forward; -1 = auto (64 on CUDA, 0 on CPU)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--drain-seconds", type=float, default=6.0,
                   help="on SIGTERM, let in-flight requests finish this long, then end them")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server and access log (debug also logs the GETs of /health, /health_generate and /metrics)")
    e = p.add_argument_group("expert-parallel load balancing")
    e.add_argument("--eplb", "--enable-eplb", action="store_true", help="count expert load and rebalance periodically")
    e.add_argument("--ep-size", type=int, default=1,
                   help="expert-parallel ranks (virtual ranks in one process without torchrun)")
    e.add_argument("--ep-num-redundant-experts", type=int, default=0, help="extra physical slots R (P = E + R)")
    e.add_argument("--eplb-rebalance-num-iterations", type=int, default=100, help="forward steps between rebalances")
    e.add_argument("--eplb-window", type=int, default=100,
                   help="recent steps kept one by one: plans are judged on the last half period of them, a move is "
                        "measured over a period")
    e.add_argument("--eplb-min-balancedness", type=float, default=1.0,
                   help="skip a due rebalance while balancedness is at least this (1.0 = always rebalance)")
    e.add_argument("--eplb-load-half-life", type=float, default=0, metavar="STEPS",
                   help="the planner fits an exponentially decayed expert load with this half-life in forward "
                        "steps (0 = 4 x --eplb-window): at small batch one window is mostly sampling noise")
    e.add_argument("--eplb-min-gain", type=float, default=0.01,
                   help="a due rebalance moves a layer (or the whole plan) only when its predicted balancedness gain "
                        "on held-out recent steps exceeds this plus --eplb-gain-noise-sigmas standard errors of that "
                        "prediction (-1 with sigmas 0: move whatever the plan changes)")
    e.add_argument("--eplb-gain-noise-sigmas", type=float, default=2.0,
                   help="how many standard errors of the predicted gain a move must clear on top of --eplb-min-gain")
    e.add_argument("--eplb-whole-plan", action="store_true",
                   help="all changed layers of a plan or none (without it, a layer whose own gain clears the margin "
                        "also moves alone)")
    e.add_argument("--eplb-algorithm", choices=("global", "hierarchical"), default="global",
                   help="hierarchical: balance experts over --eplb-num-nodes first, replicate only inside a node")
    e.add_argument("--eplb-num-nodes", type=int, default=1,
                   help="nodes the --ep-size ranks span (hierarchical needs > 1 and a divisor of --ep-size)")
    e.add_argument("--eplb-layers-per-step", "--eplb-rebalance-layers-per-chunk", type=int, default=1, metavar="N",
                   help="layers moved per forward step (0 = all layers at once); 1: a move stalls no step for "
                        "longer than one layer's copy")
    e.add_argument("--init-expert-location", metavar="SPEC",
                   help="initial placement: 'trivial', a record file (.pt / .json with logical_count, planned "
                        "at start, or physical_to_logical_map, used as is) or the same as an inline JSON object; "
                        "without it: trivial")
    e.add_argument("--record-dir", metavar="DIR", help="where /dump_expert_distribution_record writes (needs --eplb)")
    e.add_argument("--eplb-checks", choices=("auto", "process", "engine"), default="auto",
                   help="where a due rebalance check is judged: process = a spawned judging process while decoding "
                        "goes on, engine = on the engine thread between steps; auto = process on CUDA, engine on a "
                        "CPU (whose cores the forward needs)")
    e.add_argument("--eplb-canary", action="store_true",
                   help="after every cross-rank expert move, check that each slot holds its planned expert")
    e.add_argument("--eager-decode", action="store_true",
                   help="decode steps as plain eager forwards: no CUDA graphs (GPU) or padded step (CPU), no "
                        "run-ahead; for comparisons")
    e.add_argument("--ep-timeout", type=float, default=20.0,
                   help="seconds a collective may wait for a peer rank before the server gives up (torchrun)")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """One clear line per bad value (argparse.error exits 2 with the usage line, no traceback)."""
    positive = ["max_batch_size", "max_seq_len", "max_queue", "prefill_chunk", "max_body_bytes", "ep_size",
                "eplb_rebalance_num_iterations", "eplb_window"]
    for name in positive:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 < a.port < 65536:
        p.error(f"--port must be in 1..65535, got {a.port}")
    if a.ep_num_redundant_experts < 0 or a.eplb_layers_per_step < 0 or a.drain_seconds < 0:
        p.error("--ep-num-redundant-experts, --eplb-layers-per-step and --drain-seconds must be >= 0")
    if a.num_layers is not None and a.num_layers < 1:
        p.error(f"--num-layers must be >= 1, got {a.num_layers}")
    if not 0.0 <= a.eplb_min_balancedness <= 1.0:
        p.error(f"--eplb-min-balancedness must be in [0, 1], got {a.eplb_min_balancedness}")
    if not (a.eplb_load_half_life >= 0 and a.eplb_gain_noise_sigmas >= 0 and -1.0 <= a.eplb_min_gain <= 1.0):
        p.error("--eplb-load-half-life and --eplb-gain-noise-sigmas must be >= 0, --eplb-min-gain in [-1, 1]")
    if a.model_path is not None and not (Path(a.model_path) / "config.json").is_file():
        p.error(f"--model-path {a.model_path}: no config.json there")
    check_init_expert_location(p, a.init_expert_location)
    if a.record_dir is not None and Path(a.record_dir).exists() and not Path(a.record_dir).is_dir():
        p.error(f"--record-dir {a.record_dir}: not a directory")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    num_experts = num_routed_experts(p, a)
    if not dsv4_mini.slots_split_evenly(num_experts + a.ep_num_redundant_experts, a.ep_size):
        p.error(f"experts ({num_experts}) + --ep-num-redundant-experts ({a.ep_num_redundant_experts}) "
                f"must be a multiple of --ep-size ({a.ep_size})")
    world = ep.torchrun_world_size()
    if ep.launched_by_torchrun() and a.ep_size != world:
        p.error(f"--ep-size ({a.ep_size}) must equal the number of torchrun processes ({world})")
    if a.eplb_algorithm == "hierarchical" and not (a.eplb_num_nodes > 1 and a.ep_size % a.eplb_num_nodes == 0):
        p.error(f"--eplb-algorithm hierarchical needs --eplb-num-nodes > 1 dividing --ep-size ({a.ep_size}), "
                f"got {a.eplb_num_nodes}")
    if a.eplb_window > MAX_EPLB_WINDOW:
        p.error(f"--eplb-window must be <= {MAX_EPLB_WINDOW} steps (the ring is preallocated), got {a.eplb_window}")
    if a.ep_timeout <= 0:
        p.error(f"--ep-timeout must be > 0, got {a.ep_timeout}")
    if a.record_dir is not None and not a.eplb:
        p.error("--record-dir needs --eplb (expert load is only counted with --eplb)")
    if a.init_device != "cpu" and a.model_path is not None:
        p.error("--init-device only applies to the built-in random weights, not to --model-path")


def check_init_expert_location(p: argparse.ArgumentParser, spec: str | None) -> None:
    """sglang's forms: 'trivial', a file, or inline JSON. The content is checked when the model loads."""
    if spec is None or spec == "trivial":
        return
    if spec.lstrip().startswith("{"):
        try:
            json.loads(spec)
        except ValueError as error:
            p.error(f"--init-expert-location: inline JSON does not parse ({error})")
    elif not Path(spec).is_file():
        p.error(f"--init-expert-location {spec}: no such file (or 'trivial', or an inline JSON object)")


def num_routed_experts(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """From the preset, or from the checkpoint's config.json without loading anything else."""
    if a.model_path is None:
        return getattr(dsv4_mini.ModelConfig, a.preset)().n_routed_experts
    try:
        return int(json.loads((Path(a.model_path) / "config.json").read_text())["n_routed_experts"])
    except (ValueError, KeyError, TypeError) as error:
        p.error(f"--model-path {a.model_path}: config.json has no usable n_routed_experts ({error})")


# ====================================================================== the model on this rank

def pick_device(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """The device this process computes on (torchrun: one GPU per rank) and the weight dtype."""
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # torchrun: one GPU per rank
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device != "cpu" else torch.float32}[args.dtype]
    return device, dtype


def build_model_for_rank(args: argparse.Namespace, device, dtype, ep_rank: int = 0, ep_size: int = 1):
    """The model with this rank's expert slots (all of them without torchrun)."""
    config = (dsv4_mini.ModelConfig.from_pretrained(args.model_path) if args.model_path
              else getattr(dsv4_mini.ModelConfig, args.preset)())
    if args.num_layers is not None:
        config = config.truncated(min(args.num_layers, config.num_hidden_layers))
    num_physical = config.n_routed_experts + args.ep_num_redundant_experts
    torch.manual_seed(args.seed)
    if args.model_path:
        return weights.load_model(args.model_path, device=device, dtype=dtype, num_layers=args.num_layers,
                                  num_physical_experts=num_physical, ep_rank=ep_rank, ep_size=ep_size,
                                  expert_dtype=args.expert_dtype)
    return weights.build_model(config, seed=args.seed, device=device, dtype=dtype,
                               num_physical_experts=num_physical, ep_rank=ep_rank, ep_size=ep_size,
                               init_device=device if args.init_device == "model" else None,
                               expert_dtype=args.expert_dtype or "bf16")


# ====================================================================== rank 0: the model behind HTTP

def build_runtime(args: argparse.Namespace) -> Runtime:
    """Model + tokenizer + engine (+ EPLB) from the CLI flags. Runs on the load thread.

    Under torchrun this is rank 0: it holds only its own P/G expert slots and hands the engine an
    `ep.LockstepModel`, so every forward, cache reset and expert move is first announced to the
    other ranks (which run `worker_main`).
    """
    device, dtype = pick_device(args)
    peers = mover = None
    if ep.launched_by_torchrun():
        rank_ctx = ep.setup_rank(device, partial(build_model_for_rank, args, device, dtype), args.ep_timeout)
        model = rank_ctx.model
        peers = ep.LockstepModel(model, rank_ctx.channel, rank_ctx.group)
        mover = ep.LockstepMover(model, rank_ctx.channel, rank_ctx.mover, canary=args.eplb_canary)
    else:
        model = build_model_for_rank(args, device, dtype)
    vocab_size = model.config.vocab_size
    tokenizer = load_tokenizer(args.model_path, vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}")
    eplb_manager = make_eplb(args, model, mover) if args.eplb else None
    record_dir = None
    if args.record_dir:
        record_dir = Path(args.record_dir).resolve()
        record_dir.mkdir(parents=True, exist_ok=True)
    engine = Engine(peers or model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    max_queue=args.max_queue, eos_token_ids=tokenizer.eos_ids, prefill_chunk=args.prefill_chunk,
                    seed=args.seed, eplb=eplb_manager, peers=peers,
                    decode_graphs=not args.eager_decode, num_token_ids=tokenizer.vocab_size,
                    prefill_tail=args.prefill_tail if args.prefill_tail >= 0 else
                    (64 if device != "cpu" and not args.eager_decode else 0))
    return Runtime(engine=engine, tokenizer=tokenizer, model_name=served_model_name(args),
                   max_seq_len=args.max_seq_len, vocab_size=vocab_size, eplb=eplb_manager,
                   record_dir=record_dir, peers=peers)


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    return Path(args.model_path).resolve().name if args.model_path else f"dsv4-{args.preset}"


def make_eplb(args: argparse.Namespace, model, mover=None) -> eplb.EPLBManager:
    config = eplb.EPLBConfig(num_ranks=args.ep_size, rebalance_num_iterations=args.eplb_rebalance_num_iterations,
                             window=args.eplb_window, algorithm=args.eplb_algorithm,
                             num_nodes=args.eplb_num_nodes,
                             layers_per_step=args.eplb_layers_per_step or None,
                             min_balancedness=args.eplb_min_balancedness,
                             load_half_life=args.eplb_load_half_life or None, min_gain=args.eplb_min_gain,
                             gain_noise_sigmas=args.eplb_gain_noise_sigmas, per_layer=not args.eplb_whole_plan,
                             init_expert_location=args.init_expert_location,
                             # on a GPU a check's planning (~10 ms of CPU) runs beside the decode steps
                             # instead of between them; on a CPU the forward itself needs the cores
                             background_checks={"auto": model.phy2log.is_cuda, "process": True,
                                                "engine": False}[args.eplb_checks])
    return eplb.EPLBManager(model, config, mover=mover)


# ====================================================================== process roles

class HTTPServer(uvicorn.Server):
    """Rank 0: the app answers at once while the model loads on a thread. A failed load stops the
    server; SIGTERM/SIGINT stop admitting, let the engine finish (or end) in-flight requests, then exit."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.created_at, self.load_error = args, time.monotonic(), None
        self.app = create_app(self.load_runtime, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        # log_config=None: uvicorn's lines go through the root logger, in the server's one format
        super().__init__(uvicorn.Config(self.app, host=args.host, port=args.port, log_level=args.log_level,
                                        log_config=None, timeout_graceful_shutdown=args.drain_seconds + 2))

    def load_runtime(self) -> Runtime:
        try:
            runtime = build_runtime(self.args)
        except Exception as error:  # bad checkpoint / location file: one line, exit 1
            self.load_error = error
            self.should_exit = True
            raise
        log.info("ready in %.1f s: %s on %s, %d slots; dashboard: %s", time.monotonic() - self.created_at,
                 runtime.model_name, runtime.engine.device, self.args.max_batch_size, dashboard_url(self.args))
        return runtime

    def handle_exit(self, sig, frame):
        runtime = self.app.state.runtime
        if runtime is not None and not self.should_exit:
            threading.Thread(target=runtime.engine.drain, args=(self.args.drain_seconds,), daemon=True).start()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutdown (exit status -15); a drained shutdown is exit 0.
        self._captured_signals.clear()


def dashboard_url(args: argparse.Namespace) -> str:
    """Where to point a browser: a wildcard bind address is reachable as localhost."""
    host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{args.port}/dashboard"


def watch_engine(app, poll_s: float = 0.2, grace_s: float = 1.0) -> None:
    """A dead engine thread (under torchrun: a lost rank) must not leave a server that accepts
    requests it can never answer. /health reports 503 at once; after a short grace, exit 1."""
    while True:
        time.sleep(poll_s)
        runtime = app.state.runtime
        if runtime is not None and runtime.engine.crashed:
            log.error("engine died: %s; exiting", runtime.engine.last_error)
            time.sleep(grace_s)
            logging.shutdown()
            os._exit(1)


def serve_http(args: argparse.Namespace) -> int:
    server = HTTPServer(args)
    threading.Thread(target=watch_engine, args=(server.app,), name="watchdog", daemon=True).start()
    server.run()
    if server.load_error is not None:
        print(f"serve.py: error: {server.load_error}", file=sys.stderr)
        return 1
    return 0


def worker_main(args: argparse.Namespace) -> int:
    """Ranks 1..G-1 under torchrun: hold this rank's expert slots and follow rank 0's steps."""
    # SIGTERM/SIGINT reach every rank when torchrun is stopped: rank 0 drains the requests in flight,
    # which needs the other ranks' experts, and then tells them to stop. A worker that outlives rank 0
    # ends by the collective timeout.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a rank waits, on stderr
    device, dtype = pick_device(args)
    rank_ctx = ep.setup_rank(device, partial(build_model_for_rank, args, device, dtype), args.ep_timeout)
    first_slot = rank_ctx.rank * rank_ctx.model.slots_per_rank
    log.info("rank %d/%d: experts slots %d..%d, following rank 0", rank_ctx.rank, rank_ctx.world_size,
             first_slot, first_slot + rank_ctx.model.slots_per_rank - 1)
    ep.run_worker(rank_ctx.model, rank_ctx.channel, rank_ctx.mover, canary=args.eplb_canary)
    return 0


class QuietProbes(logging.Filter):
    """Drops uvicorn's access line for a GET of a probe path: a load balancer polling /health every
    second would bury everything else (--log-level debug keeps them). What a probe finds out is
    logged where it happens: readiness, a failed load, a dead engine, a failed /health_generate."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args   # uvicorn: (client, method, path with query, HTTP version, status)
        if not (isinstance(args, tuple) and len(args) == 5):
            return True
        _, method, path, _, _ = args
        return not (method == "GET" and str(path).split("?")[0] in PROBE_PATHS)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    if level != "debug":
        logging.getLogger("uvicorn.access").addFilter(QuietProbes())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    return worker_main(args) if ep.torchrun_rank() > 0 else serve_http(args)


if __name__ == "__main__":
    sys.exit(main())
