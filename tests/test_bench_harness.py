"""The benchmark harness refuses what must not be timed: a wrong implementation, and
FlexAttention's unfused fallback; the peers say why they cannot run a case."""

import functools
import sys
import types

import pytest
import torch

from bench import harness, peers
from fastattn.perf.cases import Case, case_set
from fastattn.reference import local_attention_reference

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


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash_attn.cute with FA4's contract, computed by the reference: q, k, v and out
    (B, L, H, D), window_size sides inclusive or None (unbounded), returns (out, lse). It records
    what each call received."""
    calls = []

    def flash_attn_func(q, k, v, window_size=(None, None)):
        calls.append({"ptrs": [t.data_ptr() for t in (q, k, v)], "shape": tuple(q.shape),
                      "kv_shape": tuple(k.shape), "grad": q.requires_grad,
                      "window_size": window_size})
        assert all(t.stride(-1) == 1 for t in (q, k, v))
        assert all(side is None or side >= 0 for side in window_size)
        length = q.shape[1]
        window = tuple(length if side is None else side for side in window_size)
        out, lse = local_attention_reference(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), window, return_lse=True)
        return out.transpose(1, 2).contiguous(), lse

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func, package.cute = flash_attn_func, cute
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


GQA = next(c for c in case_set("smoke") if c.kv_heads)  # (1, 4 | 2, 256, 32), fp32, (32, 32)
CPU_PEERS = ("fastattn", "flex", "sdpa", "reference")


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", CPU_PEERS)
def test_the_smoke_gqa_case_runs_through_each_cpu_peer(name, direction):
    impl = peers.IMPLS[name]
    assert impl.applies(GQA, "cpu")
    reason = impl.missing(GQA, direction, "cpu")
    if reason:  # FlexAttention's backward on a CPU: the one reason expected here
        assert (name, direction) == ("flex", "fwd+bwd"), reason
        assert reason == "FlexAttention has no backward on CPU"
        pytest.skip(reason)
    fn = impl.prepare(GQA, "cpu")
    harness.check(impl, fn, GQA, direction, "cpu")  # out and dq, dk, dv against float64
    result = harness.make_call(fn, GQA, direction, "cpu")()
    if direction == "fwd":
        assert result.shape == GQA.shape
    else:
        assert [g.shape for g in result] == [GQA.shape, GQA.kv_shape, GQA.kv_shape]


def test_fast_transformers_skips_gqa_with_the_reason():
    ft = peers.IMPLS["fast-transformers"]
    assert ft.applies(GQA, "cpu"), "generated, so that its skip is reported, not silent"
    assert ft.missing(GQA, "fwd", "cpu") == (
        "fast-transformers 0.4.0 has no GQA / MQA (k and v need q's H=4 heads, not H_kv=2)")


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
