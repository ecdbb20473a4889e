"""Named MoE language model configurations."""

from __future__ import annotations

from .model import MoELMConfig

CONFIGS: dict[str, MoELMConfig] = {
    # Small enough to compile and verify in about a second each; used by the tests.
    # Switch Transformer style: top-1, score not renormalised, MoE in every other block.
    "switch-lm-micro": MoELMConfig(
        name="switch-lm-micro",
        vocab_size=256,
        dim=32,
        heads=2,
        depth=4,
        mlp_hidden=64,
        expert_hidden=64,
        num_experts=8,
        top_k=1,
        normalize=False,
        moe_every=2,
    ),
    # Mixtral style: top-2 of 8, chosen scores renormalised, MoE in every block.
    "mixtral-lm-micro": MoELMConfig(
        name="mixtral-lm-micro",
        vocab_size=512,
        dim=64,
        heads=4,
        depth=3,
        mlp_hidden=128,
        expert_hidden=96,
        num_experts=8,
        top_k=2,
        normalize=True,
    ),
    # DeepSeekMoE style: 16 fine-grained experts, top-4, plus 2 shared experts; first block dense.
    "deepseek-lm-micro": MoELMConfig(
        name="deepseek-lm-micro",
        vocab_size=320,
        dim=48,
        heads=4,
        depth=3,
        mlp_hidden=128,
        expert_hidden=32,
        num_experts=16,
        top_k=4,
        normalize=False,
        shared_experts=2,
        first_dense=1,
    ),
    # Byte-level Mixtral-style LM trained on Python's bundled docs (models/moe_lm/train.py, text.py);
    # the shipped checkpoint makes its routing token-dependent, unlike the random-weight configs.
    "mixtral-lm-bytes": MoELMConfig(
        name="mixtral-lm-bytes",
        vocab_size=256,
        dim=64,
        heads=4,
        depth=4,
        mlp_hidden=128,
        expert_hidden=128,
        num_experts=8,
        top_k=2,
        normalize=True,
    ),
    # The same architecture trained with a routing-locality loss (train.py --locality): consecutive bytes
    # keep their experts, so an expert cache serving token-by-token decoding hits far more often.
    "mixtral-lm-bytes-local": MoELMConfig(
        name="mixtral-lm-bytes-local",
        vocab_size=256,
        dim=64,
        heads=4,
        depth=4,
        mlp_hidden=128,
        expert_hidden=128,
        num_experts=8,
        top_k=2,
        normalize=True,
    ),
    # Benchmark sizes.
    "mixtral-lm-tiny": MoELMConfig(
        name="mixtral-lm-tiny",
        vocab_size=4096,
        dim=256,
        heads=8,
        depth=6,
        mlp_hidden=704,
        expert_hidden=704,
        num_experts=8,
        top_k=2,
        normalize=True,
    ),
    "deepseek-lm-tiny": MoELMConfig(
        name="deepseek-lm-tiny",
        vocab_size=4096,
        dim=256,
        heads=8,
        depth=6,
        mlp_hidden=1024,
        expert_hidden=176,
        num_experts=32,
        top_k=4,
        normalize=False,
        shared_experts=2,
        first_dense=1,
    ),
}
