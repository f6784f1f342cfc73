"""Benchmarks: latency and memory of builds side by side (`python -m bench`), the HTTP load and fault tester
(`bench.load`), and the Triton throughput client (`bench.triton`)."""
