"""ONNX export of CoreMatching LLaVA models (`python -m export build`) and TensorRT engines."""
