"""window_attn_pool front (placeholder: the reference twin until its kernels land)."""
from .reference import window_attn_pool  # noqa: F401
