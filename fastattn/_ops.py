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
    torch.library.register_fake("fastattn::local_attention_bwd")(_qkv_grads_fake)
    torch.library.register_autograd(
        "fastattn::local_attention_fwd", _local_fwd_backward, setup_context=_local_fwd_setup
    )
    torch.library.register_fake("fastattn::local_attention_varlen_fwd")(_varlen_fwd_fake)
    torch.library.register_fake("fastattn::local_attention_varlen_bwd")(_qkv_grads_fake)
    torch.library.register_autograd(
        "fastattn::local_attention_varlen_fwd", _varlen_fwd_backward,
        setup_context=_varlen_fwd_setup,
    )
    _register_clustered()


def _local_fwd_fake(q, k, v, window_left, window_right, key_lengths, scale, softcap=0.0):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:-1], dtype=torch.float32
    )


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     window_left, window_right, scale, softcap):
    # out (Tq, H, D); lse (H, Tq), FlashAttention's varlen layout.
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32
    )


def _qkv_grads_fake(grad_out, grad_lse, q, k, v, *args):
    # dk and dv have k's and v's shape (H_kv heads under GQA, Lk rows), contiguous.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _save_qkv_out(ctx, inputs, output, *extra_tensors):
    """Saves q, k, v, out, lse and ``extra_tensors``; the int / float arguments past them stay
    on ctx, in the order the backward op takes them."""
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *extra_tensors)


def _upstream(ctx, grad_out, grad_lse):
    """The saved tensors, and the upstream gradients with zeros for an unused output."""
    q, k, v, out, lse, *extra = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    return (grad_out, grad_lse, q, k, v, out, lse), extra


def _local_fwd_setup(ctx, inputs, output):
    q, k, v, window_left, window_right, key_lengths, scale, softcap = inputs
    _save_qkv_out(ctx, inputs, output, key_lengths)
    ctx.args = (window_left, window_right)
    ctx.scalars = (scale, softcap)


def _local_fwd_backward(ctx, grad_out, grad_lse):
    tensors, (key_lengths,) = _upstream(ctx, grad_out, grad_lse)
    grads = torch.ops.fastattn.local_attention_bwd(*tensors, *ctx.args, key_lengths, *ctx.scalars)
    return *grads, None, None, None, None, None


def _varlen_fwd_setup(ctx, inputs, output):
    cu_seqlens_q, cu_seqlens_k = inputs[3:5]
    _save_qkv_out(ctx, inputs, output, cu_seqlens_q, cu_seqlens_k)
    ctx.args = tuple(inputs[5:])  # max_seqlen_q, max_seqlen_k, window, scale, softcap


def _varlen_fwd_backward(ctx, grad_out, grad_lse):
    tensors, cu_seqlens = _upstream(ctx, grad_out, grad_lse)
    grads = torch.ops.fastattn.local_attention_varlen_bwd(*tensors, *cu_seqlens, *ctx.args)
    return *grads, None, None, None, None, None, None, None, None


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
