"""The torch-free runtime: ONNX Runtime or TensorRT, numpy, tokenizers and Pillow only."""
