"""Linear layer against the loop oracle, a plain matmul, finite differences and PyTorch; bad input raises."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck import assert_close, check_directional, check_grad
from kernels.linear import linear_backward_bias, linear_backward_input, linear_backward_weight, linear_forward
from oracles_misc import import_torch, linear_backward_oracle, linear_oracle, one_numba_thread  # noqa: F401


@st.composite
def linear_cases(draw, max_n=8, max_c=16, max_k=10):
    """(N, C, K, seed, layout, with_bias); 'strided' and 'transposed' make x, w and dy non-contiguous views."""
    return (draw(st.integers(1, max_n)), draw(st.integers(1, max_c)), draw(st.integers(1, max_k)),
            draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from(["contiguous", "strided", "transposed"])),
            draw(st.booleans()))


def make_case(n, c, k, seed, layout, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x, w, b, dy = (rng.standard_normal(s).astype(dtype) for s in ((n, c), (c, k), (k,), (n, k)))
    if layout == "strided":
        views = [np.repeat(a, 2, axis=1)[:, ::2] for a in (x, w, dy)]
    elif layout == "transposed":
        views = [np.asfortranarray(a) for a in (x, w, dy)]
    else:
        views = [x, w, dy]
    return x, w, b, dy, views


@given(case=linear_cases())
def test_float64_matches_oracle_matmul_and_finite_differences(case):
    n, c, k, seed, layout, with_bias = case
    x, w, b, dy, (xv, wv, dyv) = make_case(n, c, k, seed, layout)
    bias = b if with_bias else None
    y = linear_forward(xv, wv, bias)
    assert y.dtype == np.float64 and y.shape == (n, k)
    assert_close(y, linear_oracle(x, w, bias), rtol=1e-12, name="y")
    assert_close(y, x @ w + (b if with_bias else 0), rtol=1e-12, name="y vs matmul")
    dx, dw, db = linear_backward_input(dyv, wv), linear_backward_weight(dyv, xv), linear_backward_bias(dyv)
    dx_o, dw_o, db_o = linear_backward_oracle(dy, x, w)
    assert_close(dx, dx_o, rtol=1e-12, name="dx")
    assert_close(dw, dw_o, rtol=1e-12, name="dw")
    assert_close(db, db_o, rtol=1e-12, name="db")
    rng = np.random.default_rng(seed + 1)

    def f():
        return linear_forward(xv, wv, b)

    check_directional(f, xv, dy, dx, rng, name="dx")
    check_directional(f, wv, dy, dw, rng, name="dw")
    check_directional(f, b, dy, db, rng, name="db")


@settings(max_examples=40)
@given(case=linear_cases(max_n=3, max_c=4, max_k=3))
def test_oracle_backward_matches_finite_differences(case):
    n, c, k, seed, _, _ = case
    x, w, b, dy, _ = make_case(n, c, k, seed, "contiguous")
    dx, dw, db = linear_backward_oracle(dy, x, w)
    check_grad(lambda: linear_oracle(x, w, b), x, dy, dx, name="oracle dx")
    check_grad(lambda: linear_oracle(x, w, b), w, dy, dw, name="oracle dw")
    check_grad(lambda: linear_oracle(x, w, b), b, dy, db, name="oracle db")


@given(case=linear_cases())
def test_float32_matches_float64_oracle(case):
    n, c, k, seed, layout, _ = case
    x, w, b, dy, (xv, wv, dyv) = make_case(n, c, k, seed, layout, np.float32)
    y = linear_forward(xv, wv, b)
    assert y.dtype == np.float32
    assert_close(y, linear_oracle(x, w, b), rtol=1e-5, atol_floor=1e-6, name="y")
    dx_o, dw_o, db_o = linear_backward_oracle(dy, x, w)
    for got, want, name in ((linear_backward_input(dyv, wv), dx_o, "dx"), (linear_backward_weight(dyv, xv), dw_o, "dw"),
                            (linear_backward_bias(dyv), db_o, "db")):
        assert got.dtype == np.float32
        assert_close(got, want, rtol=1e-5, atol_floor=1e-6, name=name)


@given(case=linear_cases())
def test_matches_torch(case):
    torch = import_torch()
    n, c, k, seed, layout, _ = case
    x, w, b, dy, (xv, wv, dyv) = make_case(n, c, k, seed, layout)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.linear(xt, wt.T, bt)  # PyTorch stores the weight (K, C)
    grads = torch.autograd.grad(yt, (xt, wt, bt), torch.tensor(dy))
    assert_close(linear_forward(xv, wv, b), yt.detach().numpy(), rtol=1e-12, name="y")
    assert_close(linear_backward_input(dyv, wv), grads[0].numpy(), rtol=1e-12, name="dx")
    assert_close(linear_backward_weight(dyv, xv), grads[1].numpy(), rtol=1e-12, name="dw")
    assert_close(linear_backward_bias(dyv), grads[2].numpy(), rtol=1e-12, name="db")


X, W, B, DY = np.ones((4, 3)), np.ones((3, 5)), np.ones(5), np.ones((4, 5))


@pytest.mark.parametrize("args, error, name", [
    ((X[0], W), ValueError, "x"), ((X.astype(np.int32), W), TypeError, "x"), ((X, W[:2]), ValueError, "w"),
    ((X, W[None]), ValueError, "w"), ((X, W, B[:4]), ValueError, "b"), ((X, W.astype(np.float32)), TypeError, "w"),
    ((X, W, B.astype(np.float32)), TypeError, "b"), ((X, W, B[None]), ValueError, "b")])
def test_forward_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=name):
        linear_forward(*args)


@pytest.mark.parametrize("call, error, name", [
    (lambda: linear_backward_input(DY[:, :4], W), ValueError, "w"),
    (lambda: linear_backward_input(DY, W.astype(np.float32)), TypeError, "w"),
    (lambda: linear_backward_weight(DY, X[:3]), ValueError, "x"),
    (lambda: linear_backward_weight(DY[0], X), ValueError, "dy"),
    (lambda: linear_backward_bias(DY.astype(np.int64)), TypeError, "dy")])
def test_backward_rejects_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()
