"""Acceptance: our model == transformers' DeepseekV4ForCausalLM (5.24) on fully randomised tiny models.

Weights are randomised in HF, saved in a transformers format and loaded through our loader
(`weights.load_model` -> `checkpoint.read_checkpoint`'s transformers-name path), so the name map is
part of what is tested.

Facts this comparison relies on (see shared/reference/hf_vs_ref.md):
* HF 5.24's shared expert IS clamped (`DeepseekV4MLP.forward` clamps gate and up with swiglu_limit),
  like the reference since 2b2bebc; the unclamped shared expert of transformers issue #46018 is an
  older HF version. So a small swiglu_limit is valid here, and we pick one that makes the clamp
  active in both routed and shared experts (asserted below).
* HF has one compress rate per layer type, so every HCA layer of a config shares its ratio.
* HF normalises routing weights with `sum + 1e-20`; the reference does not (≈1e-20 relative).
* The CSA indexer's top-k has exact ties when index_n_heads is small, broken differently by
  differently shaped topk calls; index_n_heads >= 8 makes them vanishingly rare.
* HF generate needs an explicit attention_mask (else a pad id inside the prompt shifts positions)
  and must not stop at eos_token_id, so eos is disabled for the comparison.
"""
import dataclasses
import math

import torch

import checkpoint as C
from dsv4_mini import ModelConfig, generate
from weights import load_model

# Two schedules with sliding, CSA and HCA layers, hash and score routing. Sequences: 48 tokens
# >= 3 x window and >= 2 x the HCA ratio; generation runs 32 steps past a 13-token prompt, so decode
# completes CSA (every 4) and HCA (every 8 / 16) windows.
CONFIGS = {
    "sliding-first": dict(compress_ratios=[0, 4, 8, 4, 0], num_hash_layers=2, sliding_window=8),
    "hca-first": dict(compress_ratios=[16, 4, 0, 16, 0], num_hash_layers=1, sliding_window=12),
}
BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
            qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8,
            num_experts_per_tok=3, moe_intermediate_size=32, index_n_heads=8, index_head_dim=16,
            index_topk=3, swiglu_limit=0.5, routed_scaling_factor=1.5, max_position_embeddings=512,
            rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                          "beta_fast": 32, "beta_slow": 1})
SEQ, PROMPT, NEW = 48, 13, 32


def hf_model(config: ModelConfig, seed: int):
    """A DeepseekV4ForCausalLM (fp32, eager) with every parameter and buffer randomised."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    hc = DeepseekV4Config(**config.to_hf_dict(), attn_implementation="eager")
    hc.eos_token_id = None
    model = DeepseekV4ForCausalLM(hc).float().eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(seed)
    d, n, E, K = config.hidden_size, config.hc_mult, config.n_routed_experts, config.num_experts_per_tok
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "rotary_emb" in name:  # derived from the config, not weights
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("tid2eid"):  # distinct experts per row
                new = torch.rand(t.shape[0], E, generator=g).argsort(-1)[:, :K]
            elif name.endswith("embed_tokens.weight"):
                new = r
            elif name.endswith(("norm.weight", "layernorm.weight")):
                new = 1 + 0.2 * r
            elif name.endswith("sinks") or name.endswith("position_bias"):
                new = r
            elif name.endswith((".fn", "hc_fn")):
                new = r / math.sqrt(n * d)
            elif name.endswith((".base", "hc_base")):
                new = 0.5 * r
            elif name.endswith((".scale", "hc_scale")):
                new = 1 + 0.3 * r
            elif name.endswith("e_score_correction_bias"):
                new = 0.3 * r
            elif name.endswith(("weight", "gate_up_proj", "down_proj")):  # linear [.., out, in]
                new = r / math.sqrt(t.shape[-1])
            else:
                raise AssertionError(f"parameter {name} not randomised")
            t.copy_(new)
    return model


def clamp_fractions(model, ids, limit):
    """Smallest per-layer fraction of gate pre-activations above swiglu_limit, in the shared and in
    the routed experts of the HF model (so the clamp is exercised in both)."""
    shared, routed = [], []
    hooks = [layer.mlp.shared_experts.gate_proj.register_forward_hook(
        lambda m, i, o: shared.append((o > limit).float().mean().item())) for layer in model.model.layers]
    for layer in model.model.layers:
        experts = layer.mlp.experts
        real = experts._apply_gate

        def spy(gate_up, real=real):
            routed.append((gate_up.chunk(2, dim=-1)[0] > limit).float().mean().item())
            return real(gate_up)
        experts._apply_gate = spy
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for layer in model.model.layers:
            del layer.mlp.experts._apply_gate
    return min(shared), sum(routed) / len(routed)


def run_parity(name, tmp_path, seed):
    config = dataclasses.replace(ModelConfig.tiny(), **BASE, **CONFIGS[name])
    hf = hf_model(config, seed)
    path = str(tmp_path / name)
    if name == "sliding-first":
        hf.save_pretrained(path)  # transformers' reverse-converted names + its own config.json
    else:
        C.write_checkpoint(path, hf.state_dict())  # DeepseekV4ForCausalLM.state_dict() names
        hf.config.save_pretrained(path)
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.compress_ratios == config.compress_ratios  # the config survived HF's config.json

    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(2, config.vocab_size, (2, SEQ), generator=g)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.float()
    got = ours.logits(ids)
    full_diff = (got - ref).abs().max().item()
    assert 0.3 < ref.std().item() < 30  # logits are O(1): 1e-4 is a real bound

    prompt = ids[:, :PROMPT]
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    hf_tokens = out.sequences
    our_tokens = generate(ours, prompt, NEW)
    # HF's cached-decode logits at every step vs our full forward over the same tokens
    step_logits = torch.stack(out.logits, dim=1).float()  # [B, NEW, V]
    decode_diff = (ours.logits(hf_tokens)[:, PROMPT - 1:-1] - step_logits).abs().max().item()
    return config, hf, ids, full_diff, decode_diff, hf_tokens, our_tokens


def check(name, tmp_path, seed):
    config, hf, ids, full_diff, decode_diff, hf_tokens, our_tokens = run_parity(name, tmp_path, seed)
    print(f"{name}: max|dlogits| full forward = {full_diff:.2e}, HF decode steps = {decode_diff:.2e}; "
          f"generate equal = {torch.equal(hf_tokens, our_tokens)}")
    assert full_diff <= 1e-4, f"{name}: max |Δlogits| = {full_diff:.3e}"
    assert decode_diff <= 1e-4, f"{name}: max |Δlogits| vs HF decode steps = {decode_diff:.3e}"
    assert hf_tokens.shape == our_tokens.shape == (2, PROMPT + NEW)
    assert torch.equal(hf_tokens, our_tokens), f"{name}: first differing step " \
        f"{(hf_tokens != our_tokens).any(0).nonzero()[0].item() - PROMPT}"
    # the swiglu clamp is active in the shared and the routed experts
    shared, routed = clamp_fractions(hf, ids, config.swiglu_limit)
    assert shared > 0.05 and routed > 0.05, (shared, routed)


def test_parity_sliding_first_hf_save_pretrained(tmp_path):
    check("sliding-first", tmp_path, seed=0)


def test_parity_hca_first_hf_state_dict(tmp_path):
    check("hca-first", tmp_path, seed=1)
