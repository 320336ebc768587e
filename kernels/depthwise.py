"""Depthwise 2-D convolution, NHWC, weights (KH, KW, C, M) as Keras DepthwiseConv2D: forward and backward.

Shape legend:
    N batch, H W input size, C input channels, M depth multiplier, C*M output channels (channel c*M + m is
    input channel c through filter m), KH KW kernel, OH OW output size, sh sw strides,
    pt pb pl pr zero padding top/bottom/left/right (from geometry.conv_geometry).

    y[n, oh, ow, c*M + m] = sum_{kh, kw} x[n, oh*sh - pt + kh, ow*sw - pl + kw, c] * w[kh, kw, c, m]

Design: direct loops, no im2col (a depthwise conv does only KH*KW mult-adds per output, so copying the receptive
fields would cost more than the arithmetic). The innermost loop always runs over contiguous channels, so LLVM
vectorizes it; padding is handled by loop bounds (:func:`_tap_range`), never by a padded copy of x.
    forward          parallel over output rows (n, oh): each iteration owns y[n, oh].
    backward input   parallel over input rows (n, ih), gathering from the output rows that read ih, so each
                     iteration owns dx[n, ih].
    backward weight  every pixel contributes to every tap, so rows are split into a fixed number of blocks, each
                     accumulating a private (KH, KW, C*M) partial sum, then the partials are added. The block count
                     does not depend on the thread count, so results are reproducible across machines.
The kernels are written for M == 1 (MobileNet's case). For M > 1 the wrappers repeat each input channel M times,
(N, H, W, C) -> (N, H, W, C*M), which turns the op into an M == 1 depthwise conv over C*M channels; dx is summed
back over the copies.
"""
import numpy as np
from numba import prange

from ._check import check_float_array, check_same_dtype
from ._jit import kernel, parallel_kernel
from .conv import _check_channels, _check_dy, _check_shape_arg
from .geometry import conv_geometry, normalize_window

_WEIGHT_BLOCKS = 16  # partial sums in the weight gradient: enough blocks to balance up to 16 threads

_W_LEGEND = "(KH, KW, C, M)"


@kernel
def _tap_range(kw, pl, sw, W, OW):
    """The output columns [lo, hi) whose tap kw lands inside the input: 0 <= ow*sw - pl + kw < W."""
    lo = max(0, -((kw - pl) // sw))  # ceil((pl - kw) / sw)
    hi = min(OW, (W - 1 + pl - kw) // sw + 1)
    return lo, hi


@kernel
def _runs(lo, hi, sw, C):
    """Split output columns [lo, hi) into runs contiguous in both the output row and the input row.

    Rows are flattened to (W*C,), so with stride 1 all of [lo, hi) is one run of (hi - lo)*C values and the
    innermost loop is long; with a larger stride each column is a run of C. Run q starts at column lo + q.

    Returns:
        (number of runs, values per run).
    """
    if hi <= lo:
        return 0, 0
    if sw == 1:
        return 1, (hi - lo) * C
    return hi - lo, C


@parallel_kernel
def _forward(y, x, wt, sh, sw, pt, pl):
    """y: (N, OH, OW, C) output, written entirely; x: (N, H, W, C); wt: (KH, KW, OW*C), w tiled OW times."""
    N, OH, OW, C = y.shape
    H, W = x.shape[1], x.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    yrows = y.reshape(N * OH, OW * C)
    xrows = x.reshape(N * H, W * C)
    for r in prange(N * OH):
        n = r // OH
        oh = r - n * OH
        yrow = yrows[r]
        yrow[:] = 0.0
        for kh in range(KH):
            ih = oh * sh - pt + kh
            if ih < 0 or ih >= H:
                continue
            xrow = xrows[n * H + ih]
            for kw in range(KW):
                lo, hi = _tap_range(kw, pl, sw, W, OW)
                runs, span = _runs(lo, hi, sw, C)
                for q in range(runs):
                    yo = (lo + q) * C
                    xo = ((lo + q) * sw - pl + kw) * C
                    dst = yrow[yo:yo + span]
                    src = xrow[xo:xo + span]
                    wv = wt[kh, kw, yo:yo + span]
                    for j in range(span):
                        dst[j] += src[j] * wv[j]


@parallel_kernel
def _backward_input(dx, dy, wt, sh, sw, pt, pl):
    """dx: (N, H, W, C) output, written entirely; dy: (N, OH, OW, C); wt: (KH, KW, OW*C), w tiled OW times.

    Input row ih is read by output row oh through tap kh when oh*sh - pt + kh == ih.
    """
    N, H, W, C = dx.shape
    OH, OW = dy.shape[1], dy.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    dxrows = dx.reshape(N * H, W * C)
    dyrows = dy.reshape(N * OH, OW * C)
    for r in prange(N * H):
        n = r // H
        ih = r - n * H
        dxrow = dxrows[r]
        dxrow[:] = 0.0
        for kh in range(KH):
            t = ih + pt - kh
            if t < 0 or t % sh != 0 or t // sh >= OH:
                continue
            dyrow = dyrows[n * OH + t // sh]
            for kw in range(KW):
                lo, hi = _tap_range(kw, pl, sw, W, OW)
                runs, span = _runs(lo, hi, sw, C)
                for q in range(runs):
                    yo = (lo + q) * C
                    xo = ((lo + q) * sw - pl + kw) * C
                    dst = dxrow[xo:xo + span]
                    src = dyrow[yo:yo + span]
                    wv = wt[kh, kw, yo:yo + span]
                    for j in range(span):
                        dst[j] += src[j] * wv[j]


@parallel_kernel
def _backward_weight(partial, dy, x, sh, sw, pt, pl):
    """partial: (B, KH, KW, OW*C) output, block b's sum over its share of output rows, still tiled along the row
    (entry ow*C + c belongs to channel c); dy: (N, OH, OW, C); x: (N, H, W, C)."""
    B, KH, KW = partial.shape[0], partial.shape[1], partial.shape[2]
    N, OH, OW, C = dy.shape
    H, W = x.shape[1], x.shape[2]
    dyrows = dy.reshape(N * OH, OW * C)
    xrows = x.reshape(N * H, W * C)
    rows = N * OH
    for blk in prange(B):
        acc = partial[blk]  # (KH, KW, OW*C)
        acc[:] = 0.0
        for r in range(blk * rows // B, (blk + 1) * rows // B):
            n = r // OH
            oh = r - n * OH
            dyrow = dyrows[r]
            for kh in range(KH):
                ih = oh * sh - pt + kh
                if ih < 0 or ih >= H:
                    continue
                xrow = xrows[n * H + ih]
                for kw in range(KW):
                    lo, hi = _tap_range(kw, pl, sw, W, OW)
                    runs, span = _runs(lo, hi, sw, C)
                    for q in range(runs):
                        yo = (lo + q) * C
                        xo = ((lo + q) * sw - pl + kw) * C
                        dst = acc[kh, kw, yo:yo + span]
                        src = xrow[xo:xo + span]
                        g = dyrow[yo:yo + span]
                        for j in range(span):
                            dst[j] += src[j] * g[j]


def _check_w(w):
    check_float_array("w", w, 4, _W_LEGEND)


def _tiled(w, OW):
    """w (KH, KW, C, M) -> (KH, KW, OW*C*M) with entry ow*C*M + c*M + m = w[kh, kw, c, m]: one weight per value
    of a flattened output row, so a stride-1 run over many columns is a plain elementwise product."""
    KH, KW, C, M = w.shape
    return np.ascontiguousarray(np.tile(w.reshape(KH, KW, C * M), (1, 1, OW)))  # (KH, KW, OW*C*M)


def _expand(x, M):
    """x (N, H, W, C) -> (N, H, W, C*M) with channel c*M + m = x[..., c]: the M == 1 view of a multiplier-M op."""
    x = np.ascontiguousarray(x)
    return x if M == 1 else np.repeat(x, M, axis=3)  # (N, H, W, C*M)


def depthwise_forward(x, w, *, stride=1, padding="valid"):
    """Depthwise convolution: each input channel convolved with its own M filters.

    Args:
        x: (N, H, W, C) float32 or float64, any strides.
        w: (KH, KW, C, M), same dtype; M is the depth multiplier.
        stride: int or (sh, sw).
        padding: 'same' (TensorFlow rule, odd pad bottom/right), 'valid', int or (ph, pw).

    Returns:
        y: (N, OH, OW, C*M), x's dtype; channel c*M + m is input channel c through filter m.
    """
    check_float_array("x", x, 4, "(N, H, W, C)")
    _check_w(w)
    check_same_dtype(x=x, w=w)
    _check_channels(x.shape, w.shape, _W_LEGEND)
    N, H, W, C = x.shape
    KH, KW, _, M = w.shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    y = np.empty((N, g.oh, g.ow, C * M), x.dtype)
    _forward(y, _expand(x, M), _tiled(w, g.ow), sh, sw, g.pt, g.pl)
    return y


def depthwise_backward_input(dy, w, x_shape, *, stride=1, padding="valid"):
    """Gradient of the loss with respect to the depthwise convolution's input.

    Args:
        dy: (N, OH, OW, C*M) upstream gradient, float32 or float64, any strides.
        w: (KH, KW, C, M), same dtype.
        x_shape: (N, H, W, C) of the forward input.
        stride, padding: as in the forward call.

    Returns:
        dx: (N, H, W, C), dy's dtype.
    """
    x_shape = _check_shape_arg("x_shape", x_shape, "(N, H, W, C)")
    _check_w(w)
    _check_channels(x_shape, w.shape, _W_LEGEND)
    N, H, W, C = x_shape
    KH, KW, _, M = w.shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    _check_dy(dy, (N, g.oh, g.ow, C * M), "(N, OH, OW, C*M)")
    check_same_dtype(dy=dy, w=w)
    dx = np.empty((N, H, W, C * M), dy.dtype)  # (N, H, W, C*M): gradient of each repeated channel
    _backward_input(dx, np.ascontiguousarray(dy), _tiled(w, g.ow), sh, sw, g.pt, g.pl)
    return dx if M == 1 else dx.reshape(N, H, W, C, M).sum(axis=4)  # (N, H, W, C)


def depthwise_backward_weight(dy, x, w_shape, *, stride=1, padding="valid"):
    """Gradient of the loss with respect to the depthwise convolution's weights.

    Args:
        dy: (N, OH, OW, C*M) upstream gradient, float32 or float64, any strides.
        x: (N, H, W, C) forward input, same dtype.
        w_shape: (KH, KW, C, M) of the weights.
        stride, padding: as in the forward call.

    Returns:
        dw: (KH, KW, C, M), dy's dtype.
    """
    w_shape = _check_shape_arg("w_shape", w_shape, _W_LEGEND)
    check_float_array("x", x, 4, "(N, H, W, C)")
    _check_channels(x.shape, w_shape, _W_LEGEND)
    N, H, W, C = x.shape
    KH, KW, _, M = w_shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    _check_dy(dy, (N, g.oh, g.ow, C * M), "(N, OH, OW, C*M)")
    check_same_dtype(dy=dy, x=x)
    blocks = min(_WEIGHT_BLOCKS, N * g.oh)
    partial = np.empty((blocks, KH, KW, g.ow * C * M), dy.dtype)  # (B, KH, KW, OW*C*M)
    _backward_weight(partial, np.ascontiguousarray(dy), _expand(x, M), sh, sw, g.pt, g.pl)
    return partial.sum(axis=0).reshape(KH, KW, g.ow, C, M).sum(axis=2)  # (KH, KW, C, M)
