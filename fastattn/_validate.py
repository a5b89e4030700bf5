"""Input checks shared by the public API: each error names the argument and the values seen."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (16, 32, 64, 96, 128, 256)


def check_qkv(q, k, v, *, grouped_kv: bool = False, kv_cache: bool = False) -> None:
    """q, k, v of one attention call. ``grouped_kv`` (GQA / MQA): k and v may have H_kv heads
    where H_kv divides q's H; ``kv_cache``: and their own length Lk; otherwise all three must
    have the same shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got {name}.shape={tuple(t.shape)}")
    shapes = f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
    if not grouped_kv and not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same (B, H, L, D) shape, got {shapes}")
    if grouped_kv:
        _check_grouped_kv(q, k, v, shapes, kv_cache)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = FLOAT_DTYPES + ((torch.float64,) if q.device.type == "cpu" else ())
    if q.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"q.dtype must be one of {names} on {q.device.type}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name}'s last (head) dimension must be contiguous, got "
                f"{name}.stride()={t.stride()}; call .contiguous() first"
            )
    if q.device.type == "cuda" and q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {CUDA_HEAD_DIMS} on CUDA, got D={q.shape[-1]}")


def _check_grouped_kv(q, k, v, shapes: str, kv_cache: bool) -> None:
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same (B, H_kv, L, D) shape, got {shapes}")
    if kv_cache and (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]):
        raise ValueError(f"q, k, v must have the same B and D, got {shapes}")
    if not kv_cache and (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q, k, v must have the same B, L and D, got {shapes}")
    _check_head_groups(q.shape[1], k.shape[1], shapes)


def _check_head_groups(heads: int, kv_heads: int, shapes: str) -> None:
    if kv_heads != heads and (kv_heads == 0 or heads % kv_heads != 0):
        raise ValueError(
            f"q has H={heads} heads, k and v have H_kv={kv_heads}: H must be a multiple of H_kv "
            f"(GQA / MQA), got {shapes}"
        )


def check_varlen_qkv(q, k, v) -> None:
    """q (Tq, H, D), k and v (Tk, H_kv, D) of a packed batch (``local_attention_varlen``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D (total_tokens, heads, D), got {name}.shape={tuple(t.shape)}")
    shapes = f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same (Tk, H_kv, D) shape, got {shapes}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k, v must have the same D, got {shapes}")
    _check_head_groups(q.shape[1], k.shape[1], shapes)
    # The per-tensor rules (dtype, device, contiguous D) are those of the batched layout.
    check_qkv(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)), grouped_kv=True,
              kv_cache=True)


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, device: torch.device) -> None:
    """Their form; the values (from 0, non-decreasing, up to the rows, within max_seqlen) are
    checked by the kernels' glue where reading them needs no device sync."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32 tensor of shape (N + 1,), got "
                            f"{type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32, got {name}.dtype={t.dtype}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name} must have shape (N + 1,), got {name}.shape={tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {name}.device={t.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (N + 1), got "
            f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")


def check_softcap(softcap) -> float:
    """None (no capping) -> 0.0, the ops' "off"; otherwise a finite number > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a number > 0 or None, got softcap={softcap!r}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(
            f"softcap must be finite and > 0 (None for no capping), got softcap={softcap!r}")
    return float(softcap)


def check_window(window) -> tuple[int, int]:
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise TypeError(f"window must be a pair of ints (left, right), got window={window!r}")
    left, right = window
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be >= 0, got window=({left}, {right})")
    return left, right


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got scale={scale!r}")
    return float(scale)


def check_lengths(lengths, name: str, batch: int, device: torch.device) -> torch.Tensor | None:
    """Returns the lengths as a contiguous int32 (B,) tensor on ``device`` (or None)."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape (B,), got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {name}.dtype={lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one per batch), got {tuple(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.int32).contiguous()


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """An int (not bool) in [low, high]; the error names the argument, the bounds and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {name}={value}")
    return value
