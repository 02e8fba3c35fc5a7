"""Kernels and kernel references: pure-PyTorch gated delta rule (ground truth, CPU path) and fla compat shims."""
