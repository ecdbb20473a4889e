"""Named bert_moe configs.

Converted checkpoints are written by ``edgemoe moefy`` as a ``model.json`` beside their
weights; only the test model lives here: ``bert-moe-micro`` is a seeded random tiny dense
BERT (``transformers``), converted on build with the centroid router, so it needs no file.
"""

from __future__ import annotations

from ...tools.moefy_dense import MICRO_DIMS
from .model import BertMoEConfig

CONFIGS: dict[str, BertMoEConfig] = {
    "bert-moe-micro": BertMoEConfig(
        name="bert-moe-micro",
        **MICRO_DIMS,
        num_experts=4,
        top_k=2,
        init="moefy-random-bert",
        router="centroid",
        source="bert-micro",
    ),
}
