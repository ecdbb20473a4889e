"""BERT sentence encoder with MoE feed-forward layers, converted from a dense BERT (``edgemoe moefy``)."""

from .model import BertMoE, BertMoEConfig, build_bert_moe

__all__ = ["BertMoE", "BertMoEConfig", "build_bert_moe"]
