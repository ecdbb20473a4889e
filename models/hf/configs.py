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
    # Qwen3-MoE: query/key RMSNorm per head, top-2 of 8 renormalised; layer 1 is a dense MLP.
    "hf-qwen3-moe-micro": {
        "arch": "qwen3_moe",
        "name": "hf-qwen3-moe-micro",
        **_DECODER,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
    },
    # GLM-4-MoE: DeepSeek-V3-style sigmoid + correction-bias routing (group-limited: 1 of 2 groups),
    # renormalised and scaled by 1.5, one shared expert, layer 0 dense; standard grouped-query
    # attention with query/key norm and rotary on half of each head (partial_rotary_factor 0.5).
    "hf-glm4-moe-micro": {
        "arch": "glm4_moe",
        "name": "hf-glm4-moe-micro",
        **_DECODER,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "use_qk_norm": True,
        "router_bias_std": 0.05,
    },
    # ERNIE-4.5-MoE: softmax top-2 of 8 chosen with a (random, nonzero) statistics bias, renormalised,
    # one shared expert, layer 0 dense, tied embeddings.
    "hf-ernie4-5-moe-micro": {
        "arch": "ernie4_5_moe",
        "name": "hf-ernie4-5-moe-micro",
        **_DECODER,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "router_bias_std": 0.05,
    },
    # PhiMoE: sparsemixer top-2 of 4 (the second expert is chosen with the first masked out), LayerNorm,
    # attention and LM-head biases, sliding window 8.
    "hf-phimoe-micro": {
        "arch": "phimoe",
        "name": "hf-phimoe-micro",
        **_DECODER,
        "intermediate_size": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
        "attention_bias": True,
        "lm_head_bias": True,
        "bias_std": 0.1,
    },
    # GraniteMoe: softmax over the top-2 of 4 logits; embedding, residual, attention and logits
    # multipliers (Granite's muP-style scales).
    "hf-granitemoe-micro": {
        "arch": "granitemoe",
        "name": "hf-granitemoe-micro",
        **_DECODER,
        "intermediate_size": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
    },
    # GraniteMoeShared: GraniteMoe plus an ungated shared expert beside the MoE block in every layer.
    "hf-granitemoeshared-micro": {
        "arch": "granitemoeshared",
        "name": "hf-granitemoeshared-micro",
        **_DECODER,
        "intermediate_size": 24,
        "shared_intermediate_size": 40,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
    },
    # GPT-OSS: softmax over the top-2 of 4 router logits (router bias), experts with (random, nonzero)
    # biases and a clamped SwiGLU, attention sinks, sliding window 8 on every other layer, YaRN rotary.
    "hf-gpt-oss-micro": {
        "arch": "gpt_oss",
        "name": "hf-gpt-oss-micro",
        **_DECODER,
        "head_dim": 8,
        "intermediate_size": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "swiglu_limit": 0.5,  # the released models' 7.0 is never reached by these small activations
        "bias_std": 0.1,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
            "rope_theta": 150000.0,
        },
    },
    # DBRX: fused QKV clipped at 0.5, LayerNorm without bias, top-2 of 4 softmax scores divided by
    # their 1-norm (renormalised), expert weights stored as row blocks of three matrices.
    "hf-dbrx-micro": {
        "arch": "dbrx",
        "name": "hf-dbrx-micro",
        "vocab_size": 320,
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 3,
        "max_seq_len": 128,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 10000.0},
        "ffn_config": {
            "ffn_hidden_size": 24,
            "moe_num_experts": 4,
            "moe_top_k": 2,
            "moe_normalize_expert_weights": 1.0,
            "ffn_act_fn": {"name": "silu"},
        },
        "initializer_range": 0.1,
    },
}
