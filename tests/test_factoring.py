import pytest

from adafactor import FactorDims, factor_dims


@pytest.mark.parametrize(
    ("shape", "policy", "min_size", "expected"),
    [
        ((), "last2", 0, None),
        ((7,), "last2", 0, None),
        ((1, 7), "last2", 0, (0, 1)),
        ((16, 4, 8), "last2", 0, (1, 2)),
        ((8, 4, 3, 3), "last2", 0, (2, 3)),
        ((16, 4, 8), "largest2", 0, (0, 2)),
        ((8, 4, 3, 3), "largest2", 0, (0, 1)),
        ((64, 64), "largest2", 0, (0, 1)),
        ((3, 5, 5), "largest2", 0, (1, 2)),  # ties: the later dims
        ((12, 6, 6), "largest2", 0, (0, 2)),  # optax's argsort
        ((12, 6, 6), "largest2_first", 0, (0, 1)),  # Mesh TF's stable sort
        ((6, 6, 6), "largest2_first", 0, (0, 1)),
        ((6, 6, 6), "largest2", 0, (1, 2)),
        ((64, 128), "largest2", 128, None),  # optax: the second largest must reach 128
        ((128, 512), "largest2", 128, (0, 1)),
        ((16, 1024), "last2", 16, (0, 1)),
        ((15, 1024), "last2", 16, None),
        ((16, 4, 8), "matrix", 0, None),
        ((5, 3), "matrix", 0, (0, 1)),
    ],
)
def test_factor_dims(shape, policy, min_size, expected):
    got = factor_dims(shape, policy, min_size)
    assert got == (None if expected is None else FactorDims(*expected))


def test_unfactored_flag_wins():
    assert factor_dims((64, 64), "last2", 0, factored=False) is None


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match=r"factor_dims='first2' is not a factoring policy"):
        factor_dims((4, 4), "first2")
