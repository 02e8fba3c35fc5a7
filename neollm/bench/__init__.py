"""Benchmarks behind the tools/bench*.py command lines (each tool parses its flags and calls these).

Modules: ``throughput`` (training-step throughput of flavors and torchtitan's llama3: tools/bench.py),
``peak`` (the bf16 peak MFU divides by), ``scaling`` (the trainer on 1..N GPUs: tools/bench_scaling.py),
``trainer`` (the real trainer beside tools/bench.py: tools/bench_trainer.py), ``attention`` (SDPA
backends and LUCID's kernels: tools/bench_attention.py), ``loss`` (loss methods and the fused loss's
chunk step: tools/bench_loss.py), ``decoding`` (decoding modes: tools/bench_generate.py), ``polynorm`` (the PolyNorm GLU kernels:
tools/bench_polynorm.py) and ``timing`` (the CUDA-event timer the kernel benchmarks share).
"""
