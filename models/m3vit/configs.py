"""Named M³ViT configurations."""

from __future__ import annotations

from .model import RAW_PIXELS_MEAN, RAW_PIXELS_STD, M3ViTConfig

CONFIGS: dict[str, M3ViTConfig] = {
    # The Edge-MoE FPGA configuration (Sarkar et al., 2023): 128 patches + class token, with a
    # convolutional stem in place of the 16×16 patchify (a plain ViT trunk did not learn shapes
    # from scratch in the CPU training budget; the stem is a dense segment, the MoE part is unchanged).
    "m3vit-tiny": M3ViTConfig(name="m3vit-tiny", stem="conv"),
    # The same architecture with its seeded random initialisation (m3vit-tiny ships trained weights).
    "m3vit-tiny-random": M3ViTConfig(name="m3vit-tiny-random", stem="conv"),
    # The Edge-MoE configuration exactly (patchify stem), random weights.
    "m3vit-tiny-patch": M3ViTConfig(name="m3vit-tiny-patch"),
    "m3vit-small": M3ViTConfig(
        name="m3vit-small", dim=384, heads=6, mlp_hidden=1536, expert_hidden=768, num_experts=16, top_k=4
    ),
    # Small enough to compile and verify in a second; used by the tests.
    "m3vit-micro": M3ViTConfig(
        name="m3vit-micro",
        img_size=(32, 64),
        dim=32,
        heads=2,
        depth=4,
        mlp_hidden=64,
        expert_hidden=48,
        num_experts=8,
        top_k=2,
    ),
    # Task-conditioned gating (M³ViT's task embedding concatenated to the gate input).
    "m3vit-micro-cond": M3ViTConfig(
        name="m3vit-micro-cond",
        img_size=(32, 64),
        dim=32,
        heads=2,
        depth=4,
        mlp_hidden=64,
        expert_hidden=48,
        num_experts=8,
        top_k=2,
        task_cond_dim=16,
    ),
    # Per-task expert windows: each task's gate only sees its own 4 of the 8 experts.
    "m3vit-micro-windows": M3ViTConfig(
        name="m3vit-micro-windows",
        img_size=(32, 64),
        dim=32,
        heads=2,
        depth=4,
        mlp_hidden=64,
        expert_hidden=48,
        num_experts=8,
        top_k=2,
        experts_per_task=4,
    ),
    "m3vit-tiny-cond": M3ViTConfig(name="m3vit-tiny-cond", task_cond_dim=64),
    # Edge-MoE's model exactly (sharc-lab/Edge-MoE): patchify stem, LayerNorm eps 1e-6, no final norm,
    # no class-token tensor (token 0 is pos_embed[0]), raw pixels k/256, and no heads: both tasks
    # output the last block's tokens through their own gates. Seeded random weights.
    "m3vit-tiny-edgemoe": M3ViTConfig(
        name="m3vit-tiny-edgemoe",
        tasks=(("semseg", 0), ("depth", 0)),
        mean=RAW_PIXELS_MEAN,
        std=RAW_PIXELS_STD,
        ln_eps=1e-6,
        final_norm=False,
        cls_token=False,
    ),
}
