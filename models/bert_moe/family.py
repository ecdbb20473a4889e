"""The bert_moe family as the model registry sees it: named configs and a builder."""

from __future__ import annotations

import dataclasses

from .. import normalize_dataclass

NAME = "bert_moe"

DESCRIPTIONS = {
    "bert-moe-micro": "tiny test model: random 2-layer BERT (D 32, FFN 64) moefied into 4 experts, top-2",
}

# Shipped checkpoints (file names beside this module), by config name.
WEIGHTS: dict[str, str] = {}


def config_class():
    """The family's config dataclass."""
    from .model import BertMoEConfig

    return BertMoEConfig


def configs() -> dict[str, dict]:
    """Every named config as a full config dict."""
    from .configs import CONFIGS

    return {name: dataclasses.asdict(cfg) for name, cfg in CONFIGS.items()}


def normalize(config: dict) -> dict:
    """Validate a (possibly partial) config dict and return the full one.

    Raises:
        ModelError: Unknown fields or wrong types.
        ConfigError: Sizes that do not fit together (e.g. more experts than FFN neurons).
    """
    return normalize_dataclass(config_class(), NAME, config)


def build(config: dict):
    """Build the torch module from a full config dict.

    ``init="random"`` gives seeded random parameters (a checkpoint is loaded over them);
    ``init="moefy-random-bert"`` converts a seeded random dense BERT of the same sizes.
    """
    from .model import build_bert_moe

    cfg = config_class()(**normalize(config))
    if cfg.init == "random":
        return build_bert_moe(cfg)
    from ...tools.moefy_dense import MoefyConfig, default_texts, moefy_dense, random_bert, word_hash_tokenizer

    dims = {
        k: getattr(cfg, k)
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position")
    }
    # A trained router learns from the offline English corpus, tokenized by word hashing.
    calib = tuple(default_texts(heldout=0)[0][:200]) if cfg.router == "trained" else ()
    moe, _ = moefy_dense(
        random_bert(dims, cfg.seed),
        MoefyConfig(cfg.num_experts, cfg.top_k, cfg.router, calib, cfg.seed),
        word_hash_tokenizer(cfg.vocab_size, cfg.max_position),
    )
    # Keep the registered config (name, init, provenance) rather than the converter's default one.
    moe.cfg = cfg
    return moe
