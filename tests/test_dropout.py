"""Inverted dropout: reproducible masks, the right keep rate and scale, backward = dy * mask; bad input raises."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import check_directional
from kernels.dropout import dropout_backward, dropout_forward
from oracles_misc import nhwc_cases, numba_threads, one_numba_thread, with_layout  # noqa: F401

RATES = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9])


@given(case=nhwc_cases(), rate=RATES, dtype=st.sampled_from([np.float32, np.float64]))
def test_mask_values_output_and_backward(case, rate, dtype):
    shape, seed, layout = case
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    y, mask = dropout_forward(with_layout(x, layout), rate=rate, rng=np.random.default_rng(seed))
    assert y.dtype == mask.dtype == dtype and y.shape == mask.shape == x.shape
    scale = dtype(1.0 / (1.0 - rate))
    assert np.all((mask == 0) | (mask == scale))
    np.testing.assert_array_equal(y, x * mask)
    y2, mask2 = dropout_forward(x, rate=rate, rng=np.random.default_rng(seed))  # same seed, same mask
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(y2, y)
    dx = dropout_backward(with_layout(dy, layout), with_layout(mask, layout))
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, dy * mask)
    if dtype == np.float64:
        xv = with_layout(x, layout)
        check_directional(lambda: dropout_forward(xv, rate=rate, rng=np.random.default_rng(seed))[0], xv, dy, dx,
                          rng, name="dx")


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_keep_rate_and_mean_are_preserved(rate):
    """Large sample on two threads: keep fraction 1 - rate and E[y] = E[x] within 6 standard errors."""
    with numba_threads(2):
        x = np.random.default_rng(1).uniform(1.0, 3.0, (16, 32, 32, 8)).astype(np.float32)
        y, mask = dropout_forward(x, rate=rate, rng=np.random.default_rng(2))
        n = x.size
        kept = np.count_nonzero(mask) / n
        assert abs(kept - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / n)
        assert abs(y.mean(dtype=np.float64) - x.mean(dtype=np.float64)) < 6 * y.std(dtype=np.float64) / np.sqrt(n)
        np.testing.assert_array_equal(y, x * mask)


def test_different_seeds_give_different_masks():
    x = np.ones((4, 8, 8, 16))
    _, a = dropout_forward(x, rate=0.5, rng=np.random.default_rng(0))
    _, b = dropout_forward(x, rate=0.5, rng=np.random.default_rng(1))
    assert not np.array_equal(a, b)


def test_successive_calls_advance_the_generator():
    rng = np.random.default_rng(0)
    x = np.ones((4, 8, 8, 16))
    _, a = dropout_forward(x, rate=0.5, rng=rng)
    _, b = dropout_forward(x, rate=0.5, rng=rng)
    assert not np.array_equal(a, b)


def test_rate_zero_copies_and_leaves_the_generator_alone():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    x = np.random.default_rng(1).standard_normal((2, 3, 3, 4)).astype(np.float32)
    y, mask = dropout_forward(x, rate=0.0, rng=rng)
    np.testing.assert_array_equal(y, x)
    assert y is not x and not np.shares_memory(y, x)
    np.testing.assert_array_equal(mask, 1.0)
    assert mask.dtype == np.float32
    assert rng.bit_generator.state == state


X = np.ones((2, 4))


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(rate=1.0), ValueError, "rate"), (dict(rate=-0.1), ValueError, "rate"),
    (dict(rate="0.5"), TypeError, "rate"), (dict(rate=True), TypeError, "rate"),
    (dict(rate=0.5, rng=0), TypeError, "rng"), (dict(rate=0.5, rng=np.random.RandomState(0)), TypeError, "rng"),
    (dict(rate=0.5, x=X.astype(np.int32)), TypeError, "x"), (dict(rate=0.5, x=np.ones((0, 4))), ValueError, "x")])
def test_forward_rejects_bad_input(kwargs, error, name):
    kwargs = dict(dict(x=X, rng=np.random.default_rng(0)), **kwargs)
    x = kwargs.pop("x")
    with pytest.raises(error, match=name):
        dropout_forward(x, **kwargs)


@pytest.mark.parametrize("mask, error, name", [
    (np.ones((4, 2)), ValueError, "mask"), (np.ones((2, 4), np.float32), TypeError, "mask"),
    (np.ones((2, 4), np.int64), TypeError, "mask")])
def test_backward_rejects_bad_input(mask, error, name):
    with pytest.raises(error, match=name):
        dropout_backward(X, mask)
