"""Throughput of a Triton model repository under concurrent streamed requests."""
