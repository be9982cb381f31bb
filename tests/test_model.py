"""dsv4_mini.py: config, cached == full forward, deterministic indexer, per-layer MoE accounting,
init determinism, generate, official state dict round trips. CPU, fp32, the tiny preset."""
import dataclasses
import json

import pytest
import torch

import dsv4_mini as M
import kernels
import runner
import weights
from dsv4_mini import ModelConfig, generate
from weights import build_model

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelConfig.tiny(), seed=0)


def random_ids(batch, length, vocab, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_with(**changes):
    return ModelConfig(**{**dataclasses.asdict(ModelConfig.tiny()), **changes})


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "mini", "flash"])
def test_config_round_trip_official_and_hf_variant(preset, tmp_path):
    from transformers import DeepseekV4Config
    cfg = getattr(ModelConfig, preset)()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    # what transformers itself writes (its __post_init__ normalises our HF-form dict)
    hf_written = DeepseekV4Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}).to_dict()
    assert "layer_types" in hf_written and "compress_ratios" not in hf_written
    assert ModelConfig.from_dict(hf_written) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf_written))
    assert ModelConfig.from_pretrained(str(tmp_path)) == cfg


def test_config_presets_follow_the_release_schedule():
    flash, mini = ModelConfig.flash(), ModelConfig.mini()
    assert len(flash.compress_ratios) == 44 and flash.compress_ratios[-1] == 0
    assert [flash.layer_ratio(i) for i in (0, 1, 2, 3, 42)] == [0, 0, 4, 128, 4]
    assert mini.compress_ratios == [0, 0, 4, 128, 4, 128, 4, 128, 0] and mini.vocab_size == 8192
    assert [mini.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert flash.rope_scaling["factor"] == 16 and flash.compress_rope_theta == 160000


@pytest.mark.parametrize("field,changes", [
    ("o_groups", dict(o_groups=3)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=15)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=128, head_dim=64)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=48, index_head_dim=32)),
    ("compress_ratios", dict(compress_ratios=[0, 4, 8, 4])),
    ("num_experts_per_tok", dict(num_experts_per_tok=17)),
    ("num_hash_layers", dict(num_hash_layers=5)),
    ("hidden_size", dict(hidden_size=0)),
    ("n_shared_experts", dict(n_shared_experts=2)),
    ("scoring_func", dict(scoring_func="softmax")),
])
def test_config_rejects_invalid_values_naming_the_field(field, changes):
    with pytest.raises(ValueError, match=field):
        tiny_with(**changes)


def test_config_rejects_hash_layers_after_score_layers_in_hf_form():
    d = ModelConfig.tiny().to_hf_dict()
    d["mlp_layer_types"] = ["moe", "hash_moe", "moe", "moe"]
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_dict(d)


# ------------------------------------------------------------------------------------------------
# Cached forward == full forward
# ------------------------------------------------------------------------------------------------

def test_prefill_then_decode_equals_full_forward_with_rows_at_different_positions(tiny):
    cfg = tiny.config
    T = 40  # 5 windows of 8, 2.5 HCA ratios, 10 CSA windows
    ids = random_ids(2, T, cfg.vocab_size)
    full = tiny(ids)  # [2,T,V]
    prompt = [13, 6]  # row 0 and row 1 decode at different positions in the same batch
    cache = tiny.new_cache(num_slots=3, max_seq_len=T)
    slots = torch.tensor([2, 0])  # rows need not sit in slots 0..B-1
    got = [[], []]
    for row in range(2):
        cache.reset(int(slots[row]))
        got[row].append(tiny(ids[row:row + 1, :prompt[row]], torch.tensor([0]), cache, slots[row:row + 1])[0])
    pos = torch.tensor(prompt)
    while int(pos.min()) < T:
        live = (pos < T).nonzero().flatten()
        step_ids = ids[live, pos[live]].unsqueeze(1)  # [b,1]
        logits = tiny(step_ids, pos[live], cache, slots[live])  # [b,1,V]
        for i, row in enumerate(live.tolist()):
            got[row].append(logits[i])
        pos[live] += 1
    for row in range(2):
        assert (torch.cat(got[row]) - full[row]).abs().max() <= TOL


@pytest.mark.parametrize("chunks", [[3, 5, 7, 1, 11, 13], [17, 23]])
def test_chunked_prefill_equals_full_forward(tiny, chunks):
    ids = random_ids(2, sum(chunks), tiny.config.vocab_size, seed=3)
    full = tiny(ids)
    cache = tiny.new_cache(2, sum(chunks))
    out, start = [], 0
    for n in chunks:
        out.append(tiny(ids[:, start:start + n], torch.full((2,), start), cache, torch.arange(2)))
        start += n
    assert (torch.cat(out, 1) - full).abs().max() <= TOL


def test_last_only_and_logits_match_forward(tiny):
    ids = random_ids(3, 20, tiny.config.vocab_size, seed=4)
    full = tiny.logits(ids)
    cache = tiny.new_cache(3, 20)
    last = tiny(ids, torch.zeros(3, dtype=torch.long), cache, torch.arange(3), last_only=True)
    assert last.shape == (3, tiny.config.vocab_size)
    assert (last - full[:, -1]).abs().max() <= TOL


def test_cache_reset_makes_a_slot_reusable(tiny):
    a, b = random_ids(1, 24, tiny.config.vocab_size, seed=5), random_ids(1, 24, tiny.config.vocab_size, seed=6)
    cache = tiny.new_cache(1, 24)
    tiny(a, torch.tensor([0]), cache, torch.tensor([0]))
    cache.reset(0)
    assert (tiny(b, torch.tensor([0]), cache, torch.tensor([0])) - tiny(b)).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------
# Deterministic indexer
# ------------------------------------------------------------------------------------------------

def test_indexer_ties_occur_and_cached_decoding_still_equals_full_forward(monkeypatch):
    cfg = tiny_with(index_n_heads=2, compress_ratios=[4, 4, 4, 4, 0])  # few heads: exact-zero scores tie
    model = build_model(cfg, seed=0)
    ties = []
    real_topk = M.indexer_topk

    def recording_topk(scores, k):  # scores [B,S,N]; a tie at the boundary: k-th == (k+1)-th best
        top = scores.sort(dim=-1, descending=True).values
        if top.shape[-1] > k:
            ties.append(((top[..., k - 1] == top[..., k]) & (top[..., k] > -torch.inf)).sum().item())
        return real_topk(scores, k)
    monkeypatch.setattr(M, "indexer_topk", recording_topk)

    # greedy decoding through the cache, keeping every step's logits
    B, P, N = 2, 8, 40
    tokens = random_ids(B, P, cfg.vocab_size, seed=7)
    cache = model.new_cache(B, P + N)
    step_logits = [model(tokens, torch.zeros(B, dtype=torch.long), cache, torch.arange(B))]  # [B,P,V]
    for t in range(P, P + N):
        tokens = torch.cat([tokens, step_logits[-1][:, -1:].argmax(-1)], dim=1)
        step_logits.append(model(tokens[:, t:t + 1], torch.full((B,), t), cache, torch.arange(B)))
    assert sum(ties) > 0, "the test needs exact ties at the top-k boundary"

    full = model(tokens)  # one forward over prompt + generated tokens
    assert (torch.cat(step_logits, 1) - full).abs().max() <= TOL
    assert torch.equal(full[:, P - 1:-1].argmax(-1), tokens[:, P:])  # identical greedy tokens


def test_indexer_topk_breaks_ties_by_lowest_index():
    scores = torch.tensor([[0.2, 0.0, 0.35, 0.0, 0.0, 0.15] + [-torch.inf] * 10])
    assert M.indexer_topk(scores, 5).tolist() == [[2, 0, 5, 1, 3]]
    assert M.indexer_topk(scores[:, :6], 5).tolist() == [[2, 0, 5, 1, 3]]


# ------------------------------------------------------------------------------------------------
# MoE: layer index and load accounting
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_physical", [16, 24])
def test_each_moe_call_gets_its_own_layer_and_counts_every_token(monkeypatch, num_physical):
    cfg = ModelConfig.tiny()
    model = build_model(cfg, seed=0, num_physical_experts=num_physical)
    L, P, K = cfg.num_hidden_layers, num_physical, cfg.num_experts_per_tok
    load = torch.zeros(L, P, dtype=torch.int32)
    calls = []

    def recorder(kind, real):
        def wrapped(*args, **kwargs):
            log2phy, logcnt, row, _num_valid_tokens = args[-4:]
            calls.append((kind, row.data_ptr(), log2phy.data_ptr(), logcnt.data_ptr()))
            return real(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(kernels, "hash_topk", recorder("hash", kernels.hash_topk))
    monkeypatch.setattr(kernels, "score_topk", recorder("score", kernels.score_topk))

    ids = random_ids(2, 19, cfg.vocab_size, seed=8)
    cache = model.new_cache(2, 32)
    model(ids[:, :12], torch.zeros(2, dtype=torch.long), cache, torch.arange(2), load=load)
    model(ids[:, 12:], torch.full((2,), 12), cache, torch.arange(2), load=load)  # a second step adds on

    expected = [("hash" if cfg.is_hash_layer(i) else "score", load[i].data_ptr(), model.log2phy[i].data_ptr(),
                 model.logcnt[i].data_ptr()) for i in range(L)]
    assert calls == expected * 2
    assert load.sum(1).tolist() == [ids.numel() * K] * L  # every layer, hash layers included
    logical = torch.zeros(L, cfg.n_routed_experts, dtype=torch.long)
    logical.scatter_add_(1, model.phy2log, load.long())  # fold physical slots -> logical experts
    for i in range(cfg.num_hash_layers):
        tid2eid = model.layers[i].ffn.gate.tid2eid
        hist = torch.bincount(tid2eid[ids.flatten()].flatten().long(), minlength=cfg.n_routed_experts)
        assert logical[i].tolist() == hist.tolist()
    if num_physical > cfg.n_routed_experts:  # replicas split their expert's traffic, nothing else changes
        plain = build_model(cfg, seed=0)
        plain_load = torch.zeros(L, cfg.n_routed_experts, dtype=torch.int32)
        plain_cache = plain.new_cache(2, 32)
        plain(ids[:, :12], torch.zeros(2, dtype=torch.long), plain_cache, torch.arange(2), load=plain_load)
        plain(ids[:, 12:], torch.full((2,), 12), plain_cache, torch.arange(2), load=plain_load)
        assert torch.equal(logical, plain_load.long())  # same logical choices in every layer
        E = cfg.n_routed_experts
        busy = [(i, e) for i in range(L) for e in range(num_physical - E) if logical[i, e] >= 8]
        assert busy  # an expert chosen >= 8 times with 2 replicas: both replicas got some
        for i, e in busy:
            assert load[i, e] > 0 and load[i, E + e] > 0, (i, e, load[i, e], load[i, E + e])


def test_replicated_experts_do_not_change_outputs():
    cfg = ModelConfig.tiny()
    ids = random_ids(2, 20, cfg.vocab_size, seed=9)
    base = build_model(cfg, seed=0)(ids)
    replicated = build_model(cfg, seed=0, num_physical_experts=32)(ids)
    assert (base - replicated).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------
# Init, generate, state dicts
# ------------------------------------------------------------------------------------------------

def test_build_model_is_deterministic_and_seed_dependent():
    cfg = ModelConfig.tiny()
    a, b, c = (weights.official_state_dict(build_model(cfg, seed=s)) for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wq_a.weight"], c["layers.0.attn.wq_a.weight"])
    # an EP rank holds exactly the trivial placement's experts, with the same weights
    rank1 = build_model(cfg, seed=0, num_physical_experts=24, ep_rank=1, ep_size=2)
    for layer in range(cfg.num_hidden_layers):
        w1 = rank1.expert_weights(layer)[0]
        for slot in range(12):
            expert = (12 + slot) % cfg.n_routed_experts
            assert torch.equal(w1[slot], a[f"layers.{layer}.ffn.experts.{expert}.w1.weight"])


def _expert_names_drawn(monkeypatch) -> set:
    """Records the routed-expert tensors the init draws (every draw asks _generator by name)."""
    drawn, real = set(), weights._generator

    def recording(seed, name, device=None):
        if ".experts." in name:
            drawn.add(name)
        return real(seed, name, device)
    monkeypatch.setattr(weights, "_generator", recording)
    return drawn


def test_ep_rank_draws_only_its_slots_experts_and_matches_the_one_process_model(monkeypatch):
    cfg = ModelConfig.tiny()
    E, P, G = cfg.n_routed_experts, cfg.n_routed_experts + 4, 2  # 20 slots: experts 0..3 replicated
    one = build_model(cfg, seed=0, num_physical_experts=P)
    plain = {k: v for k, v in one.state_dict().items() if ".ffn.experts." not in k}
    per_rank = P // G
    for rank in range(G):
        drawn = _expert_names_drawn(monkeypatch)
        model = build_model(cfg, seed=0, num_physical_experts=P, ep_rank=rank, ep_size=G)
        held = {(rank * per_rank + slot) % E for slot in range(per_rank)}
        assert drawn == {f"layers.{layer}.ffn.experts.{e}.{w}.weight" for layer in range(cfg.num_hidden_layers)
                         for e in held for w in ("w1", "w2", "w3")}  # nothing of the other rank's experts
        for layer in range(cfg.num_hidden_layers):
            for mine, full in zip(model.expert_weights(layer), one.expert_weights(layer)):
                assert torch.equal(mine, full[rank * per_rank:(rank + 1) * per_rank])
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in plain.items())
        monkeypatch.undo()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_init_is_bit_identical_to_the_state_dict_path(dtype):
    """build_model draws tensor by tensor; the bits are those of loading random_official_state_dict."""
    cfg = ModelConfig.tiny()
    kw = dict(num_physical_experts=24, ep_rank=1, ep_size=2)
    reference = weights._empty_model(cfg, "cpu", dtype, **kw)
    weights.load_official_state_dict(reference, weights.random_official_state_dict(cfg, seed=4))
    streamed = build_model(cfg, seed=4, dtype=dtype, init_device="cpu", **kw).state_dict()
    for name, t in reference.state_dict().items():
        bits = (lambda x: x.view(torch.int16 if x.element_size() == 2 else torch.int32)) if t.is_floating_point() \
            else (lambda x: x)
        assert streamed[name].dtype == t.dtype and torch.equal(bits(streamed[name]), bits(t)), name


def test_device_init_path_keeps_the_laws_small_tensors_and_placement_invariance(monkeypatch):
    """The init_device="cuda" code path, run on the CPU (a CPU generator with the per-name seed): its
    normal_(mean, std) draws the same N(0, 1) numbers as the exact init's randn, so the values agree to
    rounding -- which checks every tensor's mean / std -- and EP ranks hold the one-process slots."""
    monkeypatch.setattr(weights, "_DEVICE_INIT_MIN_NUMEL", 1024)  # tiny tensors are small: take the device path
    cfg = ModelConfig.tiny()
    cpu = torch.device("cpu")

    def device_init(**kw):
        model = weights._empty_model(cfg, "cpu", torch.float32, kw.get("P"), kw.get("rank", 0), kw.get("G", 1))
        weights._init_random_weights(model, 0, fast_device=cpu)
        return model
    exact = build_model(cfg, seed=0, num_physical_experts=20).state_dict()
    one = device_init(P=20)
    sd = one.state_dict()
    assert sd.keys() == exact.keys()
    for name, t in sd.items():
        if t.numel() < 1024 or name.endswith(("tid2eid", "gate.bias")):
            assert torch.equal(t, exact[name]), name  # the CPU path, bit for bit
        else:
            assert torch.allclose(t, exact[name], rtol=1e-5, atol=1e-6), name
    assert not torch.equal(sd["layers.0.attn.wq_a.weight"], exact["layers.0.attn.wq_a.weight"])  # other ops
    for rank in range(2):
        model = device_init(P=20, rank=rank, G=2)
        for layer in range(cfg.num_hidden_layers):
            for mine, full in zip(model.expert_weights(layer), one.expert_weights(layer)):
                assert torch.equal(mine, full[rank * 10:(rank + 1) * 10])


def test_init_device_cpu_is_the_default_and_progress_bar_is_opt_in(capsys):
    cfg = ModelConfig.tiny()
    a = build_model(cfg, seed=1).state_dict()
    b = build_model(cfg, seed=1, init_device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "random init" not in capsys.readouterr().err  # small model: no bar by default
    build_model(cfg, seed=1, progress=True)
    assert "random init" in capsys.readouterr().err


def test_random_init_is_varied_and_tid2eid_rows_are_distinct(tiny):
    cfg = tiny.config
    tid2eid = tiny.layers[0].ffn.gate.tid2eid
    assert tid2eid.dtype == torch.int32 and tid2eid.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in tid2eid.tolist())
    logits = tiny(random_ids(1, 16, cfg.vocab_size))
    assert torch.isfinite(logits).all() and 0.3 < logits.std() < 10
    assert logits[0].argmax(-1).unique().numel() > 4  # not a constant prediction


def test_mini_router_is_skewed_before_eplb():
    """mini's gate.bias gives a Zipf-like popularity: over 4 EP ranks, balancedness <= 0.8."""
    cfg = ModelConfig.mini()
    biases = weights.random_official_state_dict(cfg, seed=0)
    ranks = 4
    # router logits of unit-RMS inputs through N(0, 1/d) gate weights are ~N(0, 1)
    logits = torch.randn(4096, cfg.n_routed_experts, generator=torch.Generator().manual_seed(0))
    balancedness = []
    for layer in range(cfg.num_hash_layers, cfg.num_hidden_layers):
        _, ids = kernels.score_topk(logits, biases[f"layers.{layer}.ffn.gate.bias"], cfg.num_experts_per_tok, 1.0)
        per_rank = torch.bincount(ids.flatten().long() // (cfg.n_routed_experts // ranks), minlength=ranks).float()
        balancedness.append((per_rank.mean() / per_rank.max()).item())
        per_expert = torch.bincount(ids.flatten().long(), minlength=cfg.n_routed_experts)
        assert per_expert.max() > 3 * per_expert.float().mean()  # a few hot experts
    assert sum(balancedness) / len(balancedness) <= 0.8


def test_generate_is_greedy_through_the_cache(tiny):
    prompt = random_ids(3, 9, tiny.config.vocab_size, seed=10)
    out = generate(tiny, prompt, max_new_tokens=12)
    assert out.shape == (3, 21) and torch.equal(out[:, :9], prompt)
    assert torch.equal(tiny(out)[:, 8:-1].argmax(-1), out[:, 9:])


def test_official_state_dict_round_trip_is_bit_identical(tiny):
    sd = weights.official_state_dict(tiny)
    assert "layers.3.ffn.experts.15.w2.weight" in sd and "layers.3.ffn.experts.w2" not in sd
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int32 and "layers.2.ffn.gate.bias" in sd
    other = build_model(tiny.config, seed=5, num_physical_experts=20)
    weights.load_official_state_dict(other, {k: (v.long() if k.endswith("tid2eid") else v) for k, v in sd.items()})
    back = weights.official_state_dict(other)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    w1 = other.expert_weights(1)[0]
    assert torch.equal(w1[17], w1[1])  # slot 17 replicates expert 1


def test_load_official_state_dict_lists_every_problem_at_once(tiny):
    sd = dict(weights.official_state_dict(tiny))
    del sd["layers.1.attn.wq_a.weight"]
    del sd["layers.2.ffn.experts.3.w1.weight"]
    sd["layers.0.attn.not_a_param"] = torch.zeros(1)
    sd["layers.1.attn.kv_norm.weight"] = torch.ones(7)
    sd["layers.0.ffn.experts.5.w2.weight"] = torch.zeros(3, 3)
    sd["mtp.0.enorm.weight"] = torch.ones(3)  # ignored
    with pytest.raises(ValueError) as err:
        weights.load_official_state_dict(tiny, sd)
    msg = str(err.value)
    for key in ("missing: layers.1.attn.wq_a.weight", "missing: layers.2.ffn.experts.3.w1.weight",
                "unexpected: layers.0.attn.not_a_param", "mis-shaped: layers.1.attn.kv_norm.weight",
                "mis-shaped: layers.0.ffn.experts.5.w2.weight"):
        assert key in msg
    assert "mtp" not in msg


def test_save_pretrained_then_load_model(tiny, tmp_path):
    weights.save_pretrained(tiny, str(tmp_path))
    loaded = weights.load_model(str(tmp_path), dtype=torch.float32)
    ids = random_ids(1, 12, tiny.config.vocab_size, seed=11)
    assert torch.equal(loaded(ids), tiny(ids))
    two = weights.load_model(str(tmp_path), dtype=torch.float32, num_layers=2)
    assert two.config.num_hidden_layers == 2 and two.config.compress_ratios == [0, 4, 0]


# ------------------------------------------------------------------------------------------------
# DecodeGraphs (CUDA graphs on GPU; on CPU its fallback and its static step are checked)
# ------------------------------------------------------------------------------------------------

def test_batch_buckets():
    assert runner.batch_buckets(1) == [1]
    assert runner.batch_buckets(8) == [1, 2, 4, 8]
    assert runner.batch_buckets(12) == [1, 2, 4, 8, 12]


def _prefilled(model, prompt_lens, max_seq_len, idle_slots=0):
    """A cache whose slot b holds row b's prompt (lengths differ), plus `idle_slots` slots nobody
    uses; -> (cache, ids [B, max_seq_len])."""
    ids = random_ids(len(prompt_lens), max_seq_len, model.config.vocab_size, seed=11)
    cache = model.new_cache(len(prompt_lens) + idle_slots, max_seq_len)
    for b, n in enumerate(prompt_lens):
        model(ids[b:b + 1, :n], torch.tensor([0]), cache, torch.tensor([b]))
    return cache, ids


def test_decode_graphs_cpu_fallback_equals_forward(tiny):
    cache, ids = _prefilled(tiny, [5, 9, 14], 40)
    full = tiny(ids)
    graphs = runner.DecodeGraphs(tiny, cache, max_batch_size=3)
    pos = torch.tensor([5, 9, 14])
    load = torch.zeros(tiny.config.num_hidden_layers, tiny.num_physical_experts, dtype=torch.int32)
    for _ in range(20):  # crosses CSA (4) and HCA (8) window boundaries
        logits = graphs.run(ids[torch.arange(3), pos], pos, torch.arange(3), load)
        assert logits.shape == (3, tiny.config.vocab_size)
        assert (logits - full[torch.arange(3), pos]).abs().max() <= TOL
        pos += 1
    assert load.sum(1).tolist() == [3 * 20 * tiny.config.num_experts_per_tok] * tiny.config.num_hidden_layers


def test_static_decode_step_with_padded_rows_equals_forward_and_counts_only_real_rows(tiny):
    """What DecodeGraphs captures, run eagerly on CPU: padded bucket, scratch slot, entries over
    the whole cache (seq_bound = max_seq_len), the routing kernels counting only the real rows."""
    cache, ids = _prefilled(tiny, [6, 11], 40, idle_slots=1)  # slot 2: nobody's
    full = tiny(ids)
    graphs = runner.DecodeGraphs(tiny, cache, max_batch_size=4)
    state = [t.clone() for layer in cache.layers for t in vars(layer).values() if t is not None]
    K, L = tiny.config.num_experts_per_tok, tiny.config.num_hidden_layers
    load = torch.zeros(L, tiny.num_physical_experts, dtype=torch.int32)
    pos = torch.tensor([6, 11])
    for _ in range(18):
        inputs = torch.tensor([[0, 0, cache.scratch_slot]] * 4).T.contiguous()  # 2 real rows + 2 padded
        inputs[:, :2] = torch.stack([ids[torch.arange(2), pos], pos, torch.arange(2)])
        logits = graphs._step(inputs, load)
        assert (logits[:2] - full[torch.arange(2), pos]).abs().max() <= TOL
        assert load.sum(1).tolist() == [2 * K] * L  # padded rows count nothing
        pos += 1
    # padded rows wrote only the scratch slot: the idle slot 2 is untouched
    after = [t for layer in cache.layers for t in vars(layer).values() if t is not None]
    assert cache.scratch_slot == 3
    for before, now in zip(state, after):
        assert torch.equal(before[2], now[2])
    assert any(not torch.equal(b[cache.scratch_slot], a[cache.scratch_slot]) for b, a in zip(state, after))


def test_sinkhorn_is_nearly_doubly_stochastic():
    comb = M.sinkhorn(torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0)), 20, 1e-6)
    assert comb.shape == (3, 5, 4, 4)
    assert (comb.sum(-1) - 1).abs().max() < 1e-3 and (comb.sum(-2) - 1).abs().max() < 1e-5


def test_linear_fp32_is_the_fp32_linear_off_cuda():
    # on the CPU (and for fp32 operands) linear_fp32 is exactly F.linear on fp32 copies
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen).bfloat16()
    w = torch.randn(40, 64, generator=gen).bfloat16()
    got = M.linear_fp32(x, w)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 40)
    assert torch.equal(got, torch.nn.functional.linear(x.float(), w.float()))
    assert torch.equal(M.linear_fp32(x.float(), w.float()), got)


@pytest.mark.gpu
def test_linear_fp32_on_cuda_matches_the_fp32_cast():
    # the CUDA path: one GEMM of the bf16 operands with an fp32 result (the same exact products, fp32 sums
    # in another order), at the released head's shape and a router's
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, (out_dim, in_dim) in ((64, (129280, 4096)), (21, (256, 4096))):
        x = torch.randn(rows, 1, in_dim, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(out_dim, in_dim, device="cuda", generator=gen) * in_dim ** -0.5).bfloat16()
        got, want = M.linear_fp32(x, w), torch.nn.functional.linear(x.float(), w.float())
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
