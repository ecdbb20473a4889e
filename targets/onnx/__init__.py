"""ONNX backend: graphs for onnxruntime (the ``onnxruntime`` executor), CPU everywhere, CUDA/TensorRT on Jetson."""

TARGET = "target:TARGET"
EXECUTORS = {"onnxruntime": "executor:OrtExecutor"}
