"""M³ViT-style multi-task MoE vision transformer (reference model)."""

from .configs import CONFIGS
from .model import M3ViT, M3ViTConfig, build_m3vit

__all__ = ["CONFIGS", "M3ViT", "M3ViTConfig", "build_m3vit"]
