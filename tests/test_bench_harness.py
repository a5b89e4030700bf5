"""The benchmark harness refuses what must not be timed: a wrong implementation, and
FlexAttention's unfused fallback."""

import functools

import pytest
import torch

from bench import harness, peers
from fastattn.perf.cases import Case
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
