"""Named configs of the hf family: tiny, seeded, random-weight versions of transformers MoE classes.

Each config is ``{"arch": <transformers model_type>, "name": ..., **config kwargs}`` plus the family's
own keys (``seed``, ``router_bias_std``). They are small enough to compile and verify in seconds.
"""

from __future__ import annotations

# Attention and width shared by the decoder-only configs (2 KV heads: grouped-query attention).
_DECODER = {
    "vocab_size": 320,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    # Larger than the library's 0.02 so routers make clear choices and logits are not all ~0.
    "initializer_range": 0.1,
}

# Multi-head latent attention (DeepSeek): low-rank query and key/value projections.
_MLA = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,  # DeepSeek-V3's default is 128
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,
    "first_k_dense_replace": 1,  # layer 0 is a dense MLP, layers 1-2 are MoE
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
}

CONFIGS: dict[str, dict] = {
    # Mixtral: softmax top-2 over 4 experts, renormalised; sliding-window attention (window 8).
    "hf-mixtral-micro": {
        "arch": "mixtral",
        "name": "hf-mixtral-micro",
        **_DECODER,
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
    },
    # Qwen2-MoE: top-4 of 8 without renormalisation, plus a shared expert behind a sigmoid gate;
    # layer 1 is a dense MLP (mlp_only_layers).
    "hf-qwen2-moe-micro": {
        "arch": "qwen2_moe",
        "name": "hf-qwen2-moe-micro",
        **_DECODER,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "mlp_only_layers": [1],
    },
    # OLMoE: query/key RMSNorm in attention, top-2 of 8.
    "hf-olmoe-micro": {
        "arch": "olmoe",
        "name": "hf-olmoe-micro",
        **_DECODER,
        "intermediate_size": 24,
        "eos_token_id": 2,  # the library's default lies outside the small vocabulary
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    # Switch Transformers encoder: top-1 of 4 with an expert capacity of 5 tokens per sequence
    # (overflowing tokens skip the MoE), relative position bias, sparse every 2nd block.
    "hf-switch-micro": {
        "arch": "switch_transformers",
        "name": "hf-switch-micro",
        "vocab_size": 320,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 48,
        "num_heads": 4,
        "num_layers": 4,
        "num_sparse_encoder_layers": 2,
        "num_decoder_layers": 4,
        "num_sparse_decoder_layers": 2,
        "num_experts": 4,
        "expert_capacity": 5,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "router_jitter_noise": 0.0,
        "dropout_rate": 0.0,
    },
    # DeepSeek-V2: multi-head latent attention with complex rotary embedding, group-limited greedy
    # softmax routing (top-2 within the group of 4 holding the best expert), routed scaling 1.5,
    # two fused shared experts.
    "hf-deepseek-v2-micro": {
        "arch": "deepseek_v2",
        "name": "hf-deepseek-v2-micro",
        **_MLA,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 1.5,
    },
    # DeepSeek-V3: sigmoid scores plus a (random, nonzero) score-correction bias for the choice,
    # group-limited top-3 (from 2 of 4 groups), renormalised and scaled by 2.5, two fused shared experts.
    "hf-deepseek-v3-micro": {
        "arch": "deepseek_v3",
        "name": "hf-deepseek-v3-micro",
        **_MLA,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "router_bias_std": 0.05,
    },
}
