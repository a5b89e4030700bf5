"""The attention modules, under fast-transformers' module name ``fast_transformers.attention``."""

from fastattn.compat.fast_transformers.clustered import (
    ClusteredAttention,
    ImprovedClusteredAttention,
)
from fastattn.compat.fast_transformers.local import LocalAttention

__all__ = ["ClusteredAttention", "ImprovedClusteredAttention", "LocalAttention"]
