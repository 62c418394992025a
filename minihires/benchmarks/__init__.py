"""Kernel benchmarks: `python -m minihires bench [stitch|window_attn_pool|all]`."""
