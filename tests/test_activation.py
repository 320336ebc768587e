"""ReLU and ReLU6 against the loop oracle, finite differences and PyTorch; bad input raises."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import assert_close, check_directional, check_grad
from kernels.activation import relu6_backward, relu6_forward, relu_backward, relu_forward
from oracles_misc import (import_torch, nhwc_cases, numba_threads, one_numba_thread,  # noqa: F401
                          relu6_backward_oracle, relu6_oracle, relu_backward_oracle, relu_oracle, with_layout)

# name: (forward, backward, forward oracle, backward oracle (from x), kinks to keep inputs away from)
OPS = {
    "relu": (relu_forward, relu_backward, relu_oracle, relu_backward_oracle, (0.0,)),
    "relu6": (relu6_forward, relu6_backward, relu6_oracle, relu6_backward_oracle, (0.0, 6.0)),
}


def make_input(shape, seed, kinks, dtype=np.float64):
    """Values spread over [-3, 9] (both sides of every kink) but at least 0.05 away from each kink."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3.0, 9.0, shape)
    for k in kinks:
        near = np.abs(x - k) < 0.05
        x[near] = k + np.where(x[near] >= k, 0.05, -0.05)
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


def reshape_case(shape, flat):
    return (shape[0], shape[1] * shape[2] * shape[3]) if flat else shape


@pytest.mark.parametrize("op", list(OPS))
@given(case=nhwc_cases(), flat=st.booleans())
def test_float64_matches_oracle_and_finite_differences(op, case, flat):
    forward, backward, oracle, backward_oracle, kinks = OPS[op]
    shape, seed, layout = case
    x, dy = make_input(reshape_case(shape, flat), seed, kinks)
    xv = with_layout(x, layout)
    y = forward(xv)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert_close(y, oracle(x), rtol=0, atol_floor=0, name="y")
    dx = backward(with_layout(dy, layout), with_layout(y, layout))
    assert_close(dx, backward_oracle(dy, x), rtol=0, atol_floor=0, name="dx")
    check_directional(lambda: forward(xv), xv, dy, dx, np.random.default_rng(seed), name="dx")
    if x.size <= 32 and layout == "contiguous":
        check_grad(lambda: forward(xv), xv, dy, dx, name="dx (full)")


@pytest.mark.parametrize("op", list(OPS))
@given(case=nhwc_cases(max_batch=2, max_channels=3, max_size=3))
def test_oracle_backward_matches_finite_differences(op, case):
    _, _, oracle, backward_oracle, kinks = OPS[op]
    shape, seed, _ = case
    x, dy = make_input(shape, seed, kinks)
    check_grad(lambda: oracle(x), x, dy, backward_oracle(dy, x), name="oracle dx")


@pytest.mark.parametrize("op", list(OPS))
@given(case=nhwc_cases())
def test_float32_matches_float64_oracle(op, case):
    forward, backward, oracle, backward_oracle, kinks = OPS[op]
    shape, seed, layout = case
    x, dy = make_input(shape, seed, kinks, dtype=np.float32)
    y = forward(with_layout(x, layout))
    assert y.dtype == np.float32
    assert_close(y, oracle(x), rtol=1e-7, name="y")  # exact: a copy or a constant
    dx = backward(with_layout(dy, layout), y)
    assert dx.dtype == np.float32
    assert_close(dx, backward_oracle(dy, x), rtol=1e-7, name="dx")


@pytest.mark.parametrize("op", list(OPS))
@given(case=nhwc_cases())
def test_matches_torch(op, case):
    torch = import_torch()
    forward, backward, _, _, kinks = OPS[op]
    shape, seed, layout = case
    x, dy = make_input(shape, seed, kinks)
    y = forward(with_layout(x, layout))
    dx = backward(dy, y)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NCHW
    torch_op = torch.nn.functional.relu if op == "relu" else (lambda t: torch.nn.functional.hardtanh(t, 0.0, 6.0))
    yt = torch_op(xt)
    (dxt,) = torch.autograd.grad(yt, xt, torch.tensor(dy.transpose(0, 3, 1, 2)))
    assert_close(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=0, atol_floor=0, name="y")
    assert_close(dx, dxt.numpy().transpose(0, 2, 3, 1), rtol=0, atol_floor=0, name="dx")
    if op == "relu6":
        assert_close(y, torch.nn.functional.relu6(torch.tensor(x)).numpy(), rtol=0, atol_floor=0, name="relu6")


@pytest.mark.parametrize("op", list(OPS))
def test_kinks_have_zero_gradient_and_nan_propagates(op):
    forward, backward, _, _, _ = OPS[op]
    x = np.array([-1.0, 0.0, 3.0, 6.0, 7.0, np.nan])
    y = forward(x)
    expected = {"relu": [0, 0, 3, 6, 7], "relu6": [0, 0, 3, 6, 6]}[op]
    np.testing.assert_array_equal(y[:5], expected)
    assert np.isnan(y[5])
    dx = backward(np.full(6, 2.0), y)
    expected_dx = {"relu": [0, 0, 2, 2, 2], "relu6": [0, 0, 2, 0, 0]}[op]
    np.testing.assert_array_equal(dx[:5], expected_dx)


@pytest.mark.parametrize("op", list(OPS))
def test_two_threads_match_oracle(op):
    """Large enough that both threads get rows: disjoint writes, no element skipped or repeated."""
    with numba_threads(2):
        forward, backward, _, _, kinks = OPS[op]
        x, dy = make_input((4, 33, 17, 40), 5, kinks, dtype=np.float32)
        y = forward(x)
        np.testing.assert_array_equal(y, np.clip(x, 0, 6 if op == "relu6" else None))
        upper = 6 if op == "relu6" else np.inf
        np.testing.assert_array_equal(backward(dy, y), np.where((x > 0) & (x < upper), dy, 0))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", ["int x", "list x", "empty x"])
def test_forward_rejects_bad_input(op, case):
    forward = OPS[op][0]
    bad = {"int x": np.ones((2, 3), np.int64), "list x": [[1.0, 2.0]], "empty x": np.ones((0, 3))}[case]
    with pytest.raises((TypeError, ValueError), match="x"):
        forward(bad)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case, name", [("shape", "y"), ("dtype", "y"), ("int dy", "dy")])
def test_backward_rejects_bad_input(op, case, name):
    backward = OPS[op][1]
    dy, y = np.ones((2, 3)), np.ones((2, 3))
    if case == "shape":
        y = np.ones((3, 2))
    elif case == "dtype":
        y = y.astype(np.float32)
    else:
        dy = dy.astype(np.int32)
    with pytest.raises((TypeError, ValueError), match=name):
        backward(dy, y)
