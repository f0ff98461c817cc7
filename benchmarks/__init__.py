"""Benchmarks of ``pointins_ops.instance_aware_conv``: ``python -m benchmarks --help`` from the repository root."""
