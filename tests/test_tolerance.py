"""The accuracy rule itself (tests/tolerance.py): what it lets through and what it catches."""

import pytest
import torch

from tests.tolerance import assert_close_to_reference


def _case(magnitude: float, kernel_error: float, reference_error: float = 1e-6):
    gold = torch.full((4, 8), magnitude, dtype=torch.float64)
    same = (gold + reference_error).float()
    actual = (gold + kernel_error).float()
    return actual, gold, same


def test_an_error_within_factor_and_floor_passes():
    assert_close_to_reference(*_case(1.0, 1e-5), factor=2.0, floor=1e-5)


def test_an_error_past_the_bound_fails_and_says_by_how_much():
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference(*_case(1.0, 5e-5), factor=2.0, floor=1e-5)


def test_the_floor_scales_with_the_reference_magnitude_above_one():
    # 4e-5 at |x| = 8 is a few float32 roundings; at |x| = 1 it is a real error.
    assert_close_to_reference(*_case(8.0, 4e-5), factor=2.0, floor=1e-5)
    with pytest.raises(AssertionError):
        assert_close_to_reference(*_case(1.0, 4e-5), factor=2.0, floor=1e-5)


def test_a_small_reference_keeps_the_whole_floor():
    assert_close_to_reference(*_case(1e-3, 1e-5), factor=2.0, floor=1e-5)


def test_nan_never_passes():
    actual, gold, same = _case(1.0, 0.0)
    actual[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_reference(actual, gold, same, floor=1.0)
