"""The implementations timed side by side, each behind one small interface.

Every implementation takes and returns (B, H, L, D) tensors (k and v with H_kv heads in a GQA
case, with Lk rows against q's Lq in a KV cache case; a packed variable-length batch as a
(1, H, T, D) view of its (T, H, D) storage, see ``Case.inputs``). ``prepare`` does everything
that must stay out of the timing (compilation, block masks, mask buffers, module construction).
``applies`` says statically whether a case is in the implementation's scope (cases outside it
are not generated); ``missing`` says at run time why it cannot run here (not built, not
installed, not implemented yet): such a benchmark is skipped with that reason.
``checked_call`` runs the implementation for the correctness check and returns its output with
the reference to hold it to (same discrete choices, e.g. the same clustering).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools

import torch
import torch.nn.functional as F

import fastattn
from fastattn.reference import (
    clustered_attention_reference,
    improved_clustered_attention_reference,
    local_attention_reference,
    local_attention_varlen_reference,
)

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

SMALL_SEQ_LEN = 4096  # the eager reference is timed only up to this L


def _gqa_kwargs(case) -> dict:
    """``enable_gqa=True`` for a GQA / MQA case (FlexAttention's and SDPA's flag, torch >= 2.5:
    query head h reads kv head h // (H // H_kv), as in fastattn); nothing otherwise, so the
    other cases' calls stay as they were."""
    return {"enable_gqa": True} if case.kv_heads is not None else {}


def _local_reference(case, window=None):
    """fastattn's reference of a local case on the suite's (B, H, L, D) tensors, at the case's
    window or another (SDPA's dense one): Lq != Lk bottom-right as in fastattn; a packed batch
    through the varlen reference, one sequence at a time."""
    window = case.window if window is None else window
    if case.seq_lens is None:
        return functools.partial(local_attention_reference, window=window)
    cu = torch.tensor(case.cu_seqlens, dtype=torch.int32)

    def varlen(q, k, v):
        return _unpacked(local_attention_varlen_reference(*_packed(q, k, v), cu, cu, window))

    return varlen


def _packed(*tensors):
    """(1, H, T, D) views -> the (T, H, D) tensors of FlashAttention's varlen layout (views: in
    the suite's inputs they are the contiguous storage itself)."""
    return tuple(t[0].transpose(0, 1) for t in tensors)


def _unpacked(out):
    return out.transpose(0, 1).unsqueeze(0)


def _cu_seqlens(case, device):
    return torch.tensor(case.cu_seqlens, dtype=torch.int32, device=device)


class Impl:
    name = ""
    no_graph_reason: str | None = None  # set where CUDA-graph capture cannot work
    max_check_len: int | None = None  # check at a shorter L when the reference would be too big

    def applies(self, case, device) -> bool:
        return True

    def missing(self, case, direction, device) -> str | None:
        return None

    def prepare(self, case, device):
        raise NotImplementedError

    def check_case(self, case, heads: int):
        """The case the correctness check runs: ``case``, or (with ``max_check_len``) a plain case
        cut to that L, keeping ``heads`` query heads and one kv head's group. KV cache and packed
        cases are never cut: their references cost Lq x window and one sequence at a time."""
        if not self.max_check_len or case.seq_len <= self.max_check_len or not case.plain:
            return case
        return case.with_(batch=1, heads=heads, seq_len=self.max_check_len,
                          kv_heads=None if case.kv_heads is None else 1)

    def grads_checked(self, case) -> tuple[str, ...]:
        return ("q", "k", "v")

    def check_note(self, case) -> str:
        return ""

    def checked_call(self, fn, case, q, k, v):
        return fn(q, k, v), _local_reference(case)


class FastAttn(Impl):
    name = "fastattn"

    def missing(self, case, direction, device):
        if case.op == "local":
            op = "local_attention_fwd" if case.seq_lens is None else "local_attention_varlen_fwd"
            return _missing_kernel(op, device) or self._not_implemented(case, direction, device)
        for name in ("cluster", case.op.replace("-", "_") + "_attention"):
            if not hasattr(fastattn, name):
                return f"fastattn.{name} does not exist yet"
        return (_missing_kernel("cluster", device)
                or _missing_kernel("clustered_attention_fwd", device))

    def _not_implemented(self, case, direction, device) -> str | None:
        """Whether fastattn's kernels for ``device`` take a KV cache / packed case yet (the CUDA
        ones raise NotImplementedError until they are verified on a GPU): a tiny case of the same
        kind, dtype and head dim runs ``direction`` once, so the answer is the build's own."""
        if case.plain:
            return None
        tiny = (case.with_(seq_lens=(3, 5), seq_len=8) if case.seq_lens is not None
                else case.with_(batch=1, seq_len=case.query_len + 8))
        q, k, v = (t.requires_grad_(direction != "fwd") for t in tiny.inputs(device))
        try:
            out = self.prepare(tiny, device)(q, k, v)
            if direction != "fwd":
                out.sum().backward()
        except NotImplementedError as exc:
            line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return line if line.startswith("fastattn") else f"fastattn: {line}"
        return None

    def prepare(self, case, device):
        if case.op == "local" and case.seq_lens is not None:
            cu, longest = _cu_seqlens(case, device), max(case.seq_lens)

            def varlen(q, k, v):
                return _unpacked(fastattn.local_attention_varlen(
                    *_packed(q, k, v), cu, cu, longest, longest, case.window))

            return varlen
        if case.op == "local":
            return functools.partial(fastattn.local_attention, window=case.window)
        if case.op == "clustered":
            return functools.partial(fastattn.clustered_attention, clusters=case.clusters)
        return functools.partial(fastattn.improved_clustered_attention, clusters=case.clusters,
                                 topk=case.topk)

    def checked_call(self, fn, case, q, k, v):
        if case.op == "local":
            return super().checked_call(fn, case, q, k, v)
        clustering = fastattn.cluster(q.detach(), case.clusters)
        if case.op == "clustered":
            out = fastattn.clustered_attention(q, k, v, clustering=clustering)
        else:
            out = fastattn.improved_clustered_attention(q, k, v, clustering=clustering,
                                                        topk=case.topk)
        return out, _clustered_reference(case, clustering.labels)


def _missing_kernel(op: str, device) -> str | None:
    """Why fastattn cannot run ``op`` on ``device`` (the build failed, or has no such kernel)."""
    error = _load_error()
    if error:
        return f"fastattn's extension failed to build: {error}"
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    keys = (key, "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    if not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", k) for k in keys):
        return f"this fastattn build has no {key} kernel for fastattn::{op}"
    return None


@functools.cache
def _load_error() -> str | None:
    """Builds (or loads) fastattn's extension once; a failure is reported, not retried per case."""
    from fastattn import _ops

    try:
        _ops.load()
    except Exception as exc:  # BuildError, or a toolchain problem: report it, do not time
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _clustered_reference(case, labels):
    """The float64-able reference for ``case`` with fixed labels, sliced to the inputs' (B, H)."""
    def reference(q, k, v):
        lab = labels[: q.shape[0], : q.shape[1]]
        if case.op == "clustered":
            return clustered_attention_reference(q, k, v, lab, case.clusters)
        return improved_clustered_attention_reference(q, k, v, lab, case.clusters, topk=case.topk)

    return reference


class FlexAttention(Impl):
    """torch.compile'd FlexAttention with the sliding-window block mask of the case: with the
    bottom-right offset Lk - Lq in a KV cache case (FlexAttention's indices are top-left), and
    within each sequence (document ids) over the packed (1, H, T, D) batch of a varlen case."""

    name = "flex"

    def applies(self, case, device):
        return case.op == "local" and flex_attention is not None

    def missing(self, case, direction, device):
        if torch.device(device).type == "cpu" and direction != "fwd":
            return "FlexAttention has no backward on CPU"
        return None

    def prepare(self, case, device):
        block_mask = create_block_mask(flex_mask_mod(case, device), B=None, H=None,
                                       Q_LEN=case.q_len, KV_LEN=case.seq_len, device=device)
        compiled, gqa = _compiled_flex(), _gqa_kwargs(case)
        return lambda q, k, v: compiled(q, k, v, block_mask, **gqa)


def flex_mask_mod(case, device):
    """The case's visibility rule as a FlexAttention mask_mod over (q_idx, kv_idx)."""
    left, right = case.window
    offset = case.seq_len - case.q_len  # bottom-right: query i sits at key position i + offset

    def sliding_window(b, h, q_idx, kv_idx):
        position = q_idx + offset
        return (kv_idx >= position - left) & (kv_idx <= position + right)

    if case.seq_lens is None:
        return sliding_window
    lengths = torch.tensor(case.seq_lens, device=device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def packed(b, h, q_idx, kv_idx):
        # Each sequence's queries and keys share its rows, so within a sequence the packed
        # indices align as its own do (offset 0).
        return (document[q_idx] == document[kv_idx]) & sliding_window(b, h, q_idx, kv_idx)

    return packed


class FlexFallbackError(RuntimeError):
    """FlexAttention ran outside torch.compile: its unfused path, which must not be timed."""


def _flex_call(q, k, v, block_mask, enable_gqa=False):
    # Under torch.compile this test is a constant True and vanishes. If dynamo gives up (graph
    # break, recompile limit) it runs this function eagerly, and FlexAttention would take its
    # unfused path that materializes all L x L scores: refuse loudly instead of timing that.
    if not torch.compiler.is_compiling():
        raise FlexFallbackError(
            "FlexAttention ran uncompiled (its unfused L x L path); torch.compile fell back to "
            "eager for this call, so it is not timed")
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@functools.cache
def _compiled_flex():
    # One compiled function serves every case: each shape/dtype/grad mode is a recompile, so
    # allow more than dynamo's default of 8 before it would give up (and fail, above).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(_flex_call, fullgraph=True, dynamic=False)


class FlashAttention4(Impl):
    """FlashAttention 4 (``flash-attn-4``, its CuTe-DSL kernels) on (B, L, H, D) views of our
    (B, H, L, D) tensors: its own layout, reached by a transpose that copies nothing. GQA / MQA
    is native to it: k and v go in with their H_kv heads. So is a KV cache: with seqlen_q !=
    seqlen_k its causal and local masks are bottom-right, as fastattn's (its mask.py offsets
    each row by seqlen_k - seqlen_q). A packed case goes to ``flash_attn_varlen_func`` as the
    (T, H, D) storage itself, with the case's cu_seqlens for q and k."""

    name = "flash-attn-4"
    # no_graph_reason stays None: its kernels launch on the TVM-FFI environment stream, which
    # TVM FFI sets to torch's current stream of the tensors' device on every call (a capture's
    # side stream included), and it allocates through torch.

    def applies(self, case, device):
        return case.op == "local"

    def missing(self, case, direction, device):
        if case.dtype not in ("bf16", "fp16"):
            return f"flash-attn-4 has bf16/fp16 kernels only, not {case.dtype}"
        if case.head_dim % 8 or not 8 <= case.head_dim <= 128:
            # The range both its Hopper (up to 256) and its Blackwell kernels (up to 128) take.
            return f"flash-attn-4 takes head dims 8..128 in steps of 8, not D={case.head_dim}"
        error = _fa4_import_error()
        if error:
            return (f"flash-attn-4 not installed ({error}): pip install flash-attn-4, or see "
                    "docs/benchmarks.md for the lent GPU machines")
        if case.seq_lens is not None and not hasattr(_fa4(), "flash_attn_varlen_func"):
            return "this flash-attn-4 has no flash_attn.cute.flash_attn_varlen_func"
        if torch.device(device).type != "cuda":
            return "flash-attn-4 runs on CUDA only"
        major, minor = torch.cuda.get_device_capability(device)
        need, part = (8, "forward") if direction == "fwd" else (9, "backward")
        if major < need:
            return f"flash-attn-4's {part} needs compute capability {need}.0+, not {major}.{minor}"
        return None

    def prepare(self, case, device):
        call = self._call(case, device)
        # FA4 compiles each kernel on its first use (about 6 s per shape on an H200), and the
        # forward without lse (no grad), the forward with it and the backward are three kernels:
        # run those the case times here so that no compilation falls into a timed or warm-up
        # round (the forward-only decode case needs no backward).
        q, k, v = case.inputs(device)
        call(q, k, v)
        if any(direction != "fwd" for direction in case.directions):
            leaves = tuple(t.requires_grad_() for t in (q, k, v))
            out = call(*leaves)
            torch.autograd.grad(out, leaves, torch.ones(out.shape, dtype=out.dtype, device=device))
        return call

    @staticmethod
    def _call(case, device):
        fa4 = _fa4()
        if case.seq_lens is not None:
            cu, longest = _cu_seqlens(case, device), max(case.seq_lens)
            window_size = fa4_window(case.window, longest)

            def varlen(q, k, v):
                out, _lse = fa4.flash_attn_varlen_func(
                    *_packed(q, k, v), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                    max_seqlen_k=longest, window_size=window_size)
                return _unpacked(out)

            return varlen
        window_size = fa4_window(case.window, case.seq_len)

        def call(q, k, v):
            out, _lse = fa4.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                            v.transpose(1, 2), window_size=window_size)
            return out.transpose(1, 2)

        return call


def fa4_window(window, seq_len):
    """FA4's ``window_size`` for our inclusive ``(left, right)``: ``None`` for a side that
    reaches every key (``>= L - 1``, L the keys' length, the longest sequence's in a packed
    batch: with Lq <= Lk, as in every case, queries sit at key positions 0 .. L - 1), its
    "unbounded". Not -1: FA4 drops the window altogether when left + right < 0, so (-1, 0)
    would be full attention, not causal. With ``None`` it runs its causal (None, 0) or full
    (None, None) kernel, as a user of FlashAttention would."""
    return tuple(None if side >= seq_len - 1 else side for side in window)


def _fa4():
    from flash_attn import cute

    return cute


def _fa4_import_error() -> str | None:
    # Not cached: a failed import is cheap to retry, and the tests inject a fake module.
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except ImportError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


class Sdpa(Impl):
    """PyTorch SDPA over all keys (causal where the window is): the dense upper bound that a
    sparse method, local or clustered, has to beat. A packed batch: the same per sequence, one
    call each (a T x T mask would not fit at T = 35858). A KV cache: the case's exact window,
    as an explicit boolean (Lq, Lk) mask (1 x 32768 in decode: small, and what a decode step
    with SDPA passes)."""

    name = "sdpa"
    max_check_len = 4096  # the dense float64 reference is L x L: check SDPA at this L at most

    def applies(self, case, device):
        return True

    @staticmethod
    def _causal(case) -> bool:
        return case.op == "local" and case.window[1] == 0

    def prepare(self, case, device):
        if case.query_len is not None:
            return functools.partial(F.scaled_dot_product_attention,
                                     attn_mask=sdpa_window_mask(case, device), **_gqa_kwargs(case))
        call = functools.partial(F.scaled_dot_product_attention, is_causal=self._causal(case),
                                 **_gqa_kwargs(case))
        if case.seq_lens is None:
            return call
        bounds = list(itertools.pairwise(case.cu_seqlens))

        def per_sequence(q, k, v):
            return torch.cat([call(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
                              for lo, hi in bounds], dim=2)

        return per_sequence

    def checked_call(self, fn, case, q, k, v):
        if case.query_len is not None:
            return fn(q, k, v), _local_reference(case)
        length = q.shape[2]
        window = (length, 0) if self._causal(case) else (length, length)
        return fn(q, k, v), _local_reference(case, window)


def sdpa_window_mask(case, device):
    """(Lq, Lk) boolean mask, True where a query sees a key, bottom-right as in fastattn."""
    left, right = case.window
    position = torch.arange(case.q_len, device=device).view(-1, 1) + case.seq_len - case.q_len
    key = torch.arange(case.seq_len, device=device).view(1, -1)
    return (key >= position - left) & (key <= position + right)


class Reference(Impl):
    """fastattn.reference in the case's dtype, eagerly: small cases only (L, the keys' length or
    a packed batch's rows, up to SMALL_SEQ_LEN)."""

    name = "reference"

    def applies(self, case, device):
        return case.seq_len <= SMALL_SEQ_LEN

    def missing(self, case, direction, device):
        if case.op != "local" and not hasattr(fastattn, "cluster"):
            return "the clustered references need labels from fastattn.cluster, which does not exist yet"
        return None

    def prepare(self, case, device):
        if case.op == "local":
            return _local_reference(case)

        def clustered(q, k, v):
            labels = fastattn.cluster(q.detach(), case.clusters).labels
            return _clustered_reference(case, labels)(q, k, v)

        return clustered

    def checked_call(self, fn, case, q, k, v):
        if case.op == "local":
            return super().checked_call(fn, case, q, k, v)
        labels = fastattn.cluster(q.detach(), case.clusters).labels
        reference = _clustered_reference(case, labels)
        return reference(q, k, v), reference


class FastTransformers(Impl):
    """fast-transformers 0.4.0 (``make fast-transformers`` builds it): float32, its own layout."""

    name = "fast-transformers"
    no_graph_reason = "its kernels launch on the legacy default stream, which graphs cannot capture"

    def applies(self, case, device):
        if case.dtype != "fp32":
            return False
        if case.query_len is not None or case.seq_lens is not None:
            return True  # generated so that missing() reports why it cannot run them
        if case.op == "local":
            left, right = case.window  # local_context c covers c // 2 before, c - 1 - c // 2 after
            return left in (right, right + 1)
        return True

    def missing(self, case, direction, device):
        if case.query_len is not None:
            return (f"fast-transformers 0.4.0 has no KV cache (its LocalAttention needs as many "
                    f"queries as keys, not Lq={case.query_len}, Lk={case.seq_len})")
        if case.seq_lens is not None:
            return "fast-transformers 0.4.0 has no packed variable-length batches (cu_seqlens)"
        if case.kv_heads is not None:
            return (f"fast-transformers 0.4.0 has no GQA / MQA (k and v need q's H={case.heads} "
                    f"heads, not H_kv={case.kv_heads})")
        if importlib.util.find_spec("fast_transformers") is None:
            return "fast_transformers is not importable (run `make fast-transformers`)"
        return None

    def grads_checked(self, case):
        if case.op == "local":
            # 0.4.0's CUDA key gradient of local attention is wrong for a non-constant upstream
            # gradient; its q and v gradients are right, so those are what the check compares.
            return ("q", "v")
        if case.op == "improved-clustered":
            # Its backward holds each cluster's bottom-k mass constant (a raw kernel broadcasts
            # it, cutting the graph), so dq and dk are not the exact gradient; dv is.
            return ("v",)
        return ("q", "k", "v")

    def check_note(self, case):
        if case.op == "local":
            return "fast-transformers 0.4.0 local key gradient is known wrong: out, dq, dv checked"
        if case.op == "improved-clustered":
            return ("fast-transformers 0.4.0 improved-clustered backward treats the bottom-k mass "
                    "as a constant: out and dv checked")
        return ""

    def prepare(self, case, device):
        return _FastTransformersCall(case, device)

    def checked_call(self, fn, case, q, k, v):
        if case.op == "local":
            return super().checked_call(fn, case, q, k, v)
        with fn.capture_labels() as captured:
            out = fn(q, k, v)
        return out, _clustered_reference(case, captured["labels"])


class _FastTransformersCall:
    """One fast-transformers attention module with its masks, built outside the timing."""

    def __init__(self, case, device):
        from fast_transformers.attention import (
            ClusteredAttention,
            ImprovedClusteredAttention,
            LocalAttention,
        )
        from fast_transformers.masking import FullMask, LengthMask

        if case.op == "local":
            module = LocalAttention(sum(case.window) + 1, attention_dropout=0.0)
        elif case.op == "clustered":
            module = ClusteredAttention(case.clusters, attention_dropout=0.0)
        else:
            module = ImprovedClusteredAttention(case.clusters, topk=case.topk,
                                                attention_dropout=0.0)
        self.module = module.to(device).eval()
        self.mask = FullMask(N=case.seq_len, M=case.seq_len, device=device)
        self.lengths = LengthMask(torch.full((case.batch,), case.seq_len, dtype=torch.long),
                                  max_len=case.seq_len, device=device)
        # Both are cached properties that a call would otherwise build (an L x L float matrix).
        _ = self.mask.additive_matrix_finite, self.lengths.additive_matrix

    def __call__(self, q, k, v):
        out = self.module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.mask,
                          self.lengths, self.lengths)
        return out.transpose(1, 2)

    @contextlib.contextmanager
    def capture_labels(self):
        """Records the cluster label of each query that the next call draws."""
        captured = {}
        create = self.module._create_query_groups

        def spy(queries, query_lengths):
            (sorted_clusters, counts), sorted_index = create(queries, query_lengths)
            captured["labels"] = torch.empty_like(sorted_clusters).scatter_(
                -1, sorted_index, sorted_clusters)
            return (sorted_clusters, counts), sorted_index

        self.module._create_query_groups = spy
        try:
            yield captured
        finally:
            del self.module._create_query_groups


IMPLS = {impl.name: impl for impl in (FastAttn(), FlexAttention(), FlashAttention4(), Sdpa(),
                                       Reference(), FastTransformers())}
