"""EPLB: locations and record files, recorder, mover, and the model path (output invariance under a
rebalance, per-layer load attribution, the manager loop). The planner itself: test_planner.py."""
import json
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dsv4_mini  # noqa: E402
import weights  # noqa: E402
import eplb  # noqa: E402
import kernels  # noqa: E402
import records  # noqa: E402
from eplb import EPLBConfig, EPLBManager, ExpertLoadRecorder, ExpertLocation, LocalMover, Rebalancer  # noqa: E402
from planner import rebalance_experts  # noqa: E402


# ---------------------------------------------------------------------------------------------
# ExpertLocation and record files
# ---------------------------------------------------------------------------------------------
def test_location_trivial_and_copy_layer():
    loc = ExpertLocation.trivial(3, 4, 6, 2)
    assert loc.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 3
    assert loc.logcnt[0].tolist() == [2, 2, 1, 1] and loc.width == 3
    assert loc.log2phy[0, 0].tolist() == [0, 4, -1] and loc.log2phy[0, 3].tolist() == [3, -1, -1]
    other = ExpertLocation.from_phy2log(torch.tensor([[3, 3, 3, 0, 1, 2]] * 3), 4, 2)
    storage = loc.phy2log.data_ptr(), loc.log2phy.data_ptr(), loc.logcnt.data_ptr()
    loc.copy_layer_(1, other)
    assert (loc.phy2log.data_ptr(), loc.log2phy.data_ptr(), loc.logcnt.data_ptr()) == storage
    assert loc.phy2log[1].tolist() == [3, 3, 3, 0, 1, 2] and loc.phy2log[0].tolist() == [0, 1, 2, 3, 0, 1]
    assert loc.log2phy[1, 3].tolist() == [0, 1, 2] and loc.logcnt[1].tolist() == [1, 1, 1, 3]
    with pytest.raises(ValueError, match="no slot"):
        ExpertLocation.from_phy2log(torch.tensor([[0, 0, 1, 1, 2, 2]]), 4, 2)


def good_record(L=2, E=4, steps=3):
    return {"logical_count": torch.randint(0, 50, (steps, L, E), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_record_round_trip(tmp_path, suffix):
    record = good_record()
    path = str(tmp_path / f"rec{suffix}")
    records.save_record(path, record)
    loaded = records.load_record(path)
    assert torch.equal(loaded["logical_count"], record["logical_count"].double())
    loc = eplb.initial_location(path, 2, 4, 8, 2)
    want, _, _ = rebalance_experts(record["logical_count"].sum(0), 8, 1, 1, 2)
    assert torch.equal(loc.phy2log, want)
    p2l = json.dumps({"physical_to_logical_map": want.tolist()})
    assert torch.equal(eplb.initial_location(p2l, 2, 4, 8, 2).phy2log, want)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


HOSTILE = {
    "negative": {"logical_count": torch.tensor([[[1, -2, 3, 4]] * 2])},
    "nan": {"logical_count": torch.tensor([[[1.0, float("nan"), 3, 4]] * 2])},
    "inf": {"logical_count": torch.tensor([[[1.0, float("inf"), 3, 4]] * 2])},
    "wrong_rank": {"logical_count": torch.ones(2, 2, 2, 4)},
    "empty": {"logical_count": torch.ones(0, 2, 4)},
    "wrong_type": {"logical_count": "lots"},
    "bool": {"logical_count": torch.ones(1, 2, 4, dtype=torch.bool)},
    "complex": {"logical_count": torch.ones(1, 2, 4, dtype=torch.complex64)},
    "not_a_dict": [torch.ones(1, 2, 4)],
    "no_known_key": {"counts": torch.ones(1, 2, 4)},
    "huge_shape": {"logical_count": torch.zeros(1).expand(1 << 16, 1 << 8, 1 << 8)},
    "fractional_ids": {"physical_to_logical_map": torch.tensor([[0.5, 1, 2, 3, 0, 1, 2, 3]] * 2)},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_record_refused(tmp_path, name):
    path = str(tmp_path / "rec.pt")
    torch.save(HOSTILE[name], path)
    with pytest.raises(ValueError):
        eplb.initial_location(path, 2, 4, 8, 2)


def test_pickled_code_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pt")
    torch.save({"logical_count": torch.ones(1, 2, 4), "x": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="refused"):
        records.load_record(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("text", [
    '{"logical_count": [[[1, 2, 3, 4], [1, 2]]]}',  # ragged
    '{"logical_count": [[[1, 2, 3, "x"]]]}',
    '{"logical_count": 5}',
    '{"logical_count": [[[1, 2, 3, 4]]]',  # truncated JSON
    '{"physical_to_logical_map": [[0, 1, 2, 9, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3]]}',  # id 9 >= E
    '{"physical_to_logical_map": [[0, 0, 0, 0, 0, 1, 2, 1], [0, 1, 2, 3, 0, 1, 2, 3]]}',  # expert 3 lost
    '{"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2, 3]]}',  # wrong P
    '{"logical_count": [[[1, 2, 3, 4, 5]]]}',  # wrong E
])
def test_malformed_json_record_refused(text):
    with pytest.raises(ValueError):
        eplb.initial_location(text, 2, 4, 8, 2)


# ---------------------------------------------------------------------------------------------
# Recorder and mover (no model)
# ---------------------------------------------------------------------------------------------
def test_recorder_ring_fold_and_session(tmp_path):
    rec = ExpertLoadRecorder(num_layers=1, num_physical=3, num_experts=2, window=2)
    phy2log = torch.tensor([[0, 1, 0]])
    rec.load += torch.tensor([[1, 2, 3]], dtype=torch.int32)
    rec.step(phy2log)  # outside a session: ring only
    rec.start()
    rec.load += torch.tensor([[5, 0, 1]], dtype=torch.int32)
    rec.step(torch.tensor([[1, 0, 0]]))  # a rebalance in between: folded through the new map
    rec.load += torch.tensor([[1, 1, 1]], dtype=torch.int32)
    rec.step(phy2log)
    assert rec.load.sum() == 0
    assert rec.logical_load().tolist() == [[1 + 2, 5 + 1]]  # window = last 2 steps
    assert rec.physical_load().tolist() == [[6, 1, 2]]
    rec.stop()
    rec.load += 9
    rec.step(phy2log)
    dumped = rec.dump(str(tmp_path / "d.pt"))
    assert dumped["logical_count"].tolist() == [[[1, 5]], [[2, 1]]]
    assert records.load_record(str(tmp_path / "d.pt"))["logical_count"].tolist() == [[[1, 5]], [[2, 1]]]


def test_slot_sources_prefer_local_copies_and_spread_senders():
    old = [0, 1, 2, 3, 0, 1, 2, 3]  # 2 ranks x 4 slots; experts 0..3 on both ranks
    new = [0, 0, 0, 3, 2, 2, 2, 1]
    plan = eplb.slot_sources(old, new, 2)
    assert {(t.dst_slot, t.src_slot) for t in plan} == {(1, 0), (2, 0), (4, 6), (5, 6), (7, 5)}
    old = [0, 1, 2, 3]  # expert 0 held on rank 0 only, needed on rank 1 twice
    new = [0, 0, 0, 0]
    assert [(t.dst_slot, t.src_slot) for t in eplb.slot_sources(old, new, 2)] == [(1, 0), (2, 0), (3, 0)]
    with pytest.raises(ValueError, match="no replica"):
        eplb.slot_sources([0, 0], [1, 1], 1)


def simulate(schedule, old):
    slots, spare = list(old), None
    for dst, src in schedule:
        value = spare if src < 0 else slots[src]
        if dst < 0:
            spare = value
        else:
            slots[dst] = value
    return slots


def test_copy_schedule_handles_cycles_and_replicas():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        P, E = 12, int(torch.randint(4, 12, (1,), generator=gen))
        old = (torch.randperm(P, generator=gen) % E).tolist()
        new = (torch.randperm(P, generator=gen) % E).tolist()
        schedule = eplb.copy_schedule(eplb.slot_sources(old, new, num_ranks=3))
        assert simulate(schedule, old) == new
        changed = sum(a != b for a, b in zip(old, new))
        assert sum(d >= 0 for d, _ in schedule) == changed
    cycle = eplb.copy_schedule(eplb.slot_sources([0, 1, 2, 3], [1, 2, 3, 0], 2))  # one 4-cycle: 4 + 1 copies
    assert len(cycle) == 5 and simulate(cycle, [0, 1, 2, 3]) == [1, 2, 3, 0]


def test_local_mover_moves_only_changed_slots():
    old, new = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 0, 2, 3, 3, 1])
    w1 = old.float().view(6, 1, 1).repeat(1, 2, 3)
    w2 = old.double().view(6, 1).repeat(1, 5)
    moved = LocalMover(num_ranks=3).move_layer([w1, w2], old, new)
    assert moved == 3 * (w1[0].numel() * 4 + w2[0].numel() * 8)
    assert w1[:, 0, 0].tolist() == new.float().tolist() and w2[:, 0].tolist() == new.double().tolist()


# ---------------------------------------------------------------------------------------------
# With the model (tiny preset, fp32)
# ---------------------------------------------------------------------------------------------
G, EXTRA = 4, 8


@pytest.fixture(scope="module")
def config():
    return dsv4_mini.ModelConfig.tiny()


def fresh_model(config):
    return weights.build_model(config, seed=0, num_physical_experts=config.n_routed_experts + EXTRA)


def expert_fingerprints(model, layer):
    """[P] per slot: a fingerprint of the slot's weights."""
    return torch.stack([w.double().flatten(1).sum(1) * (i + 1) for i, w in enumerate(model.expert_weights(layer))]).sum(0)


def fold(load, phy2log, E):
    """physical counts [L, P] -> logical [L, E]."""
    return torch.zeros(load.shape[0], E, dtype=torch.int64).scatter_add_(1, phy2log.long(), load.long())


def rebalance_most_slots(model, layers_per_step, check):
    """Move the model to a plan that changes most slots, one chunk per step; check(step) after each.

    Returns (old phy2log, new phy2log, counts [L, P] of `ids` before, after)."""
    L, E, P = model.config.num_hidden_layers, model.config.n_routed_experts, model.num_physical_experts
    loc = ExpertLocation.of_model(model, G)
    weight = torch.exp(2 * torch.randn(L, E, generator=torch.Generator().manual_seed(1)))
    target = ExpertLocation.from_phy2log(rebalance_experts(weight, P, 1, 1, G)[0], E, G, loc.width)
    assert int(target.changed_slots(loc).sum()) > 0.6 * L * P  # most slots move
    old = loc.phy2log.clone()
    rebalancer = Rebalancer(model, loc)
    rebalancer.begin(target, layers_per_step=layers_per_step)
    while rebalancer.step():
        check()
    assert torch.equal(model.phy2log, target.phy2log) and torch.equal(model.logcnt, target.logcnt)
    assert rebalancer.stats.slots_changed == int((old != target.phy2log).sum())
    return old, target.phy2log


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def test_rebalance_weights_maps_and_counts_follow(config):
    model = fresh_model(config)
    L, E, P = config.num_hidden_layers, config.n_routed_experts, model.num_physical_experts
    expert_fp = [expert_fingerprints(model, layer)[:E].clone() for layer in range(L)]  # trivial: slot e = expert e
    load0 = torch.zeros(L, P, dtype=torch.int32)
    ref = model.forward(IDS, load=load0)

    def check():  # every layer's maps agree with its weights after every step
        for layer in range(L):
            assert torch.equal(expert_fingerprints(model, layer), expert_fp[layer][model.phy2log[layer]])

    old, new = rebalance_most_slots(model, 1, check)
    load1 = torch.zeros(L, P, dtype=torch.int32)
    torch.testing.assert_close(model.forward(IDS, load=load1), ref, rtol=0, atol=1e-4)
    assert torch.equal(fold(load1, new, E), fold(load0, old, E))  # the same choices ...
    assert not torch.equal(load1, load0)  # ... counted in the new slots
    for layer in range(L):
        assert set(new[layer][load1[layer] > 0].tolist()) == set(old[layer][load0[layer] > 0].tolist())


def test_rebalance_outputs_bitwise_identical(config):
    """Replicas hold identical weights, so logits must not change by a single bit before, during
    (layer by layer) and after a rebalance. Needs moe_experts to sum a token's k contributions in
    k order and to compute each row independently of how many rows share its slot."""
    model = fresh_model(config)
    ref = model.forward(IDS)

    def check():
        assert torch.equal(model.forward(IDS), ref), "logits changed during a layer-by-layer rebalance"

    rebalance_most_slots(model, 1, check)
    assert torch.equal(model.forward(IDS), ref)


def test_layer_attribution_prefill_and_decode(config):
    model = fresh_model(config)
    L, E, P, K = config.num_hidden_layers, config.n_routed_experts, model.num_physical_experts, config.num_experts_per_tok
    loc = ExpertLocation.of_model(model, G)
    weight = torch.exp(torch.randn(L, E, generator=torch.Generator().manual_seed(2)))
    Rebalancer(model, loc).run(ExpertLocation.from_phy2log(rebalance_experts(weight, P, 1, 1, G)[0], E, G, loc.width))
    expected = torch.zeros(L, E, dtype=torch.int64)

    def hook(module, args, _output):
        x, batch, layer_idx = args
        if module.is_hash:
            chosen = module.gate.tid2eid[batch.input_ids.reshape(-1)]
        else:
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), module.gate.weight.float())
            _, chosen = kernels.score_topk_torch(logits, module.gate.bias, K, module.scale)
        expected[layer_idx] += torch.bincount(chosen.flatten().long(), minlength=E)

    handles = [model.layers[i].ffn.register_forward_hook(hook) for i in range(L)]
    try:
        gen = torch.Generator().manual_seed(3)
        ids = torch.randint(0, config.vocab_size, (2, 10), generator=gen)
        cache = model.new_cache(2, 32)
        slots = torch.arange(2)
        for s in slots.tolist():
            cache.reset(s)
        steps = [(ids, torch.zeros(2, dtype=torch.long))]
        for i in range(3):
            steps.append((torch.randint(0, config.vocab_size, (2, 1), generator=gen), torch.full((2,), 10 + i)))
        for tokens, start in steps:
            expected.zero_()
            load = torch.zeros(L, P, dtype=torch.int32)
            model.forward(tokens, start, cache, slots, load=load)
            got = fold(load, loc.phy2log, E)
            assert torch.equal(got, expected), "a layer's counts are not exactly its own choices"
            assert got.sum(1).tolist() == [tokens.numel() * K] * L  # nothing leaks across layers
            for layer in range(config.num_hash_layers):
                tid2eid = model.layers[layer].ffn.gate.tid2eid
                hist = torch.bincount(tid2eid[tokens.flatten()].flatten().long(), minlength=E)
                assert torch.equal(got[layer], hist)
    finally:
        for h in handles:
            h.remove()


def skewed_batches(config, n, gen, batch=4, seq=8):
    hot = torch.randperm(config.vocab_size, generator=gen)[:6]
    for _ in range(n):
        yield hot[torch.randint(0, 6, (batch, seq), generator=gen)]


def test_manager_rebalances_and_reports(config, caplog):
    model = fresh_model(config)
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=4, layers_per_step=2))
    probe = torch.arange(16).view(2, 8)
    ref = model.forward(probe)
    gen = torch.Generator().manual_seed(4)
    with caplog.at_level(logging.INFO, logger="dsv4.eplb"):
        for ids in skewed_batches(config, 14, gen):
            model.forward(ids, load=manager.load)
            manager.after_step()
    state = manager.state()
    json.dumps(state)
    assert state["counters"]["rebalances_total"] >= 1 and state["counters"]["bytes_moved_total"] > 0
    first = state["rebalances"][0]
    assert first["balancedness_predicted"] > first["balancedness_before"]
    assert first["balancedness_measured"] is not None and first["layers_moved"] >= 1
    assert any("predicted" in r.message and "measured" in r.message for r in caplog.records)
    torch.testing.assert_close(model.forward(probe), ref, rtol=0, atol=1e-4)
    assert len(state["rank_load"]) == config.num_hidden_layers and len(state["rank_load"][0]) == G
    metrics = manager.metrics()
    assert 0 < metrics["balancedness"] <= 1 and len(metrics["balancedness_per_layer"]) == config.num_hidden_layers


def test_manager_skips_when_balanced_enough(config):
    model = fresh_model(config)
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=2, min_balancedness=0.0))
    before = model.phy2log.clone()
    for ids in skewed_batches(config, 4, torch.Generator().manual_seed(5)):
        model.forward(ids, load=manager.load)
        manager.after_step()
    assert manager.counters["rebalances_skipped_total"] == 2 and manager.counters["rebalances_total"] == 0
    assert torch.equal(model.phy2log, before)
    assert manager.rebalance(force=True)["status"] == "started"
    assert not torch.equal(model.phy2log, before)


def test_dump_then_init_location_gives_the_same_plan(config, tmp_path):
    model = fresh_model(config)
    L, E, P = config.num_hidden_layers, config.n_routed_experts, model.num_physical_experts
    manager = EPLBManager(model, EPLBConfig(num_ranks=G, rebalance_num_iterations=10**6, window=8))
    manager.recorder.start()
    for ids in skewed_batches(config, 5, torch.Generator().manual_seed(6)):
        model.forward(ids, load=manager.load)
        manager.after_step()
    planned = manager.plan(manager.recorder.logical_load())
    path = str(tmp_path / "expert_distribution_recorder.pt")
    manager.recorder.dump(path, manager.location.phy2log)  # as serve.py's endpoint does
    record = records.load_record(path)
    assert record["logical_count"].shape == (5, L, E)
    assert torch.equal(record[records.LAST_MAP_KEY], manager.location.phy2log)
    restored = eplb.initial_location(path, L, E, P, G)
    fresh = fresh_model(config)
    started = EPLBManager(fresh, EPLBConfig(num_ranks=G, init_expert_location=path))
    assert torch.equal(restored.phy2log, rebalance_experts(manager.recorder.logical_load(), P, 1, 1, G)[0])
    assert torch.equal(fresh.phy2log, restored.phy2log)
    assert planned.rank_load(manager.recorder.logical_load()).shape == (L, G)
    assert started.location.phy2log.data_ptr() == fresh.phy2log.data_ptr()
