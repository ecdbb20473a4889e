"""Mixture-of-Experts classes from Hugging Face ``transformers``, built from small configs in code."""

from .configs import CONFIGS

__all__ = ["CONFIGS"]
