"""Benchmarks and counters: analytic mult-adds (bench.flops) and speed side by side with PyTorch."""
