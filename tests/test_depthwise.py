"""kernels.depthwise against its loop oracle, finite differences, a per-channel standard conv and PyTorch; bad input."""
import contextlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import oracles_conv as oracle
from gradcheck import assert_close, check_directional, check_grad
from kernels.conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from kernels.depthwise import depthwise_backward, depthwise_backward_input, depthwise_backward_weight, depthwise_forward

FULL_CHECK_MAX = 80  # x.size + w.size up to which every coordinate is checked by finite differences


def _inputs(case):
    """float64 inputs whose values are exactly representable in float32, so one float64 oracle serves both."""
    rng = np.random.default_rng(case["seed"])
    x = oracle.make_array(rng, (case["N"], case["H"], case["W"], case["C"]), case["layout"]).astype(np.float32)
    w = oracle.make_array(rng, (case["KH"], case["KW"], case["C"], case["M"]), case["layout"]).astype(np.float32)
    return rng, x.astype(np.float64), w.astype(np.float64)


@pytest.mark.parametrize("stride, padding, M", [(1, "valid", 1), (2, "same", 2), ((1, 2), 1, 1), (3, (2, 0), 3)])
def test_oracle_backward_matches_finite_differences(stride, padding, M):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 5, 4, 2)), rng.standard_normal((3, 2, 2, M))
    f = lambda: oracle.depthwise_forward(x, w, stride, padding)  # noqa: E731
    dy = rng.standard_normal(f().shape)
    check_grad(f, x, dy, oracle.depthwise_backward_input(dy, w, x.shape, stride, padding), name="dx")
    check_grad(f, w, dy, oracle.depthwise_backward_weight(dy, x, w.shape, stride, padding), name="dw")


@given(oracle.window_cases(depthwise=True))
def test_matches_oracle_and_finite_differences(case):
    """float64 equals the oracle tightly and its gradients equal finite differences; float32 is within 1e-4."""
    rng, x, w = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    y = oracle.depthwise_forward(x, w, **kw)
    dy = rng.standard_normal(y.shape).astype(np.float32).astype(np.float64)
    want = dict(y=y, dx=oracle.depthwise_backward_input(dy, w, x.shape, **kw),
                dw=oracle.depthwise_backward_weight(dy, x, w.shape, **kw))
    for dtype, rtol, floor in ((np.float64, 1e-12, 1e-12), (np.float32, 1e-4, 1e-5)):
        xd, wd, dyd = (a.astype(dtype) for a in (x, w, dy))
        got = dict(y=depthwise_forward(xd, wd, **kw), dx=depthwise_backward_input(dyd, wd, x.shape, **kw),
                   dw=depthwise_backward_weight(dyd, xd, w.shape, **kw))
        for name, value in got.items():
            assert value.dtype == dtype, name
            assert_close(value, want[name], rtol=rtol, atol_floor=floor, name=f"{name} {np.dtype(dtype)}")

    f = lambda: depthwise_forward(x, w, **kw)  # noqa: E731
    with oracle.one_numba_thread():
        check_directional(f, x, dy, want["dx"], rng, name="dx")
        check_directional(f, w, dy, want["dw"], rng, name="dw")
        if x.size + w.size <= FULL_CHECK_MAX:
            x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
            check_grad(f, x, dy, want["dx"], name="dx")
            check_grad(f, w, dy, want["dw"], name="dw")


@given(oracle.window_cases(depthwise=True))
@oracle.one_numba_thread()
def test_equals_standard_conv_per_channel(case):
    """Depthwise is a grouped conv: output channels c*M .. c*M + M - 1 are a standard conv of input channel c."""
    rng, x, w = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    C, M = case["C"], case["M"]
    y = depthwise_forward(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    dx = depthwise_backward_input(dy, w, x.shape, **kw)
    dw = depthwise_backward_weight(dy, x, w.shape, **kw)
    for c in range(C):
        xc, wc, dyc = x[..., c:c + 1], w[:, :, c:c + 1, :], dy[..., c * M:(c + 1) * M]
        assert_close(y[..., c * M:(c + 1) * M], conv2d_forward(xc, wc, **kw), rtol=1e-12, name="y")
        assert_close(dx[..., c:c + 1], conv2d_backward_input(dyc, wc, xc.shape, **kw), rtol=1e-12, name="dx")
        assert_close(dw[:, :, c:c + 1, :], conv2d_backward_weight(dyc, xc, wc.shape, **kw), rtol=1e-12, name="dw")


@given(oracle.window_cases(depthwise=True))
@oracle.one_numba_thread()
def test_matches_torch(case):
    """Same draws against PyTorch (one Numba thread: the oracle test already covers the parallel split)."""
    pytest.importorskip("torch")
    rng, x, w = _inputs(case)
    kw = dict(stride=case["stride"], padding=case["padding"])
    KH, KW, C, M = w.shape
    y = depthwise_forward(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    w_oihw = w.reshape(KH, KW, 1, C * M).transpose(3, 2, 0, 1)  # (C*M, 1, KH, KW): output channel c*M + m
    ty, tdx, tdw, _ = oracle.torch_conv(x, w_oihw, None, dy, groups=C, **kw)
    assert_close(y, ty, rtol=1e-12, name="y")
    assert_close(depthwise_backward_input(dy, w, x.shape, **kw), tdx, rtol=1e-12, name="dx")
    assert_close(depthwise_backward_weight(dy, x, w.shape, **kw), tdw.transpose(2, 3, 1, 0).reshape(w.shape),
                 rtol=1e-12, name="dw")


@pytest.mark.parametrize("H, W, C, M, padding", [
    (5, 18, 32, 1, "same"),      # interior blocks of 4, both borders, one leftover interior column
    (4, 21, 33, 1, "valid"),     # no padding: first and last columns interior; C not a multiple of the vector width
    (3, 16, 17, 2, (1, 0)),      # depth multiplier: the kernel runs on the C*M expanded channels
    (6, 17, 40, 1, 3),           # padding > 2: the input-gradient's flipped padding 2 - p is negative
    (4, 16, 48, 1, (2, 1)),      # asymmetric explicit padding
    (5, 4, 16, 1, "same"),       # the narrowest map it serves: one block of four columns
    (3, 7, 3, 1, "same"),        # a block and three single columns; three channels
    (4, 6, 8, 1, "valid"),       # output narrower than the input
])
@pytest.mark.parametrize("threads", ["all", "one"])
def test_3x3_stride1_fast_path_matches_oracle(H, W, C, M, padding, threads):
    """The 3x3 stride-1 kernel (padded ring rows, four columns per pass) against the oracle, interior and border
    columns."""
    from kernels import depthwise
    assert depthwise._use_3x3(3, 3, 1, 1, W)
    rng = np.random.default_rng(H * W + C)
    x, w = rng.standard_normal((2, H, W, C)), rng.standard_normal((3, 3, C, M))
    kw = dict(stride=1, padding=padding)
    y = oracle.depthwise_forward(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    with (oracle.one_numba_thread() if threads == "one" else contextlib.nullcontext()):
        assert_close(depthwise_forward(x, w, **kw), y, rtol=1e-12, name="y")
        dx = depthwise_backward_input(dy, w, x.shape, **kw)
        assert_close(dx, oracle.depthwise_backward_input(dy, w, x.shape, **kw), rtol=1e-12, name="dx")
        dw = depthwise_backward_weight(dy, x, w.shape, **kw)
        assert_close(dw, oracle.depthwise_backward_weight(dy, x, w.shape, **kw), rtol=1e-12, name="dw")
        for dtype in (np.float64, np.float32):  # the fused pass gives both gradients bit for bit
            xd, wd, dyd = x.astype(dtype), w.astype(dtype), dy.astype(dtype)
            both = depthwise_backward(dyd, xd, wd, **kw)
            np.testing.assert_array_equal(both[0], depthwise_backward_input(dyd, wd, x.shape, **kw))
            np.testing.assert_array_equal(both[1], depthwise_backward_weight(dyd, xd, w.shape, **kw))
        y32 = depthwise_forward(x.astype(np.float32), w.astype(np.float32), **kw)
    assert y32.dtype == np.float32
    assert_close(y32, y, rtol=1e-4, atol_floor=1e-4, name="y float32")


@given(N=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(4, 28), C=st.integers(1, 19),
       padding=st.sampled_from(["same", "valid", 0, 1, 2, 3, (2, 0), (0, 3)]), blocks=st.integers(2, 5),
       seed=st.integers(0, 2**16))
def test_3x3_stride1_kernel_over_geometry(N, H, W, C, padding, blocks, seed):
    """Every geometry the stride-1 3x3 kernel serves: the oracle's values, and the same bits whatever the number
    of row blocks (each block fills its own ring; the split is a matter of threads, not of results) and whether
    rows are computed in a buffer first (the large maps' way)."""
    from kernels import depthwise
    from kernels.geometry import conv_geometry
    try:
        g = conv_geometry(H, W, (3, 3), 1, padding)
    except ValueError:  # no output pixel (a 'valid' window larger than the map): rejected before any kernel
        assume(False)
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((N, H, W, C)), rng.standard_normal((3, 3, C, 1))
    want = oracle.depthwise_forward(x, w, stride=1, padding=padding)
    runs = []
    for nblk, buffered in ((1, False), (blocks, False), (blocks, True)):
        y = np.empty((N, g.oh, g.ow, C))
        depthwise._forward3x3.serial(y, x, depthwise._flat(w), g.pt, g.pl, nblk, buffered,
                                     *depthwise._NO_PASS[np.float64], *depthwise._NO_IN_PASS[np.float64])
        runs.append(y)
    assert_close(runs[0], want, rtol=1e-12, name="y")
    for y in runs[1:]:
        np.testing.assert_array_equal(y, runs[0])


@pytest.mark.parametrize("N, H, W, C, padding", [
    (3, 5, 16, 32, "same"),      # the row blocks split input rows and output rows alike
    (2, 7, 20, 256, 1),          # per-column weight accumulators inside the fused pass
    (3, 6, 17, 40, "valid"),     # fewer output rows than input rows: the two kinds of rows split differently
    (2, 4, 16, 33, (3, 0)),      # more output rows than input rows
    (4, 8, 8, 5, "same"),        # a narrow map, few channels
    (4, 6, 6, 8, "same"),        # the narrowest maps: one pass of four columns, then single ones
    (2, 5, 4, 256, "valid"),     # two output columns, each a single one, many channels
])
@pytest.mark.parametrize("buffered", [False, True])
def test_fused_backward_equals_the_two_gradients_bit_for_bit(N, H, W, C, padding, buffered, monkeypatch):
    """depthwise_backward's one-pass stride-1 3x3 kernel against the two separate gradient calls and the oracle,
    with dx rows written in place or (as on large maps) through a row buffer."""
    from kernels import _jit, depthwise
    assert depthwise._use_3x3(3, 3, 1, 1, W)
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 0)  # these small maps take the fused kernel too
    monkeypatch.setattr(depthwise, "_MIN_BUFFERED_BYTES", 0 if buffered else 1 << 62)
    fused, calls = depthwise._backward3x3, []
    monkeypatch.setattr(depthwise, "_backward3x3", lambda *a: calls.append(1) or fused(*a))
    rng = np.random.default_rng(N * H * W + C)
    x, w = rng.standard_normal((N, H, W, C)), rng.standard_normal((3, 3, C, 1))
    kw = dict(stride=1, padding=padding)
    dy = rng.standard_normal(oracle.depthwise_forward(x, w, **kw).shape)
    for threads in ("all", "one"):
        with (oracle.one_numba_thread() if threads == "one" else contextlib.nullcontext()):
            dx, dw = depthwise_backward(dy, x, w, **kw)
            np.testing.assert_array_equal(dx, depthwise_backward_input(dy, w, x.shape, **kw))
            np.testing.assert_array_equal(dw, depthwise_backward_weight(dy, x, w.shape, **kw))
    assert_close(dx, oracle.depthwise_backward_input(dy, w, x.shape, **kw), rtol=1e-12, name="dx")
    assert_close(dw, oracle.depthwise_backward_weight(dy, x, w.shape, **kw), rtol=1e-12, name="dw")
    assert len(calls) == 2, "the fused kernel ran on all threads and on one"
    none, dw_only = depthwise_backward(dy, x, w, need_dx=False, **kw)
    assert none is None
    np.testing.assert_array_equal(dw_only, dw)


@given(oracle.window_cases(depthwise=True))
def test_backward_of_both_equals_the_separate_calls(case):
    """On every geometry (where the fused kernel does not apply, it calls the two kernels) and dtype."""
    rng = np.random.default_rng(case["seed"])
    x = oracle.make_array(rng, (case["N"], case["H"], case["W"], case["C"]), case["layout"])
    w = oracle.make_array(rng, (case["KH"], case["KW"], case["C"], case["M"]), case["layout"])
    kw = dict(stride=case["stride"], padding=case["padding"])
    dy = rng.standard_normal(oracle.depthwise_forward(x, w, **kw).shape)
    for dtype in (np.float64, np.float32):
        xd, wd, dyd = x.astype(dtype), w.astype(dtype), dy.astype(dtype)
        dx, dw = depthwise_backward(dyd, xd, wd, **kw)
        assert dx.dtype == dw.dtype == dtype
        np.testing.assert_array_equal(dx, depthwise_backward_input(dyd, wd, x.shape, **kw))
        np.testing.assert_array_equal(dw, depthwise_backward_weight(dyd, xd, w.shape, **kw))


def test_3x3_fast_path_is_not_used_where_it_measured_slower():
    from kernels import depthwise
    assert not depthwise._use_3x3(3, 3, 1, 1, 2)         # 2x2 maps: the tiled loops win
    assert depthwise._use_3x3(3, 3, 1, 1, 4)
    assert not depthwise._use_3x3(3, 3, 2, 2, 64)        # stride 2 has its own kernel
    assert not depthwise._use_3x3(5, 5, 1, 1, 64)
    assert not depthwise._use_3x3_s2(3, 3, 2, 2, 2)      # two output columns: the tiled loops win
    assert not depthwise._use_3x3_s2(3, 3, 2, 1, 64)     # mixed strides
    assert not depthwise._use_3x3_s2(5, 5, 2, 2, 64)
    # the blocked weight gradient at stride 2: from 8 output columns, from 4 where the generic loops would tile
    assert depthwise._use_weight3x3(3, 3, 2, 2, 8, 4, 64)
    assert not depthwise._use_weight3x3(3, 3, 2, 2, 8, 4, depthwise._MIN_CHANNELS_WEIGHT_COLS)
    assert depthwise._use_weight3x3(3, 3, 2, 2, 16, 8, depthwise._MIN_CHANNELS_WEIGHT_COLS)
    assert not depthwise._use_weight3x3(3, 3, 2, 2, 4, 2, 64)


@pytest.mark.parametrize("H, W, C, M, padding", [
    (6, 16, 8, 1, "same"),       # even size, TensorFlow 'same': no left padding, one zero column on the right
    (7, 17, 5, 1, "same"),       # odd size: one zero column each side
    (5, 12, 3, 2, "valid"),      # no padding; depth multiplier
    (6, 19, 4, 1, 3),            # padding > 1: several border columns each side
    (5, 9, 2, 1, (0, 2)),        # asymmetric explicit padding, an odd number of interior columns
])
@pytest.mark.parametrize("threads", ["all", "one"])
def test_3x3_stride2_forward_matches_oracle(H, W, C, M, padding, threads):
    """The stride-2 3x3 forward kernel (two columns per pass) against the oracle, interior and border columns."""
    from kernels import depthwise
    rng = np.random.default_rng(H * W + C)
    x, w = rng.standard_normal((2, H, W, C)), rng.standard_normal((3, 3, C, M))
    kw = dict(stride=2, padding=padding)
    y = oracle.depthwise_forward(x, w, **kw)
    assert depthwise._use_3x3_s2(3, 3, 2, 2, y.shape[2])
    with (oracle.one_numba_thread() if threads == "one" else contextlib.nullcontext()):
        assert_close(depthwise_forward(x, w, **kw), y, rtol=1e-12, name="y")
        y32 = depthwise_forward(x.astype(np.float32), w.astype(np.float32), **kw)
    assert y32.dtype == np.float32
    assert_close(y32, y, rtol=1e-4, atol_floor=1e-4, name="y float32")


@given(N=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(2, 40), C=st.integers(1, 19),
       stride=st.sampled_from([1, 2]),
       padding=st.sampled_from(["same", "valid", 0, 1, 2, 3, (2, 0), (0, 3)]), seed=st.integers(0, 2**16))
def test_blocked_3x3_weight_gradient_over_geometry(N, H, W, C, stride, padding, seed):
    """The 3x3 weight gradient four columns at a time from padded rows (:func:`_weight3x3`, stride 1 or 2; at
    stride 1 two rows at a time where a block allows, else one): the
    oracle's values on every geometry it serves (tail columns, padding wider than the kernel, odd sizes), what
    the public call returns, and at stride 1 the same bits as the fused backward pass, which accumulates the same
    rows the same way."""
    from kernels import depthwise
    from kernels.geometry import conv_geometry
    try:
        g = conv_geometry(H, W, (3, 3), stride, padding)
    except ValueError:  # no output pixel: rejected before any kernel
        assume(False)
    assume(depthwise._use_weight3x3(3, 3, stride, stride, W, g.ow, C))
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((N, H, W, C)), rng.standard_normal((3, 3, C, 1))
    dy = rng.standard_normal((N, g.oh, g.ow, C))
    kw = dict(stride=stride, padding=padding)
    no_pass = depthwise._NO_IN_PASS[np.float64]
    partial, per_column = depthwise._weight_partials(N * g.oh, 3, 3, g.ow, C, dy.dtype, blocked=True)
    assert per_column
    depthwise._weight3x3.serial(partial, dy, x, stride, g.pt, g.pl, *no_pass)
    dw = depthwise._weight_sum(partial, w.shape, g.ow, per_column)
    assert_close(dw, oracle.depthwise_backward_weight(dy, x, w.shape, **kw), rtol=1e-12, name="dw")
    np.testing.assert_array_equal(depthwise_backward_weight(dy, x, w.shape, **kw), dw)
    if stride == 1:
        for buffered in (False, True):  # dx rows in place, or through a row buffer
            fused, dx = np.empty_like(partial), np.empty_like(x)
            depthwise._backward3x3(dx, fused, dy, x, depthwise._flat(w[::-1, ::-1]), g.pt, g.pl, buffered,
                                   *no_pass)
            np.testing.assert_array_equal(fused, partial)
            assert_close(dx, oracle.depthwise_backward_input(dy, w, x.shape, **kw), rtol=1e-12, name="dx")


@pytest.mark.parametrize("stride, padding", [(1, "same"), (2, "same"), (2, "valid"), ((1, 2), (2, 1))])
def test_weight_gradient_per_column_path_matches_oracle(stride, padding):
    """With >= 256 channels the weight gradient takes the per-column accumulators; it must agree with the oracle
    and with the row-tiled kernel it replaces."""
    from kernels import depthwise
    C = depthwise._MIN_CHANNELS_WEIGHT_COLS
    rng = np.random.default_rng(C)
    x, w = rng.standard_normal((2, 5, 6, C)), rng.standard_normal((3, 3, C, 1))
    kw = dict(stride=stride, padding=padding)
    dy = rng.standard_normal(oracle.depthwise_forward(x, w, **kw).shape)
    expected = oracle.depthwise_backward_weight(dy, x, w.shape, **kw)
    assert_close(depthwise_backward_weight(dy, x, w.shape, **kw), expected, rtol=1e-12, name="dw")
    # the same channels split over a depth multiplier of 2 go through the same path
    x2, w2 = x[..., :C // 2], rng.standard_normal((3, 3, C // 2, 2))
    dy2 = rng.standard_normal(oracle.depthwise_forward(x2, w2, **kw).shape)
    assert_close(depthwise_backward_weight(dy2, x2, w2.shape, **kw),
                 oracle.depthwise_backward_weight(dy2, x2, w2.shape, **kw), rtol=1e-12, name="dw, M=2")


def test_weight_gradient_does_not_depend_on_thread_count():
    """The weight gradient sums fixed row blocks, so it is bitwise identical on one thread and on all of them."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 16, 16, 8)).astype(np.float32)
    dy = rng.standard_normal((4, 8, 8, 8)).astype(np.float32)
    everyone = depthwise_backward_weight(dy, x, (3, 3, 8, 1), stride=2, padding="same")
    with oracle.one_numba_thread():
        alone = depthwise_backward_weight(dy, x, (3, 3, 8, 1), stride=2, padding="same")
    np.testing.assert_array_equal(everyone, alone)


# ---- bad input: each raises before any kernel runs, naming the argument ----

X = np.zeros((2, 5, 5, 3))
W = np.zeros((3, 3, 3, 2))
DY = np.zeros((2, 3, 3, 6))


@pytest.mark.parametrize("call, error, names", [
    (lambda: depthwise_forward(X[0], W), ValueError, ["x", "(N, H, W, C)"]),
    (lambda: depthwise_forward(X, W[0]), ValueError, ["w", "(KH, KW, C, M)"]),
    (lambda: depthwise_forward(X, np.zeros((3, 3, 4, 1))), ValueError, ["w", "C=3"]),
    (lambda: depthwise_forward(X.astype(np.int32), W), TypeError, ["x", "int32"]),
    (lambda: depthwise_forward(X, W.astype(np.float32)), TypeError, ["x=float64", "w=float32"]),
    (lambda: depthwise_forward(X, W, stride=(1, 0)), ValueError, ["stride", ">= 1"]),
    (lambda: depthwise_forward(X, W, padding="SAME!"), ValueError, ["padding"]),
    (lambda: depthwise_forward(X, W, padding=(1, -1)), ValueError, ["padding", ">= 0"]),
    (lambda: depthwise_forward(X, np.zeros((3, 6, 3, 1))), ValueError, ["kernel width 6", "padded input width 5"]),
    (lambda: depthwise_forward(X, np.zeros((3, 3, 3, 1)), padding=0, stride=True), TypeError, ["stride"]),
    (lambda: depthwise_backward_input(DY, W, (2, 5, 5)), TypeError, ["x_shape", "(N, H, W, C)"]),
    (lambda: depthwise_backward_input(DY, W, (2, 5, 5, 4)), ValueError, ["w", "C=4"]),
    (lambda: depthwise_backward_input(DY[..., :3], W, X.shape), ValueError, ["dy", "(2, 3, 3, 6)"]),
    (lambda: depthwise_backward_input(DY.astype(np.float32), W, X.shape), TypeError, ["dy=float32", "w=float64"]),
    (lambda: depthwise_backward_weight(DY, X, (3, 3, 3)), TypeError, ["w_shape", "(KH, KW, C, M)"]),
    (lambda: depthwise_backward_weight(DY, X, (3, 3, 2, 2)), ValueError, ["w", "C=3"]),
    (lambda: depthwise_backward_weight(DY[:, :1], X, W.shape), ValueError, ["dy", "(2, 3, 3, 6)"]),
    (lambda: depthwise_backward_weight(DY, X.astype(np.float32), W.shape), TypeError, ["dy=float64", "x=float32"]),
    (lambda: depthwise_backward(DY[:, :2], X, W), ValueError, ["dy", "(2, 3, 3, 6)"]),
    (lambda: depthwise_backward(DY, X, W.astype(np.float32)), TypeError, ["w=float32"]),
    (lambda: depthwise_backward(DY, X, np.zeros((3, 3, 4, 2))), ValueError, ["w", "C=3"]),
    (lambda: depthwise_backward(DY, X[0], W), ValueError, ["x", "(N, H, W, C)"]),
])
def test_bad_input_raises_naming_the_argument(call, error, names):
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value)


# ---- output pass: bias and activation in the forward kernels (a batch norm folded for inference) ----

def _with_output_pass_oracle(y, bias, act):
    lo, hi = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}[act]
    return np.clip(y + (0 if bias is None else bias), lo, hi).astype(y.dtype)


@given(case=oracle.window_cases(depthwise=True), act=st.sampled_from([None, "relu", "relu6"]),
       with_bias=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_output_pass_is_bitwise_the_plain_forward_then_bias_act(case, act, with_bias, dtype):
    """Over every geometry (so every path: the 3x3 ring, the 3x3 stride-2 kernel, the generic loops), the fused
    bias + activation gives the very bits of the plain forward followed by kernels.batchnorm.bias_act_forward, and
    the oracle's values."""
    from kernels.batchnorm import bias_act_forward
    rng, x, w = _inputs(case)
    x, w = x.astype(dtype), w.astype(dtype)
    bias = rng.standard_normal(case["C"] * case["M"]).astype(dtype) if with_bias else None
    kw = dict(stride=case["stride"], padding=case["padding"])
    plain = depthwise_forward(x, w, **kw)
    got = depthwise_forward(x, w, bias=bias, act=act, **kw)
    want = bias_act_forward(plain, np.zeros(plain.shape[-1], dtype) if bias is None else bias, act=act)
    np.testing.assert_array_equal(got, want)
    ref = _with_output_pass_oracle(oracle.depthwise_forward(x.astype(np.float64), w.astype(np.float64), **kw),
                                   bias, act)
    assert_close(got, ref, rtol=1e-12 if dtype == np.float64 else 1e-5, name="y")


@pytest.mark.parametrize("shape, stride, buffered", [((32, 16, 16, 32), 1, False), ((32, 16, 16, 32), 1, True),
                                                      ((32, 16, 16, 32), 2, False), ((4, 2, 2, 64), 1, False),
                                                      ((32, 64, 64, 32), 1, None)])
def test_output_pass_on_parallel_maps_and_relu6(shape, stride, buffered, monkeypatch):
    """Large enough to run on every thread: the parallel builds apply the pass to each of their rows, written in
    place or through a row buffer (None: by the size rule, a 16 MiB output that takes the buffer)."""
    from kernels import depthwise
    from kernels.batchnorm import bias_act_forward
    if buffered is not None:
        monkeypatch.setattr(depthwise, "_MIN_BUFFERED_BYTES", 0 if buffered else 1 << 62)
    else:
        assert depthwise._buffered(np.empty(shape, np.float32))
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 4
    w = rng.standard_normal((3, 3, shape[3], 1)).astype(np.float32)
    b = rng.standard_normal(shape[3]).astype(np.float32)
    got = depthwise_forward(x, w, stride=stride, padding="same", bias=b, act="relu6")
    np.testing.assert_array_equal(got, bias_act_forward(depthwise_forward(x, w, stride=stride, padding="same"), b,
                                                        act="relu6"))
    assert got.min() == 0.0 and got.max() == 6.0  # both ends of ReLU6 were reached


def test_output_pass_propagates_nan():
    x = np.ones((1, 6, 6, 4), np.float32)
    x[0, 2, 2, 1] = np.nan
    y = depthwise_forward(x, np.ones((3, 3, 4, 1), np.float32), padding="same", bias=np.zeros(4, np.float32),
                          act="relu")
    assert np.isnan(y[0, 1:4, 1:4, 1]).all() and not np.isnan(np.delete(y, 1, axis=3)).any()


@pytest.mark.parametrize("kw, err, match", [
    (dict(bias=np.zeros(3, np.float32)), ValueError, r"bias must have shape \(4,\)"),
    (dict(bias=np.zeros(4)), TypeError, "bias must have x's dtype float32, got float64"),
    (dict(bias=np.zeros((4, 1), np.float32)), ValueError, "bias must be 1-D"),
    (dict(act="tanh"), ValueError, "act must be one of"),
    (dict(in_bias=np.zeros(4, np.float32)), ValueError, r"in_bias must have shape \(2,\)"),
    (dict(in_act="elu"), ValueError, "in_act must be one of"),
])
def test_output_pass_rejects_bad_arguments(kw, err, match):
    x, w = np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(err, match=match):
        depthwise_forward(x, w, padding="same", **kw)


@given(case=oracle.window_cases(depthwise=True), act=st.sampled_from([None, "relu", "relu6"]),
       in_act=st.sampled_from([None, "relu", "relu6"]), with_in_bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_input_pass_is_bitwise_bias_act_then_the_forward(case, act, in_act, with_in_bias, dtype):
    """in_bias / in_act (the previous layer's output pass, deferred) give the bits of bias_act_forward on x and then
    the forward, on every path: folded into the row copies of the 3x3 kernels (the padding stays zero, it is
    added after the activation), a pass of its own elsewhere."""
    from kernels.batchnorm import bias_act_forward
    from kernels.depthwise import input_pass_is_free
    rng, x, w = _inputs(case)
    x, w = (x * 3).astype(dtype), w.astype(dtype)
    C, M = case["C"], case["M"]
    in_bias = rng.standard_normal(C).astype(dtype) if with_in_bias else None
    bias = rng.standard_normal(C * M).astype(dtype)
    kw = dict(stride=case["stride"], padding=case["padding"])
    got = depthwise_forward(x, w, bias=bias, act=act, in_bias=in_bias, in_act=in_act, **kw)
    xin = x if in_bias is None and in_act is None else \
        bias_act_forward(x, np.zeros(C, dtype) if in_bias is None else in_bias, act=in_act)
    np.testing.assert_array_equal(got, depthwise_forward(xin, w, bias=bias, act=act, **kw))
    free = input_pass_is_free((case["KH"], case["KW"]), case["stride"], case["padding"], x.shape[1:], M)
    assert free == ((case["KH"], case["KW"]) == (3, 3) and kw["stride"] in (1, (1, 1), 2, (2, 2)) and M == 1
                    and got.shape[2] >= 4)


@given(N=st.integers(1, 3), H=st.integers(1, 18), W=st.integers(1, 18), C=st.integers(1, 12),
       K=st.sampled_from([3, 3, 3, 2]), stride=st.sampled_from([1, 2]), M=st.sampled_from([1, 1, 2]),
       padding=st.sampled_from(["same", "valid", 1, (2, 0)]), in_act=st.sampled_from([None, "relu", "relu6"]),
       given_vectors=st.sampled_from(["all", "center", "scale"]), fused=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_batchnorm_input_pass_is_bitwise_scale_act_then_the_conv(N, H, W, C, K, stride, M, padding, in_act,
                                                                   given_vectors, fused, dtype, seed):
    """in_center / in_scale / in_bias / in_act (a training batch norm applied from its statistics, deferred to
    this conv) give the bits of scale_act_forward on x and then the conv, forward and both gradients, on every path:
    in the row copies of the 3x3 kernels (and of the blocked weight gradient, fused with the input gradient or
    not), a pass of its own elsewhere."""
    from kernels import _jit
    from kernels.batchnorm import scale_act_forward
    from kernels.geometry import conv_geometry
    try:
        conv_geometry(H, W, (K, K), stride, padding)
    except ValueError:
        assume(False)
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((N, H, W, C)) + 1).astype(dtype)
    w = rng.standard_normal((K, K, C, M)).astype(dtype)
    center = rng.standard_normal(C).astype(dtype) if given_vectors in ("all", "center") else None
    scale = rng.standard_normal(C).astype(dtype) if given_vectors in ("all", "scale") else None
    bias = rng.standard_normal(C).astype(dtype) if given_vectors == "all" else None
    kw = dict(stride=stride, padding=padding)
    pass_kw = dict(in_center=center, in_scale=scale, in_bias=bias, in_act=in_act)
    xin = scale_act_forward(x, np.zeros(C, dtype) if center is None else center,
                            np.ones(C, dtype) if scale is None else scale,
                            np.zeros(C, dtype) if bias is None else bias, act=in_act)
    y = depthwise_forward(x, w, **pass_kw, **kw)
    np.testing.assert_array_equal(y, depthwise_forward(xin, w, **kw))
    dy = rng.standard_normal(y.shape).astype(dtype)
    previous = _jit.PARALLEL_MIN_WORK
    _jit.PARALLEL_MIN_WORK = 0 if fused else previous  # small maps take the fused stride-1 kernel too
    try:
        dx, dw = depthwise_backward(dy, x, w, **pass_kw, **kw)
        want_dx, want_dw = depthwise_backward(dy, xin, w, **kw)
    finally:
        _jit.PARALLEL_MIN_WORK = previous
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(dw, want_dw)


def test_input_pass_rejects_bad_vectors():
    x, w = np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 2, 1), np.float32)
    for kw, err, match in ((dict(in_center=np.zeros(3, np.float32)), ValueError, r"in_center must have shape \(2,\)"),
                           (dict(in_scale=np.ones(2)), TypeError, "in_scale must have x's dtype"),
                           (dict(in_scale=np.ones((2, 1), np.float32)), ValueError, "in_scale")):
        with pytest.raises(err, match=match):
            depthwise_forward(x, w, padding="same", **kw)
        with pytest.raises(err, match=match):
            depthwise_backward(x, x, w, padding="same", **kw)


# The helpers the kernels call once per row (or per column), with the argument types the kernels pass (A: a
# contiguous float32 vector, H: int64 vector, i: int, f: float32): none may take a reference to an array (Numba's
# NRT_incref, an atomic update), which is what a row view or, in a helper that calls another function, each array
# argument costs. They took 60% of a small map's forward before rows became offsets (see kernels.depthwise).
_PER_ROW_HELPERS = {"_ring_rows": "A H A i i i i i i i i A A A f f", "_row3x3": "A i A i i i A i i",
                    "_row3x3s2": "A i A i i i A i i i i i i", "_column3x3": "A i A i i i A i i i i i",
                    "_weight_row3x3": "A A i A i i i i i", "_weight_row3x3s2": "A A i A i i i i i",
                    "_weight_rows3x3": "A A i A i i i i i i",
                    "_weight_row": "A i i A i A i i i i i i i i i i",
                    "_weight_row_cols": "A i i A i A i i i i i i i i i i",
                    "_bias_act_row": "A i i A f f", "_copy_row": "A i A i"}


def _function_ir(module_ir, name):
    """The LLVM IR text of one function's definition in a module's IR."""
    at = module_ir.index(f'@"{name}"(') if f'@"{name}"(' in module_ir else module_ir.index(f"@{name}(")
    start = module_ir.rindex("define", 0, at)
    return module_ir[start:module_ir.index("\n}\n", start)]


@pytest.mark.skipif(__import__("numba").config.DISABLE_JIT, reason="inspects compiled code")
@pytest.mark.parametrize("name", sorted(_PER_ROW_HELPERS))
def test_per_row_helpers_take_no_array_references(name):
    import numba
    from numba import types
    from kernels import depthwise as dw
    kinds = {"A": types.float32[::1], "H": types.int64[::1], "i": types.int64, "f": types.float32}
    sig = tuple(kinds[k] for k in _PER_ROW_HELPERS[name].split())
    cached = getattr(dw, name)
    # a fresh build with the same options and compiler (code loaded from the on-disk cache cannot be inspected)
    fresh = numba.njit(**{k: v for k, v in cached.targetoptions.items() if k != "nopython"},
                       pipeline_class=cached._compiler.pipeline_class)(cached.py_func)
    fresh.compile(sig)
    body = _function_ir(fresh.inspect_llvm(sig), fresh.overloads[sig].fndesc.llvm_func_name)
    calls = [line.strip() for line in body.splitlines() if "call" in line and "@NRT_incref" in line]
    assert not calls, f"{name} takes {len(calls)} array references per call: {calls[:1]}"
