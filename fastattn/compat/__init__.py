"""Drop-in replacements for other attention libraries' APIs, backed by fastattn's kernels.

``fastattn.compat.fast_transformers`` mirrors fast-transformers 0.4.0 (module names, constructor
arguments, (N, L, H, E) tensors, mask objects); see docs/migration.md.
"""
