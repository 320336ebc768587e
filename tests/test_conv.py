"""kernels.conv: standard convolution against its loop oracle, finite differences and PyTorch; bad input."""
import contextlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import oracles_conv as oracle
from oracles_misc import numba_threads
from gradcheck import assert_close, check_directional, check_grad
from kernels import conv
from kernels.conv import conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight, conv2d_forward, im2col

FULL_CHECK_MAX = 80  # x.size + w.size up to which every coordinate is checked by finite differences


def _inputs(case):
    """float64 inputs whose values are exactly representable in float32, so one float64 oracle serves both."""
    rng = np.random.default_rng(case["seed"])
    x = oracle.make_array(rng, (case["N"], case["H"], case["W"], case["C"]), case["layout"]).astype(np.float32)
    w = oracle.make_array(rng, (case["KH"], case["KW"], case["C"], case["K"]), case["layout"]).astype(np.float32)
    b = rng.standard_normal(case["K"]).astype(np.float32)
    return rng, x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize("stride, padding", [(1, "valid"), (2, "same"), ((1, 2), 1), (3, (2, 0))])
def test_oracle_backward_matches_finite_differences(stride, padding):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 5, 4, 2)), rng.standard_normal((3, 2, 2, 3)), rng.standard_normal(3)
    f = lambda: oracle.conv2d_forward(x, w, b, stride, padding)  # noqa: E731
    dy = rng.standard_normal(f().shape)
    check_grad(f, x, dy, oracle.conv2d_backward_input(dy, w, x.shape, stride, padding), name="dx")
    check_grad(f, w, dy, oracle.conv2d_backward_weight(dy, x, w.shape, stride, padding), name="dw")
    check_grad(f, b, dy, oracle.conv2d_backward_bias(dy), name="db")


@given(oracle.window_cases())
def test_matches_oracle_and_finite_differences(case):
    """float64 equals the oracle tightly and its gradients equal finite differences; float32 is within 1e-4."""
    rng, x, w, b = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    y = oracle.conv2d_forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(np.float32).astype(np.float64)
    want = dict(y=y, dx=oracle.conv2d_backward_input(dy, w, x.shape, **kw),
                dw=oracle.conv2d_backward_weight(dy, x, w.shape, **kw), db=oracle.conv2d_backward_bias(dy))
    for dtype, rtol, floor in ((np.float64, 1e-12, 1e-12), (np.float32, 1e-4, 1e-5)):
        xd, wd, bd, dyd = (a.astype(dtype) for a in (x, w, b, dy))
        got = dict(y=conv2d_forward(xd, wd, bd, **kw), dx=conv2d_backward_input(dyd, wd, x.shape, **kw),
                   dw=conv2d_backward_weight(dyd, xd, w.shape, **kw), db=conv2d_backward_bias(dyd))
        for name, value in got.items():
            assert value.dtype == dtype, name
            assert_close(value, want[name], rtol=rtol, atol_floor=floor, name=f"{name} {np.dtype(dtype)}")

    f = lambda: conv2d_forward(x, w, b, **kw)  # noqa: E731
    with oracle.one_numba_thread():
        check_directional(f, x, dy, want["dx"], rng, name="dx")
        check_directional(f, w, dy, want["dw"], rng, name="dw")
        if x.size + w.size <= FULL_CHECK_MAX:
            x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
            check_grad(f, x, dy, want["dx"], name="dx")
            check_grad(f, w, dy, want["dw"], name="dw")
            check_grad(f, b, dy, want["db"], name="db")


@given(oracle.window_cases())
@oracle.one_numba_thread()
def test_matches_torch(case):
    """Same draws against PyTorch (one Numba thread: the oracle test already covers the parallel split)."""
    pytest.importorskip("torch")
    rng, x, w, b = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    y = conv2d_forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    ty, tdx, tdw, tdb = oracle.torch_conv(x, w.transpose(3, 2, 0, 1), b, dy, groups=1, **kw)  # HWIO -> OIHW
    assert_close(y, ty, rtol=1e-12, name="y")
    assert_close(conv2d_backward_input(dy, w, x.shape, **kw), tdx, rtol=1e-12, name="dx")
    assert_close(conv2d_backward_weight(dy, x, w.shape, **kw), tdw.transpose(2, 3, 1, 0), rtol=1e-12, name="dw")
    assert_close(conv2d_backward_bias(dy), tdb, rtol=1e-12, name="db")


def test_checker_catches_a_wrong_backward():
    """The directional check must fail when the weight gradient uses a spatially flipped kernel."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 6, 6, 3)), rng.standard_normal((3, 3, 3, 2))
    f = lambda: conv2d_forward(x, w, padding="same")  # noqa: E731
    dy = rng.standard_normal(f().shape)
    wrong_dx = conv2d_backward_input(dy, w[::-1, ::-1], x.shape, padding="same")
    with pytest.raises(AssertionError):
        check_directional(f, x, dy, wrong_dx, rng, name="dx")


# ---- bad input: each raises before any kernel runs, naming the argument ----

@given(oracle.window_cases())
def test_im2col_matches_oracle_and_saved_cols_give_the_same_bits(case):
    """im2col copies exactly the oracle's receptive fields, and passing them back (as a layer does) changes no bit
    of the forward or the weight gradient."""
    rng, x, w, b = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    want = oracle.im2col(x, w.shape, **kw)
    dy = rng.standard_normal(oracle.conv2d_forward(x, w, b, **kw).shape)
    for dtype in (np.float64, np.float32):
        xd, wd, bd, dyd = (a.astype(dtype) for a in (x, w, b, dy))
        cols = im2col(xd, w.shape, **kw)
        assert cols.dtype == dtype and cols.shape == want.shape
        np.testing.assert_array_equal(cols, want.astype(dtype))
        np.testing.assert_array_equal(conv2d_forward(xd, wd, bd, cols=cols, **kw), conv2d_forward(xd, wd, bd, **kw))
        np.testing.assert_array_equal(conv2d_backward_weight(dyd, xd, w.shape, cols=cols, **kw),
                                      conv2d_backward_weight(dyd, xd, w.shape, **kw))


@given(oracle.window_cases())
def test_forward_in_chunks_of_images_equals_the_whole_batch(case):
    """Without rows to reuse, a large batch's forward builds and multiplies them a few images at a time
    (``_CHUNK_BYTES``). Forced down to one image per chunk, it equals the whole batch's GEMM up to rounding (BLAS
    may sum a chunk of very few rows in another order: one output pixel is a matrix-vector product) and the
    oracle as tightly as the unchunked forward."""
    rng, x, w, b = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    saved = conv._CHUNK_BYTES
    conv._CHUNK_BYTES = 1
    try:
        for dtype, rtol, floor in ((np.float64, 1e-12, 1e-12), (np.float32, 1e-4, 1e-5)):
            xd, wd, bd = (a.astype(dtype) for a in (x, w, b))
            got = conv2d_forward(xd, wd, bd, **kw)
            whole = conv2d_forward(xd, wd, bd, cols=im2col(xd, w.shape, **kw), **kw)
            assert_close(got, whole, rtol=rtol / 10, atol_floor=floor / 10)
            assert_close(got, oracle.conv2d_forward(x, w, b, **kw), rtol=rtol, atol_floor=floor)
    finally:
        conv._CHUNK_BYTES = saved


@given(N=st.integers(1, 3), H=st.integers(1, 20), W=st.integers(1, 20), K=st.integers(1, 40),
       padding=st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 2),
                         st.tuples(st.integers(0, 2), st.integers(0, 2))),
       layout=st.sampled_from(oracle.LAYOUTS), seed=st.integers(0, 2 ** 32 - 1), threads=st.sampled_from([1, 2]))
def test_direct_input_layer_forward_matches_the_oracle(N, H, W, K, padding, layout, seed, threads):
    """The 3x3 stride-2 three-channel forward without im2col (``_direct3x3s2``, taken here at any size): every
    geometry, padding and layout the GEMM path takes, each thread count, float64 to the oracle as tightly as the
    GEMM path, float32 within 1e-4; it runs, and the bias is added."""
    case = dict(N=N, H=H, W=W, C=3, KH=3, KW=3, K=K, seed=seed, layout=layout)
    rng, x, w, b = _inputs(case)
    kw = dict(stride=2, padding=padding)
    try:
        want = oracle.conv2d_forward(x, w, b, **kw)
    except ValueError:
        return  # no output for this geometry: the bad-input tests cover it
    saved = conv._DIRECT_MIN_BYTES
    conv._DIRECT_MIN_BYTES = 0
    try:
        with numba_threads(threads), _direct_calls() as calls:
            for dtype, rtol, floor in ((np.float64, 1e-12, 1e-12), (np.float32, 1e-4, 1e-5)):
                got = conv2d_forward(*(a.astype(dtype) for a in (x, w, b)), **kw)
                assert got.dtype == dtype
                assert_close(got, want, rtol=rtol, atol_floor=floor, name=f"y {np.dtype(dtype)}")
    finally:
        conv._DIRECT_MIN_BYTES = saved
    assert calls == [np.float64, np.float32]


def test_direct_input_layer_forward_serves_large_batches_only():
    """MobileNet's input layer takes the direct loop from 8 MiB of im2col rows (batch 32 at res 128: 14 MB; batch 8
    at res 224: 10.8 MB), and im2col + GEMM below (batch 8 at res 128, two images at res 224), for other windows,
    strides and channel counts, and whenever the caller passes its rows."""
    def takes_direct(N, res, w_shape=(3, 3, 3, 8), stride=2, with_cols=False):
        x, w = np.zeros((N, res, res, w_shape[2]), np.float32), np.zeros(w_shape, np.float32)
        cols = im2col(x, w_shape, stride=stride, padding="same") if with_cols else None
        with _direct_calls() as calls:
            conv2d_forward(x, w, stride=stride, padding="same", cols=cols)
        return bool(calls)

    assert takes_direct(32, 128) and takes_direct(8, 224)
    assert not takes_direct(8, 128) and not takes_direct(2, 224)
    assert not takes_direct(32, 128, w_shape=(3, 3, 1, 8)) and not takes_direct(32, 128, w_shape=(5, 5, 3, 8))
    assert not takes_direct(32, 128, stride=1) and not takes_direct(32, 128, with_cols=True)


@contextlib.contextmanager
def _direct_calls():
    """The dtypes of the calls to ``conv._direct3x3s2`` made inside the block, as a list."""
    calls, direct = [], conv._direct3x3s2

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return direct(*args, **kwargs)

    conv._direct3x3s2 = spy
    try:
        yield calls
    finally:
        conv._direct3x3s2 = direct


def test_images_per_chunk_follows_the_rows_size():
    """MobileNet's input layer at batch 32: two images a chunk at res 128 (442 KB of rows each), one at res 224
    (1.35 MB); a batch whose rows all fit in two chunks is not split."""
    res128, res224 = 64 * 64 * 27 * 4, 112 * 112 * 27 * 4
    assert conv._images_per_chunk(32, res128) == 2
    assert conv._images_per_chunk(32, res224) == 1
    assert conv._images_per_chunk(4, res128) == 4
    assert conv._images_per_chunk(1, res224) == 1


X = np.zeros((2, 5, 5, 3))
W = np.zeros((3, 3, 3, 4))
DY = np.zeros((2, 3, 3, 4))


@pytest.mark.parametrize("call, error, names", [
    (lambda: conv2d_forward(X[0], W), ValueError, ["x", "(N, H, W, C)"]),
    (lambda: conv2d_forward(X, W[0]), ValueError, ["w", "(KH, KW, C, K)"]),
    (lambda: conv2d_forward(X, np.zeros((3, 3, 2, 4))), ValueError, ["w", "C=3"]),
    (lambda: conv2d_forward(X.astype(np.int64), W), TypeError, ["x", "int64"]),
    (lambda: conv2d_forward(X.astype(np.float32), W), TypeError, ["x=float32", "w=float64"]),
    (lambda: conv2d_forward(X, W, np.zeros(4, np.float32)), TypeError, ["b=float32"]),
    (lambda: conv2d_forward(X, W, np.zeros(3)), ValueError, ["b", "(4,)"]),
    (lambda: conv2d_forward([[1.0]], W), TypeError, ["x", "list"]),
    (lambda: conv2d_forward(X, W, stride=0), ValueError, ["stride", ">= 1"]),
    (lambda: conv2d_forward(X, W, stride=1.5), TypeError, ["stride"]),
    (lambda: conv2d_forward(X, W, stride=True), TypeError, ["stride", "True"]),
    (lambda: conv2d_forward(X, W, stride=(1, True)), TypeError, ["stride", "(1, True)"]),
    (lambda: conv2d_forward(X.astype(">f8"), W), TypeError, ["x", ">f8"]),
    (lambda: conv2d_forward(X, W, padding="full"), ValueError, ["padding", "'full'"]),
    (lambda: conv2d_forward(X, W, padding=-1), ValueError, ["padding", ">= 0"]),
    (lambda: conv2d_forward(X, np.zeros((7, 3, 3, 4))), ValueError, ["kernel height 7", "padded input height 5"]),
    (lambda: conv2d_backward_input(DY, W, (2, 5, 5)), TypeError, ["x_shape", "(N, H, W, C)"]),
    (lambda: conv2d_backward_input(DY, W, (2, 5, 5, 2)), ValueError, ["w", "C=2"]),
    (lambda: conv2d_backward_input(DY[:, :2], W, X.shape), ValueError, ["dy", "(2, 3, 3, 4)"]),
    (lambda: conv2d_backward_input(DY.astype(np.float32), W, X.shape), TypeError, ["dy=float32", "w=float64"]),
    (lambda: conv2d_backward_weight(DY, X, (3, 3, 3)), TypeError, ["w_shape", "(KH, KW, C, K)"]),
    (lambda: conv2d_backward_weight(DY, X, (3, 3, 3, 0)), ValueError, ["w_shape", ">= 1"]),
    (lambda: conv2d_backward_weight(DY[..., :2], X, W.shape), ValueError, ["dy", "(2, 3, 3, 4)"]),
    (lambda: conv2d_backward_weight(DY, X.astype(np.float32), W.shape), TypeError, ["dy=float64", "x=float32"]),
    (lambda: conv2d_backward_bias(DY[0]), ValueError, ["dy"]),
    (lambda: conv2d_forward(X, W, cols=np.zeros((8, 27))), ValueError, ["cols", "(18, 27)", "(8, 27)"]),
    (lambda: conv2d_forward(X, W, cols=np.zeros((18, 27), np.float32)), TypeError, ["x=float64", "cols=float32"]),
    (lambda: conv2d_backward_weight(DY, X, W.shape, cols=np.zeros(27)), ValueError, ["cols", "2-D"]),
    (lambda: im2col(X, (3, 3, 2, 4)), ValueError, ["w", "C=3"]),
    (lambda: im2col(X, (3, 3, 3)), TypeError, ["w_shape", "(KH, KW, C, K)"]),
    (lambda: im2col(X, W.shape, stride=0), ValueError, ["stride", ">= 1"]),
])
def test_bad_input_raises_naming_the_argument(call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value)


def test_checks_accept_equal_dtypes_that_are_not_the_same_object():
    # the checks settle the usual case by dtype identity; an equal dtype object of its own must pass all the same
    other = np.dtype(np.float64).newbyteorder("=")
    assert other is not np.dtype(np.float64) and other == np.float64
    x = np.zeros((2, 5, 5, 3)).view(other)
    assert x.dtype is other
    np.testing.assert_array_equal(conv2d_forward(x, W, stride=(1, 1)), conv2d_forward(X, W, stride=1))
