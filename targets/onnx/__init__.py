"""ONNX target (onnxruntime executor)."""

from .target import TARGET, OnnxTarget

__all__ = ["TARGET", "OnnxTarget"]
