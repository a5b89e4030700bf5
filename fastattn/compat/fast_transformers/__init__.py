"""fast-transformers 0.4.0's API on fastattn: change the import, keep the code.

``from fast_transformers.attention import LocalAttention`` becomes
``from fastattn.compat.fast_transformers.attention import LocalAttention`` (likewise
``.masking`` and ``.local_product``); tensors stay (N, L, H, E). See docs/migration.md.
"""

from fastattn.compat.fast_transformers.attention import (
    ClusteredAttention,
    ImprovedClusteredAttention,
    LocalAttention,
)
from fastattn.compat.fast_transformers.local_product import (
    local_dot_product,
    local_weighted_average,
)
from fastattn.compat.fast_transformers.masking import (
    BaseMask,
    FullMask,
    LengthMask,
    TriangularCausalMask,
)

__all__ = [
    "BaseMask",
    "ClusteredAttention",
    "FullMask",
    "ImprovedClusteredAttention",
    "LengthMask",
    "LocalAttention",
    "TriangularCausalMask",
    "local_dot_product",
    "local_weighted_average",
]
