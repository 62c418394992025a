"""minihires: a from-scratch, readable HiRes-LLaVA with hand-written kernels."""
__version__ = "0.1.0"
