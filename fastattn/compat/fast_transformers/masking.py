"""fast-transformers' mask objects, and how fastattn reads any object of that interface.

The classes mirror ``fast_transformers.masking`` (same constructors, same properties, True means
"keep") but compute lazily and without Python loops, and a ``TriangularCausalMask`` never builds
its L x L matrix unless asked for it. The attention modules accept these and fast-transformers'
own masks alike: they only read the properties below (duck typing).
"""

from __future__ import annotations

import torch

# fast-transformers' finite stand-in for -inf (``additive_matrix_finite`` and the banded fill).
FINITE_NEG = -1e24


class BaseMask:
    """The interface: ``bool_matrix`` (True = keep), ``float_matrix``, ``lengths``, ``shape``,
    ``additive_matrix`` (log of the bool matrix), ``additive_matrix_finite`` (-1e24 for masked),
    ``all_ones`` and ``lower_triangular``. Values are cached on first use, as upstream does."""

    @property
    def bool_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self):
        return self.bool_matrix.shape

    @property
    def float_matrix(self) -> torch.Tensor:
        if not hasattr(self, "_float_matrix"):
            self._float_matrix = self.bool_matrix.float()
        return self._float_matrix

    @property
    def lengths(self) -> torch.Tensor:
        """Row lengths, if every row is ones followed by zeros; ValueError otherwise."""
        if not hasattr(self, "_lengths"):
            matrix = self.bool_matrix
            lengths = matrix.long().sum(dim=-1)
            prefix = torch.arange(matrix.shape[-1], device=matrix.device) < lengths.unsqueeze(-1)
            if not torch.equal(prefix, matrix):
                raise ValueError("The mask is not a length mask")
            self._lengths = lengths
        return self._lengths

    @property
    def additive_matrix(self) -> torch.Tensor:
        if not hasattr(self, "_additive_matrix"):
            self._additive_matrix = torch.log(self.bool_matrix.float())
        return self._additive_matrix

    @property
    def additive_matrix_finite(self) -> torch.Tensor:
        if not hasattr(self, "_additive_matrix_finite"):
            self._additive_matrix_finite = (~self.bool_matrix).float() * FINITE_NEG
        return self._additive_matrix_finite

    @property
    def all_ones(self) -> bool:
        if not hasattr(self, "_all_ones"):
            self._all_ones = bool(torch.all(self.bool_matrix))
        return self._all_ones

    @property
    def lower_triangular(self) -> bool:
        """Upstream's definition: the lengths exist, are 1-D and equal 1, 2, ..., n."""
        if not hasattr(self, "_lower_triangular"):
            try:
                lengths = self.lengths
            except ValueError:
                lengths = None
            self._lower_triangular = bool(
                lengths is not None and lengths.dim() == 1 and torch.equal(
                    lengths, torch.arange(1, len(lengths) + 1, device=lengths.device)))
        return self._lower_triangular


class FullMask(BaseMask):
    """A bool (L, S) mask, or an all-True one: ``FullMask(mask)``, ``FullMask(N, M)``,
    ``FullMask(N=..., M=..., device=...)``."""

    def __init__(self, mask=None, N=None, M=None, device="cpu"):
        if isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise ValueError(f"FullMask expects the mask to be bool, got mask.dtype={mask.dtype}")
            self._mask = mask.detach().clone()
            return
        if mask is not None and M is None and isinstance(mask, int):
            N, M = mask, N
        if N is None:
            raise ValueError("Either mask or N should be provided")
        self._mask = torch.ones(N, M or N, dtype=torch.bool, device=device)
        self._all_ones = True

    @property
    def bool_matrix(self) -> torch.Tensor:
        return self._mask


class LengthMask(BaseMask):
    """Row ``i`` keeps its first ``lengths[i]`` entries of ``max_len`` (default lengths.max())."""

    def __init__(self, lengths, max_len=None, device=None):
        self._device = device or lengths.device
        self._lengths = lengths.detach().clone().to(self._device)
        self._max_len = int(max_len or self._lengths.max())

    @property
    def shape(self):
        return (*self._lengths.shape, self._max_len)

    @property
    def bool_matrix(self) -> torch.Tensor:
        if not hasattr(self, "_bool_matrix"):
            indices = torch.arange(self._max_len, device=self._device)
            self._bool_matrix = indices < self._lengths.unsqueeze(-1)
        return self._bool_matrix

    @property
    def all_ones(self) -> bool:
        if not hasattr(self, "_all_ones"):
            self._all_ones = bool(torch.all(self._lengths >= self._max_len))
        return self._all_ones


class TriangularCausalMask(LengthMask):
    """The (N, N) mask that keeps the diagonal and everything below it."""

    def __init__(self, N, device="cpu"):
        super().__init__(torch.arange(1, N + 1, device=device), N, device)
        self._lower_triangular = True


def mask_kind(mask, rows: int, cols: int) -> str:
    """``"all_ones"``, ``"causal"`` or ``"general"`` for a mask object (None = all ones).

    Cached flags are read first, so that fast-transformers' ``TriangularCausalMask`` is not
    expanded; the causal test is one tensor comparison instead of upstream's loop over rows.
    """
    if mask is None:
        return "all_ones"
    if _cached_true(mask, "_lower_triangular"):
        size = len(mask.lengths)
        if not rows == cols == size:
            raise ValueError(
                f"a causal attn_mask needs L == S == its size, got L={rows}, S={cols}, size={size}")
        return "causal"
    shape = tuple(mask.shape)
    if shape != (rows, cols):
        raise ValueError(f"attn_mask must have shape (L, S) = ({rows}, {cols}), got {shape}")
    if mask.all_ones:
        return "all_ones"
    if rows == cols:
        matrix = mask.bool_matrix
        if torch.equal(matrix, torch.ones_like(matrix).tril()):
            return "causal"
    return "general"


def _cached_true(mask, name: str) -> bool:
    value = getattr(mask, name, None)
    return value is not None and bool(value)


def additive_finite(mask) -> torch.Tensor:
    """The (L, S) additive matrix of a mask object, -1e24 where it masks."""
    if hasattr(mask, "additive_matrix_finite"):
        return mask.additive_matrix_finite
    return (~mask.bool_matrix).float() * FINITE_NEG


def lengths_tensor(lengths, name: str, batch: int, device) -> torch.Tensor | None:
    """The (N,) int64 lengths of a length-mask object (or a tensor; None means full)."""
    if lengths is None:
        return None
    value = lengths.lengths if hasattr(lengths, "lengths") else lengths
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a LengthMask-like object or an integer tensor, got {type(lengths).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype={value.dtype}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must hold one length per batch, shape ({batch},), got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.long)
