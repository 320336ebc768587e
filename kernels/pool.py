"""2-D pooling, NHWC: max pool, average pool and global average pool, forward and backward.

Shape legend: N batch, H W input size, C channels, KH KW window, sh sw strides, OH OW output size, pt pb pl pr
padding (top, bottom, left, right) as resolved by :func:`kernels.geometry.conv_geometry` (padding modes 'same'
(TensorFlow's rule), 'valid', an int or a pair; the stride defaults to the window).

Padding never contributes a value: max pool ignores padded positions (as if padded with -inf) and average pool
divides by the number of real elements in each window. Every inner loop runs over the contiguous channel axis.
"""
import numbers

import numba
import numpy as np

from kernels._check import check_float_array, check_shape
from kernels._jit import kernel, parallel_kernel
from kernels.geometry import conv_geometry, normalize_window

_LEGEND = "(N, H, W, C)"


@kernel
def _window(o, stride, pad_before, k, size):
    """Input rows [lo, hi) of output row o's window, clipped to the image (padded rows skipped)."""
    start = o * stride - pad_before
    return max(start, 0), min(start + k, size)


@kernel
def _covering(i, stride, pad_before, k, out_size):
    """Output rows [lo, hi) whose window covers input row i, i.e. o * stride - pad_before <= i < that + k."""
    lo = max(0, (i + pad_before - k) // stride + 1)
    hi = min(out_size, (i + pad_before) // stride + 1)
    return lo, hi


@parallel_kernel
def _maxpool_kernel(y, argmax, x, kh, kw, sh, sw, pt, pl):
    """y[n, oh, ow, c] = max over the window's real elements; argmax = flat index ih * W + iw of the first max."""
    n_size, h, w, c_size = x.shape
    oh_size, ow_size = y.shape[1], y.shape[2]
    for t in numba.prange(n_size * oh_size):
        n = t // oh_size
        oh = t % oh_size
        h0, h1 = _window(oh, sh, pt, kh, h)
        for ow in range(ow_size):
            w0, w1 = _window(ow, sw, pl, kw, w)
            first = h0 * w + w0
            for c in range(c_size):
                y[n, oh, ow, c] = x[n, h0, w0, c]
                argmax[n, oh, ow, c] = first
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    idx = ih * w + iw
                    for c in range(c_size):
                        v = x[n, ih, iw, c]
                        best = y[n, oh, ow, c]
                        take = v > best or v != v  # strict: ties keep the first; NaN propagates
                        y[n, oh, ow, c] = v if take else best
                        argmax[n, oh, ow, c] = idx if take else argmax[n, oh, ow, c]


@parallel_kernel
def _maxpool_backward_kernel(dx, n_bad, dy, argmax):
    """dx (N, H * W, C) = scatter-add of dy (N, OH, OW, C) at argmax; out-of-range indices are counted, skipped.

    Windows may overlap (stride < window), so two outputs can route to one input: the parallel loop runs over
    images, whose dx slices are disjoint.
    """
    n_size, hw, c_size = dx.shape
    oh_size, ow_size = dy.shape[1], dy.shape[2]
    for n in numba.prange(n_size):
        for a in range(hw):
            for c in range(c_size):
                dx[n, a, c] = 0.0
        bad = 0
        for oh in range(oh_size):
            for ow in range(ow_size):
                for c in range(c_size):
                    a = argmax[n, oh, ow, c]
                    if a >= 0 and a < hw:
                        dx[n, a, c] += dy[n, oh, ow, c]
                    else:
                        bad += 1
        n_bad[n] = bad


@parallel_kernel
def _avgpool_kernel(y, x, kh, kw, sh, sw, pt, pl):
    """y[n, oh, ow, c] = mean of the window's real elements."""
    n_size, h, w, c_size = x.shape
    oh_size, ow_size = y.shape[1], y.shape[2]
    for t in numba.prange(n_size * oh_size):
        n = t // oh_size
        oh = t % oh_size
        h0, h1 = _window(oh, sh, pt, kh, h)
        for ow in range(ow_size):
            w0, w1 = _window(ow, sw, pl, kw, w)
            for c in range(c_size):
                y[n, oh, ow, c] = 0.0
            for ih in range(h0, h1):
                for iw in range(w0, w1):
                    for c in range(c_size):
                        y[n, oh, ow, c] += x[n, ih, iw, c]
            inv_count = 1.0 / ((h1 - h0) * (w1 - w0))
            for c in range(c_size):
                y[n, oh, ow, c] *= inv_count


@parallel_kernel
def _avgpool_backward_kernel(dx, dy, kh, kw, sh, sw, pt, pl):
    """dx[n, ih, iw, c] = sum over the windows covering (ih, iw) of dy / (that window's real-element count).

    Written as a gather (each input element pulls from the outputs covering it) so every parallel row writes
    its own slice of dx and no zeroing pass is needed.
    """
    n_size, h, w, c_size = dx.shape
    oh_size, ow_size = dy.shape[1], dy.shape[2]
    for t in numba.prange(n_size * h):
        n = t // h
        ih = t % h
        oh0, oh1 = _covering(ih, sh, pt, kh, oh_size)
        for iw in range(w):
            ow0, ow1 = _covering(iw, sw, pl, kw, ow_size)
            for c in range(c_size):
                dx[n, ih, iw, c] = 0.0
            for oh in range(oh0, oh1):
                h0, h1 = _window(oh, sh, pt, kh, h)
                for ow in range(ow0, ow1):
                    w0, w1 = _window(ow, sw, pl, kw, w)
                    inv_count = 1.0 / ((h1 - h0) * (w1 - w0))
                    for c in range(c_size):
                        dx[n, ih, iw, c] += dy[n, oh, ow, c] * inv_count


# The global pooling kernels run serial: they see one small map per network (MobileNet's last, at most 0.5 M values
# at batch 32, res 128, where a serial pass takes ~0.1 ms of a ~250 ms training step), and a parallel build would add
# ~0.8 s each to a cold start.
@kernel
def _global_avgpool_kernel(y, x):
    """y[n, c] = mean over (H, W) of x[n, :, :, c], summed in float64 in (ih, iw) order."""
    n_size, h, w, c_size = x.shape
    xr = x.reshape(n_size, h * w, c_size)
    acc = np.empty(c_size, np.float64)
    for n in range(n_size):
        acc[:] = 0.0
        for p in range(h * w):
            for c in range(c_size):
                acc[c] += xr[n, p, c]
        for c in range(c_size):
            y[n, c] = acc[c] / (h * w)


@kernel
def _global_avgpool_backward_kernel(dx, dy):
    """dx[n, ih, iw, c] = dy[n, c] / (H * W)."""
    n_size, h, w, c_size = dx.shape
    dxr = dx.reshape(n_size, h * w, c_size)
    inv_count = 1.0 / (h * w)
    for n in range(n_size):
        for p in range(h * w):
            for c in range(c_size):
                dxr[n, p, c] = dy[n, c] * inv_count


def _resolve(x_shape, kernel_size, stride, padding):
    """Validated (kh, kw, sh, sw, geometry) for a pooling window on an NHWC shape.

    Explicit padding is limited to half the window (PyTorch's rule), so every window holds at least one real
    element: max pool always has a winner and average pool never divides by zero.
    """
    if stride is None:
        stride = kernel_size
    (kh, kw), (sh, sw), pad = normalize_window(kernel_size, stride, padding)
    if not isinstance(pad, str) and (pad[0] > kh // 2 or pad[1] > kw // 2):
        raise ValueError(f"padding must be at most half the window ({kh // 2}, {kw // 2}) for pooling "
                         f"(as in PyTorch), got {pad} for kernel_size {(kh, kw)}")
    geom = conv_geometry(x_shape[1], x_shape[2], (kh, kw), (sh, sw), pad)
    return kh, kw, sh, sw, geom


def _check_x_shape(x_shape):
    """Validate a backward's x_shape argument: four positive ints (N, H, W, C)."""
    try:
        dims = tuple(x_shape)
    except TypeError:
        raise TypeError(f"x_shape must be a tuple (N, H, W, C), got {x_shape!r}") from None
    if len(dims) != 4 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"x_shape must be four ints (N, H, W, C), got {x_shape!r}")
    if min(dims) < 1:
        raise ValueError(f"x_shape entries must be >= 1, got {x_shape!r}")
    return tuple(int(d) for d in dims)


def maxpool_forward(x, *, kernel_size, stride=None, padding="valid"):
    """2-D max pooling.

    Args:
        x: (N, H, W, C) float32/float64.
        kernel_size: int or (KH, KW).
        stride: int or (sh, sw); defaults to kernel_size.
        padding: 'valid', 'same' (TensorFlow's rule) or explicit int / (ph, pw), each at most half the window
            (as in PyTorch). Padded positions never win.

    Returns:
        (y, argmax): y (N, OH, OW, C), x's dtype; argmax (N, OH, OW, C) int32, the flat index ih * W + iw in
        the input image of each output's (first) maximum, which is what :func:`maxpool_backward` needs.
    """
    check_float_array("x", x, ndim=4, legend=_LEGEND)
    kh, kw, sh, sw, g = _resolve(x.shape, kernel_size, stride, padding)
    n_size, _, _, c_size = x.shape
    y = np.empty((n_size, g.oh, g.ow, c_size), x.dtype)
    argmax = np.empty((n_size, g.oh, g.ow, c_size), np.int32)
    _maxpool_kernel(y, argmax, np.ascontiguousarray(x), kh, kw, sh, sw, g.pt, g.pl)
    return y, argmax


def maxpool_backward(dy, argmax, x_shape):
    """Gradient of max pooling: each dy entry goes to the input element its argmax names.

    Args:
        dy: (N, OH, OW, C) float32/float64.
        argmax: (N, OH, OW, C) int32 from :func:`maxpool_forward`.
        x_shape: the forward input's shape (N, H, W, C).

    Returns:
        dx of shape x_shape, dy's dtype.
    """
    check_float_array("dy", dy, ndim=4, legend="(N, OH, OW, C)")
    n_size, h, w, c_size = _check_x_shape(x_shape)
    if dy.shape[0] != n_size or dy.shape[3] != c_size:
        raise ValueError(f"dy {dy.shape} must have the batch and channels of x_shape {tuple(x_shape)}")
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int32:
        got = argmax.dtype if isinstance(argmax, np.ndarray) else type(argmax).__name__
        raise TypeError(f"argmax must be the int32 array returned by maxpool_forward, got {got}")
    check_shape("argmax", argmax, dy.shape)
    dx = np.empty((n_size, h * w, c_size), dy.dtype)
    n_bad = np.empty(n_size, np.int64)
    _maxpool_backward_kernel(dx, n_bad, np.ascontiguousarray(dy), np.ascontiguousarray(argmax))
    if n_bad.any():
        raise ValueError(f"argmax has {int(n_bad.sum())} index(es) outside [0, H * W) = [0, {h * w}); "
                         f"it must come from maxpool_forward on an input of shape x_shape {tuple(x_shape)}")
    return dx.reshape(n_size, h, w, c_size)


def avgpool_forward(x, *, kernel_size, stride=None, padding="valid"):
    """2-D average pooling over the real (non-padded) elements of each window.

    Padded positions are excluded from both sum and count: TensorFlow/Keras's convention, which is PyTorch's
    ``avg_pool2d(..., count_include_pad=False)``.

    Args:
        x: (N, H, W, C) float32/float64.
        kernel_size: int or (KH, KW).
        stride: int or (sh, sw); defaults to kernel_size.
        padding: 'valid', 'same' (TensorFlow's rule) or explicit int / (ph, pw), each at most half the window.

    Returns:
        y (N, OH, OW, C), x's dtype.
    """
    check_float_array("x", x, ndim=4, legend=_LEGEND)
    kh, kw, sh, sw, g = _resolve(x.shape, kernel_size, stride, padding)
    y = np.empty((x.shape[0], g.oh, g.ow, x.shape[3]), x.dtype)
    _avgpool_kernel(y, np.ascontiguousarray(x), kh, kw, sh, sw, g.pt, g.pl)
    return y


def avgpool_backward(dy, x_shape, *, kernel_size, stride=None, padding="valid"):
    """Gradient of :func:`avgpool_forward` (same window arguments).

    Args:
        dy: (N, OH, OW, C) float32/float64.
        x_shape: the forward input's shape (N, H, W, C).
        kernel_size, stride, padding: as given to the forward.

    Returns:
        dx of shape x_shape, dy's dtype.
    """
    check_float_array("dy", dy, ndim=4, legend="(N, OH, OW, C)")
    x_shape = _check_x_shape(x_shape)
    kh, kw, sh, sw, g = _resolve(x_shape, kernel_size, stride, padding)
    check_shape("dy", dy, (x_shape[0], g.oh, g.ow, x_shape[3]))
    dx = np.empty(x_shape, dy.dtype)
    _avgpool_backward_kernel(dx, np.ascontiguousarray(dy), kh, kw, sh, sw, g.pt, g.pl)
    return dx


def global_avgpool_forward(x):
    """Mean over the spatial axes (MobileNet's pooling before the classifier).

    Args:
        x: (N, H, W, C) float32/float64.

    Returns:
        y (N, C), x's dtype.
    """
    check_float_array("x", x, ndim=4, legend=_LEGEND)
    y = np.empty((x.shape[0], x.shape[3]), x.dtype)
    _global_avgpool_kernel(y, np.ascontiguousarray(x))
    return y


def global_avgpool_backward(dy, x_shape):
    """Gradient of :func:`global_avgpool_forward`: dy spread evenly over the H * W positions.

    Args:
        dy: (N, C) float32/float64.
        x_shape: the forward input's shape (N, H, W, C).

    Returns:
        dx of shape x_shape, dy's dtype.
    """
    check_float_array("dy", dy, ndim=2, legend="(N, C)")
    x_shape = _check_x_shape(x_shape)
    check_shape("dy", dy, (x_shape[0], x_shape[3]))
    dx = np.empty(x_shape, dy.dtype)
    _global_avgpool_backward_kernel(dx, np.ascontiguousarray(dy))
    return dx
