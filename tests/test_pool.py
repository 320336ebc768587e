"""Max, average and global average pooling against loop oracles, finite differences and PyTorch."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradcheck import assert_close, check_directional, check_grad
from kernels.geometry import conv_geometry
from kernels.pool import (avgpool_backward, avgpool_forward, global_avgpool_backward, global_avgpool_forward,
                          maxpool_backward, maxpool_forward)
from oracles_misc import (avgpool_backward_oracle, avgpool_oracle, global_avgpool_backward_oracle,  # noqa: F401
                          global_avgpool_oracle, import_torch, maxpool_backward_oracle, maxpool_oracle,
                          nhwc_cases, numba_threads, one_numba_thread, with_layout)


@st.composite
def pool_cases(draw, max_size=12):
    """(shape, seed, layout, kernel_size, stride or None, padding) with a geometry that fits."""
    shape, seed, layout = draw(nhwc_cases(max_size=max_size))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3)), st.integers(1, 3)))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same"]),
        st.tuples(st.integers(0, kh // 2), st.integers(0, kw // 2)),
        st.integers(0, min(kh, kw) // 2)))
    try:
        conv_geometry(shape[1], shape[2], (kh, kw), (kh, kw) if stride is None else stride, padding)
    except ValueError:
        assume(False)
    return shape, seed, layout, (kh, kw), stride, padding


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def resolved(kernel_size, stride, padding):
    """Oracle arguments: explicit stride and padding pairs (the oracle never sees the defaults)."""
    return pair(kernel_size), pair(kernel_size if stride is None else stride), padding if isinstance(padding, str) \
        else pair(padding)


def distinct_input(shape, seed, dtype=np.float64):
    """Tie-free values, 0.25 apart at least, so a 1e-6 perturbation never changes a max."""
    rng = np.random.default_rng(seed)
    x = (rng.permutation(int(np.prod(shape))).reshape(shape) - np.prod(shape) / 2) * 0.25
    return x.astype(dtype), rng


# ------------------------------------------------------------------------------------------------ max pool

@given(case=pool_cases())
def test_maxpool_float64_matches_oracle_and_finite_differences(case):
    shape, seed, layout, kernel_size, stride, padding = case
    x, rng = distinct_input(shape, seed)
    xv = with_layout(x, layout)
    y, argmax = maxpool_forward(xv, kernel_size=kernel_size, stride=stride, padding=padding)
    y_o, argmax_o = maxpool_oracle(x, *resolved(kernel_size, stride, padding))
    assert y.dtype == np.float64 and argmax.dtype == np.int32
    np.testing.assert_array_equal(y, y_o)
    np.testing.assert_array_equal(argmax, argmax_o)
    dy = rng.standard_normal(y.shape)
    dx = maxpool_backward(with_layout(dy, layout), with_layout(argmax, layout), x.shape)
    assert_close(dx, maxpool_backward_oracle(dy, argmax_o, x.shape), rtol=1e-12, name="dx")

    def f():
        return maxpool_forward(xv, kernel_size=kernel_size, stride=stride, padding=padding)[0]

    check_directional(f, xv, dy, dx, rng, name="dx")
    if x.size <= 48 and layout == "contiguous":
        check_grad(f, xv, dy, dx, name="dx (full)")


@given(case=pool_cases())
def test_maxpool_float32_matches_float64_oracle(case):
    shape, seed, layout, kernel_size, stride, padding = case
    x, rng = distinct_input(shape, seed, np.float32)  # multiples of 0.25 up to ~3500: exact in float32
    y, argmax = maxpool_forward(with_layout(x, layout), kernel_size=kernel_size, stride=stride, padding=padding)
    y_o, argmax_o = maxpool_oracle(x, *resolved(kernel_size, stride, padding))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y_o)
    np.testing.assert_array_equal(argmax, argmax_o)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = maxpool_backward(dy, argmax, x.shape)
    assert dx.dtype == np.float32
    assert_close(dx, maxpool_backward_oracle(dy, argmax_o, x.shape), rtol=1e-6, name="dx")


def test_maxpool_ties_pick_the_first_and_padding_never_wins():
    x = -np.ones((1, 2, 2, 1))  # all negative: zero padding would win if padding took part
    y, argmax = maxpool_forward(x, kernel_size=3, stride=1, padding=1)
    np.testing.assert_array_equal(y, -1.0)
    np.testing.assert_array_equal(argmax.reshape(2, 2), 0)  # ties: the first in row-major window order


# ------------------------------------------------------------------------------------------------ average pool

@given(case=pool_cases())
def test_avgpool_float64_matches_oracle_and_finite_differences(case):
    shape, seed, layout, kernel_size, stride, padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    xv = with_layout(x, layout)
    y = avgpool_forward(xv, kernel_size=kernel_size, stride=stride, padding=padding)
    args = resolved(kernel_size, stride, padding)
    assert y.dtype == np.float64
    assert_close(y, avgpool_oracle(x, *args), rtol=1e-12, name="y")
    dy = rng.standard_normal(y.shape)
    dx = avgpool_backward(with_layout(dy, layout), x.shape, kernel_size=kernel_size, stride=stride,
                          padding=padding)
    assert_close(dx, avgpool_backward_oracle(dy, x.shape, *args), rtol=1e-12, name="dx")

    def f():
        return avgpool_forward(xv, kernel_size=kernel_size, stride=stride, padding=padding)

    check_directional(f, xv, dy, dx, rng, name="dx")
    if x.size <= 48 and layout == "contiguous":
        check_grad(f, xv, dy, dx, name="dx (full)")


@given(case=pool_cases())
def test_avgpool_float32_matches_float64_oracle(case):
    shape, seed, layout, kernel_size, stride, padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    y = avgpool_forward(with_layout(x, layout), kernel_size=kernel_size, stride=stride, padding=padding)
    args = resolved(kernel_size, stride, padding)
    assert y.dtype == np.float32
    assert_close(y, avgpool_oracle(x, *args), rtol=1e-5, atol_floor=1e-6, name="y")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = avgpool_backward(dy, x.shape, kernel_size=kernel_size, stride=stride, padding=padding)
    assert dx.dtype == np.float32
    assert_close(dx, avgpool_backward_oracle(dy, x.shape, *args), rtol=1e-5, atol_floor=1e-6, name="dx")


@settings(max_examples=60)
@given(case=pool_cases(max_size=4))
def test_pool_oracle_backwards_match_finite_differences(case):
    shape, seed, _, kernel_size, stride, padding = case
    assume(int(np.prod(shape)) <= 48)
    args = resolved(kernel_size, stride, padding)
    x, rng = distinct_input(shape, seed)
    y, argmax = maxpool_oracle(x, *args)
    dy = rng.standard_normal(y.shape)
    check_grad(lambda: maxpool_oracle(x, *args)[0], x, dy, maxpool_backward_oracle(dy, argmax, x.shape),
               name="max oracle dx")
    check_grad(lambda: avgpool_oracle(x, *args), x, dy, avgpool_backward_oracle(dy, x.shape, *args),
               name="avg oracle dx")
    dy = rng.standard_normal((shape[0], shape[3]))
    check_grad(lambda: global_avgpool_oracle(x), x, dy, global_avgpool_backward_oracle(dy, x.shape),
               name="global oracle dx")


# ------------------------------------------------------------------------------------------------ global average

@given(case=nhwc_cases(), dtype=st.sampled_from([np.float64, np.float32]))
def test_global_avgpool_matches_oracle_mean_and_finite_differences(case, dtype):
    shape, seed, layout = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    xv = with_layout(x, layout)
    y = global_avgpool_forward(xv)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert y.dtype == dtype and y.shape == (shape[0], shape[3])
    assert_close(y, global_avgpool_oracle(x), rtol=rtol, name="y")
    assert_close(y, x.astype(np.float64).mean(axis=(1, 2)), rtol=rtol, name="y vs mean")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = global_avgpool_backward(with_layout(dy, layout), x.shape)
    assert dx.dtype == dtype
    assert_close(dx, global_avgpool_backward_oracle(dy, x.shape), rtol=rtol, name="dx")
    if dtype == np.float64:
        check_directional(lambda: global_avgpool_forward(xv), xv, dy, dx, rng, name="dx")


# ------------------------------------------------------------------------------------------------ PyTorch

def torch_pad_and_pool(torch, xt, kind, kernel_size, stride, padding, g):
    """PyTorch pooling of an NCHW tensor with our geometry: TF 'same' is asymmetric, so pad explicitly."""
    F = torch.nn.functional
    stride = pair(kernel_size if stride is None else stride)
    if isinstance(padding, str):
        pads = (g.pl, g.pr, g.pt, g.pb)
        if kind == "max":
            return F.max_pool2d(F.pad(xt, pads, value=-np.inf), kernel_size, stride, return_indices=False)
        # count_include_pad=False with asymmetric padding: sum over real elements / number of real elements
        total = F.avg_pool2d(F.pad(xt, pads), kernel_size, stride, divisor_override=1)
        count = F.avg_pool2d(F.pad(torch.ones_like(xt), pads), kernel_size, stride, divisor_override=1)
        return total / count
    if kind == "max":
        return F.max_pool2d(xt, kernel_size, stride, pair(padding))
    return F.avg_pool2d(xt, kernel_size, stride, pair(padding), count_include_pad=False)


@pytest.mark.parametrize("kind", ["max", "avg"])
@given(case=pool_cases())
def test_matches_torch(kind, case):
    torch = import_torch()
    shape, seed, layout, kernel_size, stride, padding = case
    x, rng = distinct_input(shape, seed)
    g = conv_geometry(shape[1], shape[2], kernel_size, kernel_size if stride is None else stride, padding)
    if kind == "max":
        y, argmax = maxpool_forward(with_layout(x, layout), kernel_size=kernel_size, stride=stride,
                                    padding=padding)
    else:
        y = avgpool_forward(with_layout(x, layout), kernel_size=kernel_size, stride=stride, padding=padding)
    dy = rng.standard_normal(y.shape)
    if kind == "max":
        dx = maxpool_backward(dy, argmax, x.shape)
    else:
        dx = avgpool_backward(dy, x.shape, kernel_size=kernel_size, stride=stride, padding=padding)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NCHW
    yt = torch_pad_and_pool(torch, xt, kind, kernel_size, stride, padding, g)
    (dxt,) = torch.autograd.grad(yt, xt, torch.tensor(dy.transpose(0, 3, 1, 2)))
    assert_close(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-12, name="y")
    assert_close(dx, dxt.numpy().transpose(0, 2, 3, 1), rtol=1e-12, name="dx")
    if kind == "max" and not isinstance(padding, str):  # PyTorch's indices are ours: ih * W + iw per plane
        _, idx = torch.nn.functional.max_pool2d(xt, kernel_size, pair(stride or kernel_size), pair(padding),
                                                return_indices=True)
        np.testing.assert_array_equal(argmax, idx.numpy().transpose(0, 2, 3, 1))


@given(case=nhwc_cases())
def test_global_avgpool_matches_torch(case):
    torch = import_torch()
    shape, seed, layout = case
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal((shape[0], shape[3]))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1).flatten(1)
    (dxt,) = torch.autograd.grad(yt, xt, torch.tensor(dy))
    assert_close(global_avgpool_forward(with_layout(x, layout)), yt.detach().numpy(), rtol=1e-12, name="y")
    assert_close(global_avgpool_backward(dy, x.shape), dxt.numpy().transpose(0, 2, 3, 1), rtol=1e-12, name="dx")


# ------------------------------------------------------------------------------------------------ two threads

@pytest.mark.parametrize("kernel_size, stride, padding", [(3, 2, "same"), (3, 1, 1), (2, 2, "valid")])
def test_two_threads_match_oracle(kernel_size, stride, padding):
    """Overlapping windows routed to one input from different outputs; rows and images split over threads."""
    with numba_threads(2):
        x, rng = distinct_input((3, 14, 11, 16), 9, np.float32)
        args = resolved(kernel_size, stride, padding)
        y, argmax = maxpool_forward(x, kernel_size=kernel_size, stride=stride, padding=padding)
        y_o, argmax_o = maxpool_oracle(x, *args)
        np.testing.assert_array_equal(y, y_o)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        assert_close(maxpool_backward(dy, argmax, x.shape), maxpool_backward_oracle(dy, argmax_o, x.shape),
                     rtol=1e-6, name="max dx")
        ya = avgpool_forward(x, kernel_size=kernel_size, stride=stride, padding=padding)
        assert_close(ya, avgpool_oracle(x, *args), rtol=1e-5, name="avg y")
        assert_close(avgpool_backward(dy, x.shape, kernel_size=kernel_size, stride=stride, padding=padding),
                     avgpool_backward_oracle(dy, x.shape, *args), rtol=1e-5, name="avg dx")
        assert_close(global_avgpool_forward(x), x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6, name="global")


# ------------------------------------------------------------------------------------------------ bad input

X = np.zeros((2, 5, 5, 3))

BAD_FORWARD = {
    "int x": (TypeError, "x", lambda f: f(X.astype(np.int32), kernel_size=2)),
    "3-D x": (ValueError, "x", lambda f: f(X[0], kernel_size=2)),
    "zero kernel_size": (ValueError, "kernel_size", lambda f: f(X, kernel_size=0)),
    "float kernel_size": (TypeError, "kernel_size", lambda f: f(X, kernel_size=2.0)),
    "zero stride": (ValueError, "stride", lambda f: f(X, kernel_size=2, stride=(1, 0))),
    "unknown padding": (ValueError, "padding", lambda f: f(X, kernel_size=2, padding="full")),
    "negative padding": (ValueError, "padding", lambda f: f(X, kernel_size=3, padding=-1)),
    "padding over half the window": (ValueError, "padding", lambda f: f(X, kernel_size=3, padding=2)),
    "window larger than input": (ValueError, "kernel", lambda f: f(X, kernel_size=6)),
}


@pytest.mark.parametrize("forward", [maxpool_forward, avgpool_forward], ids=["max", "avg"])
@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_input(forward, case):
    error, name, call = BAD_FORWARD[case]
    with pytest.raises(error, match=name):
        call(forward)


def test_global_avgpool_rejects_bad_input():
    with pytest.raises(ValueError, match="x"):
        global_avgpool_forward(X[0])
    with pytest.raises(ValueError, match="dy"):
        global_avgpool_backward(np.zeros((2, 4)), X.shape)


def _max_case():
    y, argmax = maxpool_forward(X, kernel_size=2)
    return np.ones_like(y), argmax


@pytest.mark.parametrize("case, error, name", [
    ("argmax dtype", TypeError, "argmax"), ("argmax shape", ValueError, "argmax"),
    ("argmax out of range", ValueError, "argmax"), ("x_shape length", ValueError, "x_shape"),
    ("x_shape channels", ValueError, "x_shape"), ("dy rank", ValueError, "dy")])
def test_maxpool_backward_rejects_bad_input(case, error, name):
    dy, argmax = _max_case()
    x_shape = X.shape
    if case == "argmax dtype":
        argmax = argmax.astype(np.int64)
    elif case == "argmax shape":
        argmax = argmax[:, :1]
    elif case == "argmax out of range":
        argmax = argmax + 25
    elif case == "x_shape length":
        x_shape = X.shape[1:]
    elif case == "x_shape channels":
        x_shape = X.shape[:3] + (4,)
    else:
        dy = dy[0]
    with pytest.raises(error, match=name):
        maxpool_backward(dy, argmax, x_shape)


def test_avgpool_backward_rejects_dy_that_does_not_match_the_geometry():
    with pytest.raises(ValueError, match="dy"):
        avgpool_backward(np.ones((2, 3, 3, 3)), X.shape, kernel_size=2)
