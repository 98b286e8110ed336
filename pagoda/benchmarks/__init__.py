"""Benchmarks with vLLM's metric definitions: latency, throughput, serve, sweep."""
