"""kernels.pointwise against its loop oracle, finite differences, a matmul, a 1x1 conv2d and PyTorch; bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oracles_conv as oracle
from gradcheck import assert_close, check_directional, check_grad
from kernels.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from kernels.pointwise import (pointwise_backward_bias, pointwise_backward_input, pointwise_backward_weight,
                               pointwise_forward)

FULL_CHECK_MAX = 80  # x.size + w.size up to which every coordinate is checked by finite differences


@st.composite
def pointwise_cases(draw):
    return dict(N=draw(st.integers(1, 4)), H=draw(st.integers(1, 12)), W=draw(st.integers(1, 12)),
                C=draw(st.integers(1, 8)), K=draw(st.integers(1, 8)), seed=draw(st.integers(0, 2 ** 32 - 1)),
                layout=draw(st.sampled_from(oracle.LAYOUTS)), bias=draw(st.booleans()))


def _inputs(case):
    """float64 inputs whose values are exactly representable in float32, so one float64 oracle serves both."""
    rng = np.random.default_rng(case["seed"])
    x = oracle.make_array(rng, (case["N"], case["H"], case["W"], case["C"]), case["layout"]).astype(np.float32)
    w = oracle.make_array(rng, (case["C"], case["K"]), case["layout"]).astype(np.float32)
    b = rng.standard_normal(case["K"]).astype(np.float32) if case["bias"] else None
    dy = rng.standard_normal((case["N"], case["H"], case["W"], case["K"])).astype(np.float32)
    as64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    return rng, as64(x), as64(w), as64(b), as64(dy)


def test_oracle_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 2, 3)), rng.standard_normal((3, 4)), rng.standard_normal(4)
    f = lambda: oracle.pointwise_forward(x, w, b)  # noqa: E731
    dy = rng.standard_normal(f().shape)
    check_grad(f, x, dy, oracle.pointwise_backward_input(dy, w), name="dx")
    check_grad(f, w, dy, oracle.pointwise_backward_weight(dy, x), name="dw")
    check_grad(f, b, dy, oracle.conv2d_backward_bias(dy), name="db")


@given(pointwise_cases())
def test_matches_oracle_and_finite_differences(case):
    """float64 equals the oracle tightly and its gradients equal finite differences; float32 is within 1e-4."""
    rng, x, w, b, dy = _inputs(case)
    want = dict(y=oracle.pointwise_forward(x, w, b), dx=oracle.pointwise_backward_input(dy, w),
                dw=oracle.pointwise_backward_weight(dy, x), db=oracle.conv2d_backward_bias(dy))
    for dtype, rtol, floor in ((np.float64, 1e-12, 1e-12), (np.float32, 1e-4, 1e-5)):
        xd, wd, dyd = (a.astype(dtype) for a in (x, w, dy))
        bd = None if b is None else b.astype(dtype)
        got = dict(y=pointwise_forward(xd, wd, bd), dx=pointwise_backward_input(dyd, wd),
                   dw=pointwise_backward_weight(dyd, xd), db=pointwise_backward_bias(dyd))
        for name, value in got.items():
            assert value.dtype == dtype, name
            assert_close(value, want[name], rtol=rtol, atol_floor=floor, name=f"{name} {np.dtype(dtype)}")

    f = lambda: pointwise_forward(x, w, b)  # noqa: E731
    check_directional(f, x, dy, want["dx"], rng, name="dx")
    check_directional(f, w, dy, want["dw"], rng, name="dw")
    if x.size + w.size <= FULL_CHECK_MAX:
        x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
        check_grad(f, x, dy, want["dx"], name="dx")
        check_grad(f, w, dy, want["dw"], name="dw")
        if b is not None:
            check_grad(f, b, dy, want["db"], name="db")


@given(pointwise_cases())
def test_equals_matmul_and_1x1_conv2d(case):
    _, x, w, b, dy = _inputs(case)
    y = pointwise_forward(x, w, b)
    dx, dw = pointwise_backward_input(dy, w), pointwise_backward_weight(dy, x)
    assert_close(y, np.einsum("nhwc,ck->nhwk", x, w) + (0 if b is None else b), rtol=1e-12, name="y matmul")
    w4 = w.reshape(1, 1, *w.shape)  # (1, 1, C, K)
    with oracle.one_numba_thread():
        assert_close(y, conv2d_forward(x, w4, b), rtol=1e-12, name="y conv2d")
        assert_close(dx, conv2d_backward_input(dy, w4, x.shape), rtol=1e-12, name="dx conv2d")
        assert_close(dw, conv2d_backward_weight(dy, x, w4.shape)[0, 0], rtol=1e-12, name="dw conv2d")


@given(pointwise_cases())
def test_matches_torch(case):
    pytest.importorskip("torch")
    _, x, w, b, dy = _inputs(case)
    ty, tdx, tdw, tdb = oracle.torch_conv(x, w.T[:, :, None, None], b, dy, stride=1, padding="valid", groups=1)
    assert_close(pointwise_forward(x, w, b), ty, rtol=1e-12, name="y")
    assert_close(pointwise_backward_input(dy, w), tdx, rtol=1e-12, name="dx")
    assert_close(pointwise_backward_weight(dy, x), tdw[:, :, 0, 0].T, rtol=1e-12, name="dw")
    if b is not None:
        assert_close(pointwise_backward_bias(dy), tdb, rtol=1e-12, name="db")


def test_out_buffers_are_written_and_returned():
    rng = np.random.default_rng(2)
    x, w, dy = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((5, 6)), rng.standard_normal((2, 3, 4, 6))
    y, dx, dw = np.empty((2, 3, 4, 6)), np.empty((2, 3, 4, 5)), np.empty((5, 6))
    assert pointwise_forward(x, w, out=y) is y
    assert pointwise_backward_input(dy, w, out=dx) is dx
    assert pointwise_backward_weight(dy, x, out=dw) is dw
    assert_close(y, oracle.pointwise_forward(x, w), rtol=1e-12, name="y")
    assert_close(dx, oracle.pointwise_backward_input(dy, w), rtol=1e-12, name="dx")
    assert_close(dw, oracle.pointwise_backward_weight(dy, x), rtol=1e-12, name="dw")


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
@pytest.mark.parametrize("channels", [1, 31, 32, 33, 64])
def test_weight_gradient_on_both_sides_of_the_swapped_product(channels, layout):
    """Up to 32 input channels (``swaps_weight_product``) dw is computed as (dy.T @ x).T, above as x.T @ dy: both equal
    the oracle, with and without ``out``, in both dtypes, and return a C-contiguous (C, K) array."""
    from kernels.pointwise import swaps_weight_product
    assert swaps_weight_product(31) and not swaps_weight_product(33)  # the parametrization straddles the threshold
    rng = np.random.default_rng(channels)
    x = oracle.make_array(rng, (3, 5, 7, channels), layout)
    dy = oracle.make_array(rng, (3, 5, 7, 12), layout)
    want = oracle.pointwise_backward_weight(dy, x)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        xd, dyd = x.astype(dtype), dy.astype(dtype)
        got = pointwise_backward_weight(dyd, xd)
        assert got.shape == (channels, 12) and got.dtype == dtype and got.flags.c_contiguous
        assert_close(got, want, rtol=rtol, atol_floor=1e-6, name=f"dw {np.dtype(dtype)}")
        out = np.full((channels, 12), np.nan, dtype)
        assert pointwise_backward_weight(dyd, xd, out=out) is out
        np.testing.assert_array_equal(out, got)


# ---- bad input: each raises before any BLAS call, naming the argument ----

X = np.zeros((2, 3, 3, 4))
W = np.zeros((4, 5))
DY = np.zeros((2, 3, 3, 5))


@pytest.mark.parametrize("call, error, names", [
    (lambda: pointwise_forward(X[0], W), ValueError, ["x", "(N, H, W, C)"]),
    (lambda: pointwise_forward(X, W[None]), ValueError, ["w", "(C, K)"]),
    (lambda: pointwise_forward(X, np.zeros((3, 5))), ValueError, ["w", "C=4"]),
    (lambda: pointwise_forward(X.astype(np.int64), W), TypeError, ["x", "int64"]),
    (lambda: pointwise_forward(X, W.astype(np.float32)), TypeError, ["x=float64", "w=float32"]),
    (lambda: pointwise_forward(X, W, np.zeros(4)), ValueError, ["b", "(5,)"]),
    (lambda: pointwise_forward(X, W, np.zeros(5, np.float32)), TypeError, ["b=float32"]),
    (lambda: pointwise_forward(X, W, out=np.zeros((2, 3, 3, 4))), ValueError, ["out", "(2, 3, 3, 5)"]),
    (lambda: pointwise_forward(X, W, out=np.zeros((2, 3, 3, 5), np.float32)), TypeError, ["out", "float64"]),
    (lambda: pointwise_forward(X, W, out=np.zeros((2, 3, 3, 10))[..., ::2]), ValueError, ["out", "contiguous"]),
    (lambda: pointwise_backward_input(DY, np.zeros((4, 6))), ValueError, ["w", "K=5"]),
    (lambda: pointwise_backward_input(DY.astype(np.float32), W), TypeError, ["dy=float32", "w=float64"]),
    (lambda: pointwise_backward_input(DY, W, out=np.zeros((4, 5))), ValueError, ["out", "(2, 3, 3, 4)"]),
    (lambda: pointwise_backward_weight(DY[:, :2], X), ValueError, ["dy", "(2, 3, 3)"]),
    (lambda: pointwise_backward_weight(DY, X.astype(np.float32)), TypeError, ["dy=float64", "x=float32"]),
    (lambda: pointwise_backward_weight(DY, X, out=np.zeros((5, 4))), ValueError, ["out", "(4, 5)"]),
    (lambda: pointwise_backward_bias(DY[0]), ValueError, ["dy"]),
    (lambda: pointwise_backward_bias(DY.astype(np.int8)), TypeError, ["dy", "int8"]),
])
def test_bad_input_raises_naming_the_argument(call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value)
