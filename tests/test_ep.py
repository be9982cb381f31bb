"""Expert parallelism over torch.distributed (gloo, CPU): real `torchrun --nproc-per-node 2 serve.py`
servers against a single-process one, a forced cross-rank rebalance with the canary on, and a killed rank.
The decode step goes through DecodeGraphs on every rank (ep.LockstepDecodeGraphs; on CPU its padded
eager step) unless --eager-decode; both give the single process's tokens. A torchrun world of one
serves through the same EP path.

Plus the mover alone (ep.DistributedMover) in two gloo processes; its sources (eplb.slot_sources, a
pure function) are tested in test_eplb.py.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import ep
import eplb
import planner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serve import free_port, wait_healthy  # noqa: E402

PROMPTS = ["The experts", "Once upon a time", "What is the capital of France?", "0 1 2 3 4 5",
           "Mixture-of-experts layers route every token", "café 中文 🙂"]
FLAGS = ["--preset", "tiny", "--eplb", "--ep-size", "2", "--eplb-rebalance-num-iterations", "100000",
         "--eplb-window", "100000", "--log-level", "warning", "--max-seq-len", "128"]


class Launch:
    """One server: plain python (1 process) or torchrun (`ranks` processes, gloo)."""

    def __init__(self, torchrun: bool, *flags: str, ranks: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        head = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                 "--master-port", str(free_port()), "serve.py"] if torchrun else [sys.executable, "serve.py"])
        self.proc = subprocess.Popen(head + [*FLAGS, *flags, "--port", str(self.port)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, timeout_s=90)
        except TimeoutError:
            self.stop()
            raise

    def complete(self, prompt: str, max_tokens: int = 12) -> list:
        body = {"model": "dsv4-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def state(self) -> dict:
        return httpx.get(self.url + "/eplb/state", timeout=30).json()

    def stop(self) -> int:
        """SIGTERM to the serving process (rank 0 under torchrun): it drains, stops the other ranks, exits 0."""
        if self.proc.poll() is None:
            ranks = rank_children(self.proc.pid)
            os.kill(ranks[0] if ranks else self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def rank_children(launcher_pid: int) -> list[int]:
    """PIDs of the serve.py ranks that torchrun started (its grandchildren through the agent)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    procs = [(int(line.split()[0]), int(line.split()[1]), line) for line in out[1:]]
    family, frontier = set(), {launcher_pid}
    while frontier:
        frontier = {pid for pid, ppid, _ in procs if ppid in frontier} - family
        family |= frontier
    ranks = [pid for pid, _, args in procs if pid in family and "serve.py" in args and "torch.distributed.run" not in args]
    return sorted(ranks, key=rank_of)


def rank_of(pid: int) -> int:
    """The RANK torchrun gave a process (processes that are already gone sort last)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return 1 << 30
    return int(dict(kv.split(b"=", 1) for kv in env if b"=" in kv).get(b"RANK", b"0"))


@pytest.fixture(scope="module")
def single_outputs():
    server = Launch(False)
    try:
        yield [server.complete(p) for p in PROMPTS]
    finally:
        server.stop()


def test_two_ranks_match_single_process_and_survive_cross_rank_rebalance(single_outputs):
    # R = 0: a rebalance is a pure permutation of experts over slots, so the plan predicts rank load exactly.
    server = Launch(True, "--eplb-canary")
    try:
        first = [server.complete(p) for p in PROMPTS]
        assert first == single_outputs  # same greedy tokens as one process holding every expert

        before = server.state()
        assert before["num_ranks"] == 2 and before["num_physical"] == before["num_experts"]
        done = httpx.post(server.url + "/eplb/rebalance", timeout=60).json()
        assert done["status"] == "started", done
        deadline = time.monotonic() + 60  # a layer per step (the default): the idle engine finishes the move
        while (after_move := server.state())["rebalance_in_progress"] is not None:
            assert time.monotonic() < deadline, after_move["rebalance_in_progress"]
            time.sleep(0.05)
        record = after_move["rebalances"][-1]
        assert record["slots_changed"] > 0 and record["bytes_moved"] > 0
        per_rank = before["num_physical"] // 2
        old, new = torch.tensor(before["phy2log"]), torch.tensor(after_move["phy2log"])
        old_rank = {(l, e): s // per_rank for l in range(old.shape[0]) for s, e in enumerate(old[l].tolist())}
        crossed = sum(old_rank[(l, e)] != s // per_rank for l in range(new.shape[0])
                      for s, e in enumerate(new[l].tolist()))
        assert crossed > 0, "the plan moved no expert to another rank"

        again = [server.complete(p) for p in PROMPTS]  # the canary ran inside the move; outputs unchanged
        assert again == first

        # The replay routes the same tokens to the same logical experts: its per-rank load under the new
        # placement is exactly what the plan predicted from the recorded logical load.
        replay = server.state()
        logical = torch.tensor(before["logical_load"])                        # [L, E] of the first pass
        predicted = planner.rank_load(planner.replica_load(logical, new), 2)   # [L, G]
        measured = torch.tensor(replay["rank_load"]) - torch.tensor(before["rank_load"])
        assert torch.equal(measured.to(predicted.dtype), predicted)
        assert len(replay["ranks"]["moe_seconds_total"]) == 2 and min(replay["ranks"]["moe_seconds_total"]) > 0
        assert sum(replay["ranks"]["tokens_window"]) == int(torch.tensor(replay["rank_load"]).sum())
        assert server.stop() == 0
    finally:
        server.stop()


def test_ep_checks_judged_in_a_spawned_process_move_experts_and_keep_outputs(single_outputs):
    # the GPU server's default (--eplb-checks process), here on the CPU under torchrun: rank 0 spawns its
    # judging process, checks every 4 steps move whatever the plan changes, the tokens stay one process's
    server = Launch(True, "--eplb-checks", "process", "--eplb-rebalance-num-iterations", "4", "--eplb-window", "4",
                    "--eplb-min-gain", "-1", "--eplb-gain-noise-sigmas", "0")
    try:
        assert [server.complete(p) for p in PROMPTS] == single_outputs
        deadline = time.monotonic() + 60  # verdicts judged while decoding are applied by the idle engine
        while (state := server.state())["counters"]["rebalances_total"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state["config"]["background_checks"]
        assert state["counters"]["rebalance_checks_total"] > 0 and state["counters"]["rebalances_total"] > 0
        assert server.stop() == 0
    finally:
        server.stop()


def test_eager_ep_decode_gives_the_same_tokens_as_the_graphed_ep_path(single_outputs):
    # the graphed path (every rank's DecodeGraphs) is the default, checked against one process above;
    # the eager path is the plain forward broadcast step by step: both must give one process's tokens
    server = Launch(True, "--eager-decode")
    try:
        assert [server.complete(p) for p in PROMPTS] == single_outputs
        assert server.stop() == 0
    finally:
        server.stop()


def test_torchrun_world_of_one_serves_through_the_ep_path(single_outputs):
    server = Launch(True, "--ep-size", "1", ranks=1)
    try:
        assert [server.complete(p) for p in PROMPTS] == single_outputs
        ranks = server.state()["ranks"]  # per-rank MoE seconds exist only on the EP path (LockstepModel)
        assert len(ranks["moe_seconds_total"]) == 1 and ranks["moe_seconds_total"][0] > 0
        assert server.stop() == 0
    finally:
        server.stop()


def test_killed_rank_makes_the_server_exit_nonzero():
    server = Launch(True)
    try:
        assert server.complete("hello", max_tokens=2)
        ranks = rank_children(server.proc.pid)
        assert len(ranks) == 2, ranks
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        code = server.proc.wait(30)
        assert code != 0 and time.monotonic() - killed_at < 30
    finally:
        server.stop()


# ---------------------------------------------------------------- the mover alone

MOVER_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import ep
rank, G = ep.init_expert_parallel(torch.device("cpu"))
group = ep.serving_group(30)
E, P = 6, 8
per = P // G
gen = torch.Generator().manual_seed(0)
experts = [torch.randn(E, 5, 3, generator=gen), torch.randn(E, 3, 4, generator=gen)]
old = torch.tensor([p % E for p in range(P)])
rows = [torch.tensor([5, 0, 1, 2, 0, 3, 4, 5]), torch.tensor([1, 1, 5, 1, 2, 3, 4, 0]), torch.randperm(E, generator=gen).repeat(2)[:P]]
weights = [w[old[rank * per:(rank + 1) * per]].clone() for w in experts]
mover = ep.DistributedMover(rank, G, group, chunk_size=2)
for new in rows:
    expected = ep.expert_fingerprints(ep.slot_fingerprints(weights, group, G), old, E)
    mover.move_layer(weights, old, new)
    ep.check_canary(weights, new, expected, group, G)
    for w, e in zip(weights, experts):
        assert torch.equal(w, e[new[rank * per:(rank + 1) * per]]), (rank, new)
    old = new
# a corrupted slot must trip the canary
expected = ep.expert_fingerprints(ep.slot_fingerprints(weights, group, G), old, E)
if rank == 1:
    weights[0][0].add_(1e-3)
try:
    ep.check_canary(weights, old, expected, group, G)
    raise SystemExit("canary missed a corrupted slot")
except RuntimeError as error:
    assert "canary" in str(error)
print("mover ok", rank)
ep.shutdown(group)
"""


def test_distributed_mover_moves_only_changed_slots_between_two_gloo_ranks(tmp_path):
    script = tmp_path / "mover.py"
    script.write_text(MOVER_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script), str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("mover ok") == 2


def test_slot_fingerprints_do_not_depend_on_where_a_slot_sits_and_see_every_byte(monkeypatch):
    """The canary compares a moved slot's fingerprint with its expert's fingerprint before the move, so
    the value must not depend on the slot's position among the slots (a float64 matvec's rounding did),
    nor on how the bytes are chunked; and it must see any byte of any dtype: one scale byte, two bytes
    of packed fp4 swapped."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(33, 2048, generator=gen).to(torch.bfloat16)
    fp = ep.slot_fingerprints([w])
    perm = torch.randperm(33, generator=gen)
    assert torch.equal(ep.slot_fingerprints([w[perm]]), fp[perm])
    assert torch.equal(torch.cat([ep.slot_fingerprints([w[i:i + 1]]) for i in range(33)]), fp)
    assert fp.unique().numel() == 33
    monkeypatch.setattr(ep, "FINGERPRINT_CHUNK", 1000)  # 4096 bytes per slot: chunks of 1000, 1000, 1000, 1000, 96
    assert torch.equal(ep.slot_fingerprints([w]), fp)

    packed = torch.randint(0, 256, (4, 8, 16), dtype=torch.uint8, generator=gen)  # 4 fp4 slots [8, 32 inputs]
    packed[1, 0, :2] = torch.tensor([3, 200], dtype=torch.uint8)
    scales = torch.randint(110, 130, (4, 8, 1), dtype=torch.uint8, generator=gen)  # their ue8m0 scales
    base = ep.slot_fingerprints([packed, scales])
    bumped = scales.clone()
    bumped[2, 5, 0] += 1
    assert (ep.slot_fingerprints([packed, bumped]) != base).tolist() == [False, False, True, False]
    swapped = packed.clone()
    swapped[1, 0, :2] = torch.tensor([200, 3], dtype=torch.uint8)
    assert (ep.slot_fingerprints([swapped, scales]) != base).tolist() == [False, True, False, False]
