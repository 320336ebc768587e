"""Standard 2-D convolution, NHWC with HWIO weights (as Keras): forward and backward.

Shape legend:
    N batch, H W input size, C input channels, K output channels, KH KW kernel, OH OW output size,
    sh sw strides, pt pb pl pr zero padding top/bottom/left/right (from geometry.conv_geometry).

Design: im2col + one GEMM. A Numba loop (parallel over output rows when large) copies each output pixel's
receptive field into one row of ``cols`` (N*OH*OW, KH*KW*C) with columns ordered (kh, kw, c), which is exactly the
row order of ``w.reshape(KH*KW*C, K)`` for HWIO weights, so
    forward          y2d   = cols @ w2d            (NOHOW, K); a chunk of images at a time when the caller keeps no
                     rows (see _CHUNK_BYTES)
    backward weight  dw2d  = cols.T @ dy2d         (KH*KW*C, K)
    backward input   dcols = dy2d @ w2d.T          (NOHOW, KH*KW*C), then col2im adds each entry back onto the input
                     pixel it was copied from.
The GEMMs run in NumPy's BLAS, called from Python: BLAS threads must not start inside a parallel Numba region.
Padding is never materialised: im2col writes zeros for taps that fall in the padding, col2im skips them.
col2im is written as a gather over input rows (n, ih), so each parallel iteration owns the rows it writes.
The forward and the weight gradient accept ``cols`` from :func:`im2col`, so a layer can build it once per step.
"""
import numpy as np
from numba import prange

from ._check import check_float_array, check_same_dtype, check_shape
from ._jit import parallel_kernel, sized_kernel
from .geometry import conv_geometry, normalize_window
from .pointwise import pointwise_backward_bias


@sized_kernel(noalias=True)
def _im2col(cols, x, sh, sw, pt, pl):
    """cols[n, oh, ow, kh, kw, :] = x[n, oh*sh - pt + kh, ow*sw - pl + kw, :], or 0 in the padding.

    cols: (N, OH, OW, KH, KW, C) output, written entirely; x: (N, H, W, C), contiguous.
    Both are read flat, with unsigned offsets, and a window row whose KW taps all lie inside the input is one run
    of KW*C values, copied in one loop. With a slice per (ow, kh, kw), the input layer's im2col (C = 3) paid more
    for the slices than for the copying; a view of a row costs two atomic reference-count updates of its own.
    """
    N, OH, OW, KH, KW, C = cols.shape
    H, W = x.shape[1], x.shape[2]
    cf, xf = cols.reshape(-1), x.reshape(-1)
    u = np.uint64
    Cu = u(C)
    KC = u(KW * C)
    for r in prange(N * OH):
        n = r // OH
        oh = r - n * OH
        rb = u(r * OW * KH) * KC  # this output row's windows
        for ow in range(OW):
            iw0 = ow * sw - pl
            inside = 0 <= iw0 and iw0 + KW <= W
            for kh in range(KH):
                ih = oh * sh - pt + kh
                o = rb + u(ow * KH + kh) * KC
                if ih < 0 or ih >= H:
                    for j in range(KC):
                        cf[o + j] = 0.0
                    continue
                xb = u((n * H + ih) * W) * Cu
                if inside:
                    k = xb + u(iw0) * Cu
                    for j in range(KC):
                        cf[o + j] = xf[k + j]
                    continue
                for kw in range(KW):
                    iw = iw0 + kw
                    ok = o + u(kw) * Cu
                    if 0 <= iw < W:
                        k = xb + u(iw) * Cu
                        for c in range(Cu):
                            cf[ok + c] = xf[k + c]
                    else:
                        for c in range(Cu):
                            cf[ok + c] = 0.0


@parallel_kernel(noalias=True)
def _col2im(dx, dcols, sh, sw, pt, pl):
    """dx[n, ih, iw, :] = sum of dcols[n, oh, ow, kh, kw, :] over all (oh, ow, kh, kw) that read x[n, ih, iw].

    dx: (N, H, W, C) output, written entirely; dcols: (N, OH, OW, KH, KW, C), contiguous; both read flat.
    Input row ih is read by output row oh through tap kh when oh*sh - pt + kh == ih.
    """
    N, H, W, C = dx.shape
    OH, OW, KH, KW = dcols.shape[1], dcols.shape[2], dcols.shape[3], dcols.shape[4]
    dxf, df = dx.reshape(-1), dcols.reshape(-1)
    u = np.uint64
    Cu = u(C)
    for r in prange(N * H):
        n = r // H
        ih = r - n * H
        xb = u(r * W) * Cu
        for j in range(u(W) * Cu):
            dxf[xb + j] = 0.0
        for kh in range(KH):
            t = ih + pt - kh
            if t < 0 or t % sh != 0 or t // sh >= OH:
                continue
            oh = t // sh
            for ow in range(OW):
                for kw in range(KW):
                    iw = ow * sw - pl + kw
                    if 0 <= iw < W:
                        s0 = u((((n * OH + oh) * OW + ow) * KH + kh) * KW + kw) * Cu
                        d0 = xb + u(iw) * Cu
                        for c in range(Cu):
                            dxf[d0 + c] += df[s0 + c]


def _check_shape_arg(name, shape, legend):
    """Require a 4-tuple of positive ints (a shape passed to a backward call), returned as a tuple."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of 4 ints {legend}, got {shape!r}") from None
    if len(shape) != 4 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"{name} must be a tuple of 4 ints {legend}, got {shape!r}")
    if min(shape) < 1:
        raise ValueError(f"{name} must have every size >= 1 {legend}, got {shape!r}")
    return tuple(int(s) for s in shape)


def _check_channels(x_shape, w_shape, legend):
    """Require w's axis 2 (input channels) to equal x's channels."""
    if w_shape[2] != x_shape[3]:
        raise ValueError(f"w must have C={x_shape[3]} input channels on axis 2 of {legend} to match the input "
                         f"{x_shape}, got w shape {w_shape}")


def _check_dy(dy, expected, legend):
    check_float_array("dy", dy, 4, legend)
    check_shape("dy", dy, expected)


def _cols(x, w_shape, g, stride):
    """im2col of x for a KH x KW window: (N*OH*OW, KH*KW*C)."""
    N, _, _, C = x.shape
    KH, KW = w_shape[0], w_shape[1]
    sh, sw = normalize_window((KH, KW), stride, "valid")[1]
    cols = np.empty((N, g.oh, g.ow, KH, KW, C), x.dtype)
    _im2col(cols, np.ascontiguousarray(x), sh, sw, g.pt, g.pl, work=cols.size)
    return cols.reshape(N * g.oh * g.ow, KH * KW * C)  # (NOHOW, KH*KW*C)


def im2col(x, w_shape, *, stride=1, padding="valid"):
    """The receptive fields of every output pixel, one per row: what the forward and the weight gradient multiply.

    A layer can compute this once in the forward pass and hand it to :func:`conv2d_forward` and
    :func:`conv2d_backward_weight` (``cols=``), so the backward pass does not rebuild it. Worth it when the rows
    are short (the input layer: KH*KW*C = 27 values per output pixel against K = 32 outputs).

    Args:
        x: (N, H, W, C) float32 or float64, any strides.
        w_shape: (KH, KW, C, K) of the weights.
        stride, padding: as in :func:`conv2d_forward`.

    Returns:
        cols: (N*OH*OW, KH*KW*C), x's dtype; row (n*OH + oh)*OW + ow, column (kh*KW + kw)*C + c.
    """
    check_float_array("x", x, 4, "(N, H, W, C)")
    w_shape = _check_shape_arg("w_shape", w_shape, "(KH, KW, C, K)")
    _check_channels(x.shape, w_shape, "(KH, KW, C, K)")
    g = conv_geometry(x.shape[1], x.shape[2], w_shape[:2], stride, padding)
    return _cols(x, w_shape, g, stride)


def _given_cols(cols, x, w_shape, g, stride):
    """``cols`` checked against x and the geometry, or computed when None."""
    if cols is None:
        return _cols(x, w_shape, g, stride)
    N, _, _, C = x.shape
    check_float_array("cols", cols, 2, "(N*OH*OW, KH*KW*C)")
    check_shape("cols", cols, (N * g.oh * g.ow, w_shape[0] * w_shape[1] * C))
    check_same_dtype(x=x, cols=cols)
    return cols


def conv2d_forward(x, w, b=None, *, stride=1, padding="valid", cols=None):
    """Standard convolution (cross-correlation, as in every DL framework).

    y[n, oh, ow, k] = b[k] + sum_{kh, kw, c} x[n, oh*sh - pt + kh, ow*sw - pl + kw, c] * w[kh, kw, c, k]

    Args:
        x: (N, H, W, C) float32 or float64, any strides.
        w: (KH, KW, C, K), same dtype.
        b: optional bias (K,), same dtype.
        stride: int or (sh, sw).
        padding: 'same' (TensorFlow rule, odd pad bottom/right), 'valid', int or (ph, pw).
        cols: optional ``im2col(x, w.shape, stride=stride, padding=padding)``, computed here when None (a chunk of
            images at a time, see ``_CHUNK_BYTES``).

    Returns:
        y: (N, OH, OW, K), x's dtype.
    """
    check_float_array("x", x, 4, "(N, H, W, C)")
    check_float_array("w", w, 4, "(KH, KW, C, K)")
    if b is not None:
        check_float_array("b", b, 1, "(K,)")
        check_shape("b", b, (w.shape[3],))
    check_same_dtype(x=x, w=w, b=b)
    _check_channels(x.shape, w.shape, "(KH, KW, C, K)")
    N, H, W, C = x.shape
    KH, KW, _, K = w.shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    y = np.empty((N, g.oh, g.ow, K), x.dtype)
    y2d = y.reshape(N * g.oh * g.ow, K)  # (NOHOW, K)
    w2d = w.reshape(KH * KW * C, K)
    images = _images_per_chunk(N, g.oh * g.ow * KH * KW * C * x.dtype.itemsize) if cols is None else N
    if images < N:  # rows for a few images at a time, each chunk multiplied while its rows are in cache
        x = np.ascontiguousarray(x)
        pixels = g.oh * g.ow
        for n0 in range(0, N, images):
            n1 = min(N, n0 + images)
            np.matmul(_cols(x[n0:n1], w.shape, g, stride), w2d, out=y2d[n0 * pixels:n1 * pixels])
    else:
        np.matmul(_given_cols(cols, x, w.shape, g, stride), w2d, out=y2d)
    if b is not None:
        y2d += b
    return y


# Without im2col rows to reuse, the forward builds them for chunks of images of about this many bytes (at least one
# image) and multiplies each chunk while it is still in cache, instead of writing the whole batch's rows to memory
# and reading them back. Round 19, the input layer alone, alternating: 32x128x128x3 -> 16 and -> 32 (stride 2,
# 442 KB of rows per image, two images a chunk) 1.15-1.20x, 32x224x224x3 -> 32 (1.35 MB, one image) 1.50x; four
# images 1.17-1.19x and 0.97x, eight 1.03-1.06x. At those shapes each chunk is a GEMM of thousands of rows and
# gives the whole batch's bits; for a chunk of very few rows BLAS may sum in another order (within rounding).
_CHUNK_BYTES = 1 << 20


def _images_per_chunk(N, row_bytes):
    """How many images :func:`conv2d_forward` takes per chunk when their im2col rows take ``row_bytes`` each (N:
    the whole batch when all of its rows fit in two chunks)."""
    if N * row_bytes <= 2 * _CHUNK_BYTES:
        return N
    return max(1, _CHUNK_BYTES // row_bytes)


def conv2d_backward_input(dy, w, x_shape, *, stride=1, padding="valid"):
    """Gradient of the loss with respect to the convolution's input.

    Args:
        dy: (N, OH, OW, K) upstream gradient, float32 or float64, any strides.
        w: (KH, KW, C, K), same dtype.
        x_shape: (N, H, W, C) of the forward input.
        stride, padding: as in the forward call.

    Returns:
        dx: (N, H, W, C), dy's dtype.
    """
    x_shape = _check_shape_arg("x_shape", x_shape, "(N, H, W, C)")
    check_float_array("w", w, 4, "(KH, KW, C, K)")
    _check_channels(x_shape, w.shape, "(KH, KW, C, K)")
    N, H, W, C = x_shape
    KH, KW, _, K = w.shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    _check_dy(dy, (N, g.oh, g.ow, K), "(N, OH, OW, K)")
    check_same_dtype(dy=dy, w=w)
    dy2d = np.ascontiguousarray(dy).reshape(N * g.oh * g.ow, K)  # (NOHOW, K)
    dcols = dy2d @ w.reshape(KH * KW * C, K).T  # (NOHOW, KH*KW*C)
    dx = np.empty(x_shape, dy.dtype)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    _col2im(dx, dcols.reshape(N, g.oh, g.ow, KH, KW, C), sh, sw, g.pt, g.pl)
    return dx


def conv2d_backward_weight(dy, x, w_shape, *, stride=1, padding="valid", cols=None):
    """Gradient of the loss with respect to the convolution's weights.

    Args:
        dy: (N, OH, OW, K) upstream gradient, float32 or float64, any strides.
        x: (N, H, W, C) forward input, same dtype.
        w_shape: (KH, KW, C, K) of the weights.
        stride, padding: as in the forward call.
        cols: optional ``im2col(x, w_shape, stride=stride, padding=padding)``, computed here when None.

    Returns:
        dw: (KH, KW, C, K), dy's dtype.
    """
    w_shape = _check_shape_arg("w_shape", w_shape, "(KH, KW, C, K)")
    check_float_array("x", x, 4, "(N, H, W, C)")
    _check_channels(x.shape, w_shape, "(KH, KW, C, K)")
    N, H, W, C = x.shape
    KH, KW, _, K = w_shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    _check_dy(dy, (N, g.oh, g.ow, K), "(N, OH, OW, K)")
    check_same_dtype(dy=dy, x=x)
    cols = _given_cols(cols, x, w_shape, g, stride)
    dy2d = np.ascontiguousarray(dy).reshape(N * g.oh * g.ow, K)  # (NOHOW, K)
    return (cols.T @ dy2d).reshape(w_shape)  # (KH*KW*C, NOHOW) @ (NOHOW, K)


def conv2d_backward_bias(dy):
    """Gradient of the loss with respect to the bias: dy summed over batch and pixels.

    Args:
        dy: (N, OH, OW, K) upstream gradient, float32 or float64, any strides.

    Returns:
        db: (K,), dy's dtype.
    """
    return pointwise_backward_bias(dy)  # the bias gradient does not depend on the window
