"""The benchmark harness refuses what must not be timed: a wrong implementation, and
FlexAttention's unfused fallback; the peers say why they cannot run a case."""

import functools
import itertools
import sys
import types

import pytest
import torch

from bench import harness, peers
from fastattn.perf.cases import Case, case_set
from fastattn.reference import local_attention_reference, local_attention_varlen_reference

CASE = Case("local", 1, 2, 64, 16, "fp32", window=(5, 3), directions=("fwd", "fwd+bwd"))


class Scaled(peers.Impl):
    """The reference with its output scaled: right shape, wrong values."""

    name = "scaled"

    def __init__(self, factor):
        self.factor = factor

    def prepare(self, case, device):
        reference = functools.partial(local_attention_reference, window=case.window)
        return lambda q, k, v: reference(q, k, v) * self.factor


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_check_passes_a_right_implementation_and_fails_a_wrong_one(direction):
    right, wrong = Scaled(1.0), Scaled(1.001)
    harness.check(right, right.prepare(CASE, "cpu"), CASE, direction, "cpu")
    with pytest.raises(AssertionError, match="scaled on local-.*: out"):
        harness.check(wrong, wrong.prepare(CASE, "cpu"), CASE, direction, "cpu")


def test_check_compares_gradients_too():
    class WrongGradient(Scaled):
        def prepare(self, case, device):
            reference = functools.partial(local_attention_reference, window=case.window)

            def call(q, k, v):  # right output, but dk is 2x the true gradient
                out = reference(q, k, v)
                return out + (reference(q, k, v) - reference(q, k.detach(), v))

            return call

    impl = WrongGradient(1.0)
    harness.check(impl, impl.prepare(CASE, "cpu"), CASE, "fwd", "cpu")
    with pytest.raises(AssertionError, match="grad_k"):
        harness.check(impl, impl.prepare(CASE, "cpu"), CASE, "fwd+bwd", "cpu")


def test_flex_refuses_to_run_uncompiled():
    if peers.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    q = k = v = torch.randn(1, 1, 128, 16)
    block_mask = peers.create_block_mask(lambda b, h, i, j: i >= j, None, None, 128, 128,
                                         device="cpu")
    with pytest.raises(peers.FlexFallbackError, match="unfused"):
        peers._flex_call(q, k, v, block_mask)


def test_fast_transformers_covers_only_the_windows_its_local_context_can_express():
    ft = peers.IMPLS["fast-transformers"]
    assert ft.applies(CASE.with_(window=(4, 4)), "cpu")
    assert ft.applies(CASE.with_(window=(1024, 1023)), "cpu")
    assert not ft.applies(CASE.with_(window=(2047, 0)), "cpu")
    assert not ft.applies(CASE.with_(window=(4, 4), dtype="bf16"), "cpu")


def test_calls_do_one_direction_on_random_inputs():
    fn = functools.partial(local_attention_reference, window=CASE.window)
    out = harness.make_call(fn, CASE, "fwd", "cpu")()
    assert out.shape == CASE.shape and out.std() > 0.1
    grads = harness.make_call(fn, CASE, "fwd+bwd", "cpu")()
    assert len(grads) == 3 and all(g.shape == CASE.shape for g in grads)
    backward = harness.make_call(fn, CASE, "bwd", "cpu")
    assert torch.equal(backward()[0], backward()[0]), "bwd replays one saved forward"


def test_flash_attention_4_runs_only_local_half_precision_cases():
    fa4 = peers.IMPLS["flash-attn-4"]
    clustered = Case("clustered", 1, 2, 64, 16, "bf16", clusters=4)
    assert fa4.applies(CASE, "cuda") and not fa4.applies(clustered, "cuda")
    # float32 and odd head dims are generated and skipped with the reason, never silently.
    assert fa4.missing(CASE, "fwd", "cuda") == "flash-attn-4 has bf16/fp16 kernels only, not fp32"
    assert "not D=12" in fa4.missing(CASE.with_(dtype="bf16", head_dim=12), "fwd", "cuda")
    assert "not D=256" in fa4.missing(CASE.with_(dtype="fp16", head_dim=256), "fwd", "cuda")


def test_flash_attention_4_says_when_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as on a machine without it
    reason = peers.IMPLS["flash-attn-4"].missing(CASE.with_(dtype="bf16"), "fwd", "cuda")
    assert reason.startswith("flash-attn-4 not installed (") and "\n" not in reason
    assert "pip install flash-attn-4" in reason and "docs/benchmarks.md" in reason


def test_flash_attention_4_window_is_none_where_a_side_reaches_every_key():
    assert peers.fa4_window((5, 3), 64) == (5, 3)
    assert peers.fa4_window((62, 0), 64) == (62, 0)  # key 0 is out of query 63's window
    assert peers.fa4_window((63, 0), 64) == (None, 0)  # FA4's causal kernel
    assert peers.fa4_window((0, 1000), 64) == (0, None)
    assert peers.fa4_window((64, 64), 64) == (None, None)  # full attention


def _fa4_window(window_size, length):
    assert all(side is None or side >= 0 for side in window_size)
    return tuple(length if side is None else side for side in window_size)


def _fa4_record(calls, q, k, v, window_size, **more):
    assert all(t.stride(-1) == 1 for t in (q, k, v))
    calls.append({"ptrs": [t.data_ptr() for t in (q, k, v)], "shape": tuple(q.shape),
                  "kv_shape": tuple(k.shape), "grad": q.requires_grad,
                  "window_size": window_size, **more})


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash_attn.cute with FA4's contract, computed by the reference: q, k, v and out
    (B, L, H, D), window_size sides inclusive or None (unbounded), bottom-right where
    seqlen_q != seqlen_k, returns (out, lse); its varlen function on (T, H, D) with cu_seqlens.
    It records what each call received."""
    calls = []

    def flash_attn_func(q, k, v, window_size=(None, None)):
        _fa4_record(calls, q, k, v, window_size)
        window = _fa4_window(window_size, max(q.shape[1], k.shape[1]))
        out, lse = local_attention_reference(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), window, return_lse=True)
        return out.transpose(1, 2).contiguous(), lse

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, window_size=(None, None)):
        _fa4_record(calls, q, k, v, window_size, cu_seqlens=(cu_seqlens_q, cu_seqlens_k),
                    max_seqlen=(max_seqlen_q, max_seqlen_k))
        window = _fa4_window(window_size, max_seqlen_k)
        return local_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, window,
                                                return_lse=True)

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func, package.cute = flash_attn_func, cute
    cute.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return calls


def test_flash_attention_4_with_it_installed_still_needs_cuda(fake_fa4):
    fa4 = peers.IMPLS["flash-attn-4"]
    assert fa4.missing(CASE.with_(dtype="bf16"), "fwd", "cpu") == "flash-attn-4 runs on CUDA only"


@pytest.mark.parametrize(("window", "window_size"), [
    ((5, 3), (5, 3)), ((63, 0), (None, 0)), ((0, 64), (0, None)), ((64, 64), (None, None))])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_flash_attention_4_gets_transposed_views_and_its_window(fake_fa4, window, window_size,
                                                                direction):
    fa4, case = peers.IMPLS["flash-attn-4"], CASE.with_(dtype="bf16", window=window)
    fn = fa4.prepare(case, "cpu")
    # The kernels compile before the timing: forward without grad, then with it (and backward).
    assert [c["grad"] for c in fake_fa4] == [False, True]
    harness.check(fa4, fn, case, direction, "cpu")  # values and gradients against float64
    q, k, v = case.inputs("cpu")
    out = fn(q, k, v)
    call = fake_fa4[-1]
    assert call["shape"] == (1, 64, 2, 16), "FA4 takes (B, L, H, D)"
    assert call["ptrs"] == [t.data_ptr() for t in (q, k, v)], "views, not copies"
    assert call["window_size"] == window_size
    assert out.shape == case.shape


SMOKE = case_set("smoke")
GQA = next(c for c in SMOKE if c.kv_heads and not c.query_len)  # (1, 4 | 2, 256, 32), fp32
DECODE = next(c for c in SMOKE if c.query_len)  # (2, 4 | 2, Lq 1, Lk 256, 32), fp32, (64, 0)
VARLEN = next(c for c in SMOKE if c.seq_lens)  # 3 sequences, H 2, D 32, fp32, (32, 0)
CPU_PEERS = ("fastattn", "flex", "sdpa", "reference")


@pytest.mark.parametrize(("case", "direction"), [
    (case, direction) for case in (GQA, DECODE, VARLEN) for direction in case.directions],
    ids=lambda x: x if isinstance(x, str) else x.id)
@pytest.mark.parametrize("name", CPU_PEERS)
def test_the_smoke_gqa_kv_cache_and_packed_cases_run_through_each_cpu_peer(name, case,
                                                                          direction):
    impl = peers.IMPLS[name]
    assert impl.applies(case, "cpu")
    reason = impl.missing(case, direction, "cpu")
    if reason:  # FlexAttention's backward on a CPU: the one reason expected here
        assert (name, direction) == ("flex", "fwd+bwd"), reason
        assert reason == "FlexAttention has no backward on CPU"
        pytest.skip(reason)
    fn = impl.prepare(case, "cpu")
    harness.check(impl, fn, case, direction, "cpu")  # out and dq, dk, dv against float64
    result = harness.make_call(fn, case, direction, "cpu")()
    if direction == "fwd":
        assert result.shape == case.shape
    else:
        assert [g.shape for g in result] == [case.shape, case.kv_shape, case.kv_shape]


def test_fast_transformers_skips_gqa_kv_caches_and_packed_batches_with_the_reason():
    ft = peers.IMPLS["fast-transformers"]
    assert all(ft.applies(c, "cpu") for c in (GQA, DECODE, VARLEN)), (
        "generated, so that its skip is reported, not silent")
    assert ft.missing(GQA, "fwd", "cpu") == (
        "fast-transformers 0.4.0 has no GQA / MQA (k and v need q's H=4 heads, not H_kv=2)")
    assert ft.missing(DECODE, "fwd", "cpu") == (
        "fast-transformers 0.4.0 has no KV cache (its LocalAttention needs as many queries as "
        "keys, not Lq=1, Lk=256)")
    assert ft.missing(VARLEN, "fwd+bwd", "cpu") == (
        "fast-transformers 0.4.0 has no packed variable-length batches (cu_seqlens)")
    assert not ft.applies(DECODE.with_(dtype="bf16"), "cpu"), "bf16 stays outside its scope"


def test_flex_and_sdpa_get_enable_gqa_only_for_gqa_cases():
    sdpa = peers.IMPLS["sdpa"]
    assert sdpa.prepare(GQA, "cpu").keywords == {"is_causal": False, "enable_gqa": True}
    assert sdpa.prepare(GQA.with_(kv_heads=None), "cpu").keywords == {"is_causal": False}


class _GqaMapped(peers.Impl):
    """Local attention whose k, v are repeated to H heads by ``expand`` (a wrong GQA mapping or a
    dk, dv that miss some of a group's query heads): the check must catch each."""

    name = "gqa-mapped"

    def __init__(self, expand):
        self.expand = expand

    def prepare(self, case, device):
        def call(q, k, v):
            k, v = (self.expand(t, q.shape[1] // t.shape[1]) for t in (k, v))
            return local_attention_reference(q, k, v, case.window)

        return call


def _first_of_group_only(t, group):
    # Right values, but only each group's first query head sends gradient back to k and v.
    repeated = t.repeat_interleave(group, dim=1)
    first = (torch.arange(repeated.shape[1]) % group == 0).view(1, -1, 1, 1)
    return torch.where(first, repeated, repeated.detach())


def test_the_gqa_check_catches_a_wrong_head_mapping_and_a_wrong_group_sum():
    right = _GqaMapped(lambda t, group: t.repeat_interleave(group, dim=1))
    harness.check(right, right.prepare(GQA, "cpu"), GQA, "fwd+bwd", "cpu")
    # h % H_kv instead of h // (H // H_kv): query head 1 reads kv head 1
    tiled = _GqaMapped(lambda t, group: t.repeat(1, group, 1, 1))
    with pytest.raises(AssertionError, match=": out"):
        harness.check(tiled, tiled.prepare(GQA, "cpu"), GQA, "fwd", "cpu")
    partial = _GqaMapped(_first_of_group_only)
    harness.check(partial, partial.prepare(GQA, "cpu"), GQA, "fwd", "cpu")
    with pytest.raises(AssertionError, match="grad_k"):
        harness.check(partial, partial.prepare(GQA, "cpu"), GQA, "fwd+bwd", "cpu")


def test_a_shortened_check_keeps_a_gqa_group():
    sdpa = peers.Sdpa()
    sdpa.max_check_len = 128  # below the case's L = 256: the check runs a (1, 2 | 1, 128) case
    harness.check(sdpa, sdpa.prepare(GQA, "cpu"), GQA, "fwd+bwd", "cpu")


def test_flash_attention_4_gets_k_and_v_with_their_kv_heads(fake_fa4):
    fa4, case = peers.IMPLS["flash-attn-4"], GQA.with_(dtype="bf16", window=(63, 0))
    fn = fa4.prepare(case, "cpu")
    harness.check(fa4, fn, case, "fwd+bwd", "cpu")
    fn(*case.inputs("cpu"))
    assert fake_fa4[-1]["shape"] == (1, 256, 4, 32) and fake_fa4[-1]["kv_shape"] == (1, 256, 2, 32)


class _Misaligned(peers.Impl):
    """The reference, wrong in one way a KV cache or packed peer could be: ``mode`` "top-left"
    puts decode's queries at the first key positions (FlexAttention's and SDPA's own indices,
    without the offset); "across" attends over the packed rows as one sequence."""

    name = "misaligned"

    def __init__(self, mode):
        self.mode = mode

    def prepare(self, case, device):
        if self.mode == "top-left":
            def top_left(q, k, v):
                return local_attention_reference(q, k[:, :, :q.shape[2]], v[:, :, :q.shape[2]],
                                                 case.window)

            return top_left
        return functools.partial(local_attention_reference, window=case.window)


def test_the_check_catches_top_left_decode_and_attention_across_sequences():
    for impl, case in ((_Misaligned("top-left"), DECODE), (_Misaligned("across"), VARLEN)):
        with pytest.raises(AssertionError, match=": out"):
            harness.check(impl, impl.prepare(case, "cpu"), case, "fwd", "cpu")


def test_the_check_never_cuts_a_kv_cache_or_packed_case():
    sdpa = peers.Sdpa()
    sdpa.max_check_len = 16  # far below both cases' L
    assert sdpa.check_case(DECODE, heads=2) is DECODE
    assert sdpa.check_case(VARLEN, heads=2) is VARLEN
    assert sdpa.check_case(GQA, heads=2) == GQA.with_(heads=2, kv_heads=1, seq_len=16)


@pytest.mark.parametrize(("case", "direction"), [(DECODE, "fwd"), (VARLEN, "fwd+bwd")],
                         ids=["decode", "varlen"])
@pytest.mark.parametrize(("message", "reason"), [
    # As fastattn's CUDA build answers today: NotImplementedError naming the feature.
    ("fastattn: local_attention_varlen on CUDA has not been verified on a GPU yet",
     "fastattn: local_attention_varlen on CUDA has not been verified on a GPU yet"),
    ("not yet", "fastattn: not yet"),
])
def test_fastattn_is_skipped_with_its_kernels_reason_where_they_do_not_take_a_case(
        monkeypatch, case, direction, message, reason):
    def not_yet(*args, **kwargs):
        raise NotImplementedError(message + "\nException raised from ... (C++ frames)")

    fastattn_impl = peers.IMPLS["fastattn"]
    assert fastattn_impl.missing(case, direction, "cpu") is None, "the CPU kernels take it"
    monkeypatch.setattr(peers.fastattn, "local_attention", not_yet)
    monkeypatch.setattr(peers.fastattn, "local_attention_varlen", not_yet)
    assert fastattn_impl.missing(case, direction, "cpu") == reason
    # The plain cases do not probe: their kernels exist wherever the op does.
    assert fastattn_impl.missing(GQA, direction, "cpu") is None


def test_fastattn_gets_a_packed_batch_as_its_storage_with_cu_seqlens(monkeypatch):
    seen = {}
    real = peers.fastattn.local_attention_varlen

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, window):
        seen.update(ptrs=[t.data_ptr() for t in (q, k, v)], contiguous=q.is_contiguous(),
                    cu=(cu_q.tolist(), cu_k.tolist()), max=(max_q, max_k), window=window)
        return real(q, k, v, cu_q, cu_k, max_q, max_k, window)

    monkeypatch.setattr(peers.fastattn, "local_attention_varlen", spy)
    q, k, v = VARLEN.inputs("cpu")
    out = peers.IMPLS["fastattn"].prepare(VARLEN, "cpu")(q, k, v)
    assert out.shape == VARLEN.shape and seen["contiguous"]
    assert seen["ptrs"] == [t.data_ptr() for t in (q, k, v)], "views, not copies"
    assert seen["cu"] == (VARLEN.cu_seqlens, VARLEN.cu_seqlens)
    assert seen["max"] == (max(VARLEN.seq_lens),) * 2 and seen["window"] == VARLEN.window


def _visible(case):
    """(Lq, Lk) visibility of a (batch row of a) case, from fastattn's rule, by brute force."""
    left, right = case.window
    starts = case.cu_seqlens or [0, case.seq_len]
    rows = torch.zeros(case.q_len, case.seq_len, dtype=torch.bool)
    for lo, hi in itertools.pairwise(starts):
        keys, queries = hi - lo, case.q_len if case.seq_lens is None else hi - lo
        q_lo = 0 if case.seq_lens is None else lo
        for i in range(queries):
            position = i + (keys - queries)
            for j in range(max(0, position - left), min(keys, position + right + 1)):
                rows[q_lo + i, lo + j] = True
    return rows


@pytest.mark.parametrize("case", [DECODE, DECODE.with_(query_len=5), VARLEN, GQA],
                         ids=["decode", "chunk", "varlen", "plain"])
def test_flex_and_sdpa_masks_are_fastattns_visibility(case):
    q_idx = torch.arange(case.q_len).view(-1, 1)
    kv_idx = torch.arange(case.seq_len).view(1, -1)
    expected = _visible(case)
    assert torch.equal(peers.flex_mask_mod(case, "cpu")(0, 0, q_idx, kv_idx), expected)
    if case.query_len is not None:
        assert torch.equal(peers.sdpa_window_mask(case, "cpu"), expected)


def test_sdpa_takes_decodes_exact_mask_and_runs_packed_sequences_one_by_one(monkeypatch):
    sdpa = peers.IMPLS["sdpa"]
    call = sdpa.prepare(DECODE, "cpu")
    assert set(call.keywords) == {"attn_mask", "enable_gqa"}
    assert call.keywords["attn_mask"].shape == (1, 256)
    lengths = []
    real = peers.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        lengths.append((q.shape[2], kwargs["is_causal"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(peers.F, "scaled_dot_product_attention", spy)
    out = sdpa.prepare(VARLEN, "cpu")(*VARLEN.inputs("cpu"))
    assert out.shape == VARLEN.shape
    assert lengths == [(n, True) for n in VARLEN.seq_lens]


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_flash_attention_4_gets_a_packed_batch_as_its_storage_with_cu_seqlens(fake_fa4,
                                                                            direction):
    fa4, case = peers.IMPLS["flash-attn-4"], VARLEN.with_(dtype="bf16")
    fn = fa4.prepare(case, "cpu")
    harness.check(fa4, fn, case, direction, "cpu")
    q, k, v = case.inputs("cpu")
    fn(q, k, v)
    call = fake_fa4[-1]
    assert call["shape"] == (case.seq_len, 2, 32), "FA4's varlen takes (T, H, D)"
    assert call["ptrs"] == [t.data_ptr() for t in (q, k, v)], "the storage, not a copy"
    assert [c.tolist() for c in call["cu_seqlens"]] == [case.cu_seqlens] * 2
    assert call["max_seqlen"] == (max(case.seq_lens),) * 2 and call["window_size"] == (32, 0)


def test_flash_attention_4_decodes_bottom_right_and_compiles_only_the_forward(fake_fa4):
    fa4, case = peers.IMPLS["flash-attn-4"], DECODE.with_(dtype="bf16")
    fn = fa4.prepare(case, "cpu")
    assert [c["grad"] for c in fake_fa4] == [False], "forward only: no backward to compile"
    harness.check(fa4, fn, case, "fwd", "cpu")
    assert fake_fa4[-1]["shape"] == (2, 1, 4, 32) and fake_fa4[-1]["kv_shape"] == (2, 256, 2, 32)
    assert fake_fa4[-1]["window_size"] == (64, 0)


def test_flash_attention_4_without_a_varlen_function_skips_packed_cases(fake_fa4, monkeypatch):
    monkeypatch.delattr(sys.modules["flash_attn.cute"], "flash_attn_varlen_func")
    reason = peers.IMPLS["flash-attn-4"].missing(VARLEN.with_(dtype="bf16"), "fwd", "cuda")
    assert reason == "this flash-attn-4 has no flash_attn.cute.flash_attn_varlen_func"
