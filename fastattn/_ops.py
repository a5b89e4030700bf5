"""Loads the compiled ops and registers their fake (meta) and autograd implementations.

Schemas live in csrc/ops.cpp; this module only adds what Python must add. Loading is lazy:
``import fastattn`` never loads or compiles; the first op call does (see ``ensure_loaded``),
taking the prebuilt library or the JIT build (fastattn/_library.py).
"""

from __future__ import annotations

import threading

import torch

from fastattn import _library

_lock = threading.Lock()
library: _library.Library | None = None  # the loaded one, after the first op call
_checked_devices: set[torch.device] = set()


def load() -> _library.Library:
    """Load the prebuilt library or the JIT build (once) and register the Python side."""
    global library
    if library is not None:
        return library
    with _lock:
        if library is None:
            loaded = _library.load()
            _register()
            library = loaded
    return library


@torch.compiler.assume_constant_result
def ensure_loaded(device: torch.device) -> bool:
    """Cheap after the first call per device; under torch.compile it runs at trace time."""
    loaded = load()
    if device not in _checked_devices:
        _library.check_device(loaded, device)
        _checked_devices.add(device)
    return True


def _register() -> None:
    torch.library.register_fake("fastattn::local_attention_fwd")(_local_fwd_fake)
    torch.library.register_fake("fastattn::local_attention_bwd")(_local_bwd_fake)
    torch.library.register_autograd(
        "fastattn::local_attention_fwd", _local_fwd_backward, setup_context=_local_fwd_setup
    )
    _register_clustered()


def _local_fwd_fake(q, k, v, window_left, window_right, key_lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:-1], dtype=torch.float32
    )


def _local_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, window_left, window_right,
                    key_lengths, scale):
    # dk and dv have k's and v's shape (H_kv heads under GQA), contiguous.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _local_fwd_setup(ctx, inputs, output):
    q, k, v, window_left, window_right, key_lengths, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.window = (window_left, window_right)
    ctx.scale = scale


def _local_fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_q, grad_k, grad_v = torch.ops.fastattn.local_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, *ctx.window, key_lengths, ctx.scale
    )
    return grad_q, grad_k, grad_v, None, None, None, None


def _register_clustered() -> None:
    torch.library.register_fake("fastattn::cluster")(_cluster_fake)
    torch.library.register_fake("fastattn::clustered_attention_fwd")(_clustered_fwd_fake)
    torch.library.register_fake("fastattn::clustered_attention_bwd")(_clustered_bwd_fake)
    torch.library.register_autograd(
        "fastattn::clustered_attention_fwd", _clustered_fwd_backward,
        setup_context=_clustered_fwd_setup,
    )


def _clustered_acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _cluster_fake(q, planes, seed, query_lengths, clusters, iterations):
    batch, heads, seq_len, _ = q.shape
    return (q.new_empty((batch, heads, seq_len), dtype=torch.int64),
            q.new_empty((batch, heads, clusters), dtype=torch.int64))


def _clustered_fwd_fake(q, k, v, labels, clusters, topk, key_lengths, scale):
    batch, heads, seq_len, _ = q.shape
    acc = _clustered_acc(q)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, seq_len), dtype=acc),
            q.new_empty((batch, heads, clusters), dtype=acc),
            q.new_empty((batch, heads, clusters), dtype=acc),
            q.new_empty((batch, heads, clusters, min(topk, seq_len)), dtype=torch.int32))


def _clustered_bwd_fake(grad_out, q, k, v, labels, lse, centroid_lse, mass, topk_idx, clusters,
                        key_lengths, scale):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _clustered_fwd_setup(ctx, inputs, output):
    q, k, v, labels, clusters, topk, key_lengths, scale = inputs
    _, lse, centroid_lse, mass, topk_idx = output
    ctx.save_for_backward(q, k, v, labels, lse, centroid_lse, mass, topk_idx, key_lengths)
    ctx.clusters = clusters
    ctx.scale = scale


def _clustered_fwd_backward(ctx, grad_out, *aux_grads):
    """Only ``out`` is differentiable; the other outputs are saved state for this backward."""
    q, k, v, labels, lse, centroid_lse, mass, topk_idx, key_lengths = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    grad_q, grad_k, grad_v = torch.ops.fastattn.clustered_attention_bwd(
        grad_out, q, k, v, labels, lse, centroid_lse, mass, topk_idx, ctx.clusters,
        key_lengths, ctx.scale)
    return grad_q, grad_k, grad_v, None, None, None, None, None
