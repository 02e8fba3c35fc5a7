"""Throughput benchmarks of whole training steps (tools/bench.py is their command line)."""
