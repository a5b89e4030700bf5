"""fastattn: fused sliding-window and clustered attention for PyTorch.

Importing never compiles anything; the C++/CUDA extension is built on the first op call
(or ahead of time with ``python -m fastattn.build``). The public names are loaded lazily so
that tools which need no torch (``python -m fastattn.perf compare``) start fast.
"""

import importlib

# public name -> module that defines it
_EXPORTS = {
    "BuildError": "fastattn._build",
    "local_attention": "fastattn.local",
    "local_attention_varlen": "fastattn.varlen",
    "Clustering": "fastattn.clustered",
    "cluster": "fastattn.clustered",
    "clustered_attention": "fastattn.clustered",
    "improved_clustered_attention": "fastattn.clustered",
}

# subpackages reachable as attributes after a plain `import fastattn`
_SUBMODULES = ("distributed",)

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastattn.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
