"""The shared argument checks: one message form, wrong types and NaN refused like wrong values."""

import math

import numpy as np
import pytest

from lightning_curvature.checks import (
    ArgumentError,
    check_bool,
    check_choice,
    check_float,
    check_index_list,
    check_int,
    check_seed,
)


def test_argument_error_is_value_and_type_error():
    assert issubclass(ArgumentError, ValueError)
    assert issubclass(ArgumentError, TypeError)


@pytest.mark.parametrize("bad", [1.5, "3", True, None, 2.0])
def test_check_int_refuses_non_integers(bad):
    with pytest.raises(ArgumentError, match=r"^`n` must be an integer >= 1, got "):
        check_int("n", bad, minimum=1)


def test_check_int_accepts_numpy_and_bounds():
    assert check_int("n", np.int64(3), minimum=1) == 3
    assert type(check_int("n", np.int64(3), minimum=1)) is int
    assert check_int("n", None, minimum=1, allow_none=True) is None
    with pytest.raises(ArgumentError, match=r"in \[1, 4\], got 5"):
        check_int("n", 5, minimum=1, maximum=4)


@pytest.mark.parametrize("bad", [math.nan, "1e-4", math.inf, 0.0, -1, True])
def test_check_float_refuses(bad):
    with pytest.raises(ArgumentError, match=r"^`step_size` must be a finite number in \(0, inf\)"):
        check_float("step_size", bad, low=0.0, low_open=True)


def test_check_float_values_and_inf():
    assert check_float("x", 3, low=0) == 3.0
    assert check_float("x", np.float32(0.5), low=0, high=1) == 0.5
    assert check_float("x", math.inf, low=0, allow_inf=True) == math.inf
    with pytest.raises(ArgumentError, match=r"\[0, 1\)"):
        check_float("x", 1.0, low=0, high=1, high_open=True)


def test_bool_choice_seed_indices():
    assert check_bool("flag", False) is False
    with pytest.raises(ArgumentError, match="True or False, got 1"):
        check_bool("flag", 1)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ArgumentError, match="one of 'a', 'b', got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    assert check_seed("seed", 7) == 7
    with pytest.raises(ArgumentError, match="`seed` must be an integer"):
        check_seed("seed", 1.5)
    assert check_index_list("idx", [0, 2]) == [0, 2]
    with pytest.raises(ArgumentError, match="non-empty sequence"):
        check_index_list("idx", [])
    with pytest.raises(ArgumentError, match="distinct"):
        check_index_list("idx", [1, 1])
    with pytest.raises(ArgumentError, match=r"`idx\[1\]` must be an integer >= 0"):
        check_index_list("idx", [1, -1])
