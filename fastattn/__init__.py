"""fastattn: fused sliding-window and clustered attention for PyTorch.

Importing never compiles anything; the C++/CUDA extension is built on the first op call
(or ahead of time with ``python -m fastattn.build``).
"""

from fastattn._build import BuildError
from fastattn.local import local_attention
from fastattn.clustered import (Clustering, cluster, clustered_attention,
                                improved_clustered_attention)

__all__ = ["BuildError", "local_attention", "Clustering", "cluster", "clustered_attention",
           "improved_clustered_attention"]
__version__ = "0.1.0"
