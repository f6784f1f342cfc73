"""llama.cpp as a peer: the benchmark model's decoder exported to GGUF, checked by llama.cpp against PyTorch,
and timed with llama-bench side by side with the project's builds (`python -m bench --llama-cpp DIR`).

One job per module: `gguf_export` (the GGUF), `vocab` (its placeholder vocabulary), `gguf_forward` (a numpy
forward of the GGUF, for the tests), `llamacpp` (the tools and llama-bench's JSON), `check` (llama.cpp's
logits against PyTorch's), `llama_timing` and `ours` (the two sides' timings), `footprint` (bytes per step
and the memory bandwidth), `records`/`report` (llama-cpp.json and .md), `config` and `run` (`run_peer`).
"""
