"""Decoder-only token-routed MoE language models (Switch, Mixtral and DeepSeekMoE styles)."""

from .configs import CONFIGS
from .model import MoELM, MoELMConfig, build_moe_lm

__all__ = ["CONFIGS", "MoELM", "MoELMConfig", "build_moe_lm"]
