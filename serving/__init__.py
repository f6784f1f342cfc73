"""Serving, torch-free: the OpenAI-compatible HTTP server with its page (`serving.http`, `python -m serving`) and
the Triton Inference Server model repository (`serving.triton`, `python -m serving.triton`)."""
