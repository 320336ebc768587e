"""Pointwise (1x1, stride 1) convolution, NHWC: forward and backward as single BLAS calls.

Shape legend:
    N batch, H W spatial size (unchanged by a 1x1 conv), C input channels, K output channels.

A 1x1 convolution is a matrix product over pixels: with x2d = x.reshape(N*H*W, C) and w (C, K),
    forward          y2d = x2d @ w                      (NHW, K)
    backward input   dx2d = dy2d @ w.T                  (NHW, C)
    backward weight  dw = x2d.T @ dy2d                  (C, K)   (as (dy2d.T @ x2d).T for C <= 32, see below)
    backward bias    db = ones(NHW) @ dy2d              (K,)
Each is one np.matmul from Python, so it runs in NumPy's BLAS with its own threads; transposes are BLAS flags, not
copies. ``out=`` lets a layer reuse a buffer across steps; it must be C-contiguous so its 2-D view is not a copy.
"""
import numpy as np

from ._check import check_float_array, check_same_dtype, check_shape


def _check_out(out, shape, dtype):
    """Require a preallocated output buffer of exactly the result's shape and dtype, C-contiguous."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} to match the inputs, got {out.dtype}")
    check_shape("out", out, shape)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous (results are written through a 2-D view of it), got a "
                         "non-contiguous array")
    return out


def _result(out, shape, dtype):
    return np.empty(shape, dtype) if out is None else _check_out(out, shape, dtype)


def _as_rows(x):
    """View x (N, H, W, C) as (N*H*W, C); copies only if x is not C-contiguous."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (NHW, C)


def _check_x_w(x, w):
    check_float_array("x", x, 4, "(N, H, W, C)")
    check_float_array("w", w, 2, "(C, K)")
    check_same_dtype(x=x, w=w)
    if w.shape[0] != x.shape[3]:
        raise ValueError(f"w must have shape (C, K) with C={x.shape[3]} input channels to match x {x.shape}, "
                         f"got w shape {w.shape}")


def pointwise_forward(x, w, b=None, *, out=None):
    """y = x @ w (+ b) over every pixel.

    Args:
        x: (N, H, W, C) float32 or float64, any strides.
        w: (C, K), same dtype.
        b: optional bias (K,), same dtype.
        out: optional C-contiguous (N, H, W, K) buffer of the same dtype to write into.

    Returns:
        y: (N, H, W, K), x's dtype (``out`` itself when given).
    """
    _check_x_w(x, w)
    N, H, W, _ = x.shape
    K = w.shape[1]
    if b is not None:
        check_float_array("b", b, 1, "(K,)")
        check_shape("b", b, (K,))
    check_same_dtype(x=x, w=w, b=b)
    y = _result(out, (N, H, W, K), x.dtype)
    y2d = y.reshape(N * H * W, K)  # (NHW, K), a view: y is C-contiguous
    np.matmul(_as_rows(x), w, out=y2d)
    if b is not None:
        y2d += b
    return y


def pointwise_backward_input(dy, w, *, out=None):
    """dx = dy @ w.T over every pixel.

    Args:
        dy: (N, H, W, K) upstream gradient, float32 or float64, any strides.
        w: (C, K), same dtype.
        out: optional C-contiguous (N, H, W, C) buffer of the same dtype to write into.

    Returns:
        dx: (N, H, W, C), dy's dtype.
    """
    check_float_array("dy", dy, 4, "(N, H, W, K)")
    check_float_array("w", w, 2, "(C, K)")
    check_same_dtype(dy=dy, w=w)
    if w.shape[1] != dy.shape[3]:
        raise ValueError(f"w must have shape (C, K) with K={dy.shape[3]} output channels to match dy {dy.shape}, "
                         f"got w shape {w.shape}")
    N, H, W, _ = dy.shape
    C = w.shape[0]
    dx = _result(out, (N, H, W, C), dy.dtype)
    np.matmul(_as_rows(dy), w.T, out=dx.reshape(N * H * W, C))  # (NHW, K) @ (K, C)
    return dx


# Up to this many input channels the weight gradient is computed as (dy2d.T @ x2d).T: the same product with the
# operands' roles swapped, so that OpenBLAS's output is (K, C) and the C-by-K result is transposed back (a copy of
# C*K values). The product's depth is N*H*W (up to 131,072) and its output tiny; with x2d.T first, OpenBLAS 0.3.31
# on two threads ran such thin products up to 2x slower than on one. Measured on the Intel Xeon of round 21, 2
# threads, the two orders alternating: 131072x16 -> 32 2.20x, 131072x32 -> 64 1.65x, 32768x16 -> 32 2.19x,
# 32768x32 -> 64 1.82x, 8192x32 -> 64 1.48x; on one thread 0.97x and 1.16x. From 64 channels the gains fall to
# 0.92-1.24x, and on the AMD EPYC of round 18 the swapped order lost 0-11% there while gaining at 16 and 32
# channels (1.13x and 1.30x). The sums run in another order, so dw moves in the last bits.
_SWAPPED_MAX_CHANNELS = 32


def swaps_weight_product(in_channels):
    """Whether :func:`pointwise_backward_weight` multiplies a 1x1 conv with ``in_channels`` inputs as
    (dy2d.T @ x2d).T rather than x2d.T @ dy2d (the benchmarks time the bare product in the same order)."""
    return in_channels <= _SWAPPED_MAX_CHANNELS


def pointwise_backward_weight(dy, x, *, out=None):
    """dw = x2d.T @ dy2d, summed over every pixel of the batch.

    Args:
        dy: (N, H, W, K) upstream gradient, float32 or float64, any strides.
        x: (N, H, W, C) forward input, same dtype.
        out: optional C-contiguous (C, K) buffer of the same dtype to write into (overwritten, not accumulated).

    Returns:
        dw: (C, K), dy's dtype.
    """
    check_float_array("dy", dy, 4, "(N, H, W, K)")
    check_float_array("x", x, 4, "(N, H, W, C)")
    check_same_dtype(dy=dy, x=x)
    if dy.shape[:3] != x.shape[:3]:
        raise ValueError(f"dy must have the batch and spatial size of x, (N, H, W) = {x.shape[:3]}, "
                         f"got dy shape {dy.shape}")
    dw = _result(out, (x.shape[3], dy.shape[3]), dy.dtype)
    if swaps_weight_product(x.shape[3]):
        dw[...] = np.matmul(_as_rows(dy).T, _as_rows(x)).T  # ((K, NHW) @ (NHW, C)).T
    else:
        np.matmul(_as_rows(x).T, _as_rows(dy), out=dw)  # (C, NHW) @ (NHW, K)
    return dw


def pointwise_backward_bias(dy):
    """db = dy summed over batch and pixels.

    A matrix-vector product with ones rather than ``sum(axis=0)``: BLAS does it in one blocked pass, about twice
    as fast as NumPy's row-by-row column reduction.

    Args:
        dy: (N, H, W, K) upstream gradient, float32 or float64, any strides.

    Returns:
        db: (K,), dy's dtype.
    """
    check_float_array("dy", dy, 4, "(N, H, W, K)")
    dy2d = _as_rows(dy)  # (NHW, K)
    return np.ones(dy2d.shape[0], dy.dtype) @ dy2d
