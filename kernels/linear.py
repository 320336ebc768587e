"""Fully connected layer: y = x @ w + b, with w stored (C, K) (Keras's Dense kernel layout).

Shape legend: N batch, C input features, K outputs (classes).

All products go to NumPy's BLAS from Python (never from inside a Numba parallel region, where two thread pools
would fight over the cores); the bias sum is a NumPy reduction in float64.
"""
import numpy as np

from kernels._check import check_float_array, check_same_dtype


def _check_pair(x_name, x, x_legend, w_name, w, w_legend):
    check_float_array(x_name, x, ndim=2, legend=x_legend)
    check_float_array(w_name, w, ndim=2, legend=w_legend)
    check_same_dtype(**{x_name: x, w_name: w})


def linear_forward(x, w, b=None):
    """y = x @ w (+ b).

    Args:
        x: (N, C) float32/float64.
        w: (C, K), x's dtype.
        b: optional (K,), x's dtype.

    Returns:
        y (N, K), x's dtype.
    """
    _check_pair("x", x, "(N, C)", "w", w, "(C, K)")
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w must have shape ({x.shape[1]}, K) to match the {x.shape[1]} features of x, "
                         f"got {w.shape}")
    y = np.empty((x.shape[0], w.shape[1]), x.dtype)
    np.matmul(x, w, out=y)
    if b is not None:
        check_float_array("b", b, ndim=1, legend="(K,)")
        if b.shape[0] != w.shape[1]:
            raise ValueError(f"b must have shape ({w.shape[1]},) to match w {w.shape}, got {b.shape}")
        check_same_dtype(x=x, b=b)
        y += b
    return y


def linear_backward_input(dy, w):
    """dx = dy @ w.T.

    Args:
        dy: (N, K) float32/float64.
        w: (C, K), dy's dtype.

    Returns:
        dx (N, C), dy's dtype.
    """
    _check_pair("dy", dy, "(N, K)", "w", w, "(C, K)")
    if w.shape[1] != dy.shape[1]:
        raise ValueError(f"w must have shape (C, {dy.shape[1]}) to match the {dy.shape[1]} outputs of dy, "
                         f"got {w.shape}")
    dx = np.empty((dy.shape[0], w.shape[0]), dy.dtype)
    np.matmul(dy, w.T, out=dx)  # (N, K) @ (K, C)
    return dx


def linear_backward_weight(dy, x):
    """dw = x.T @ dy.

    Args:
        dy: (N, K) float32/float64.
        x: (N, C), the forward input, dy's dtype.

    Returns:
        dw (C, K), dy's dtype.
    """
    _check_pair("dy", dy, "(N, K)", "x", x, "(N, C)")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x must have shape ({dy.shape[0]}, C) to match the batch of dy {dy.shape}, "
                         f"got {x.shape}")
    dw = np.empty((x.shape[1], dy.shape[1]), dy.dtype)
    np.matmul(x.T, dy, out=dw)  # (C, N) @ (N, K)
    return dw


def linear_backward_bias(dy):
    """db = sum of dy over the batch.

    Args:
        dy: (N, K) float32/float64.

    Returns:
        db (K,), dy's dtype.
    """
    check_float_array("dy", dy, ndim=2, legend="(N, K)")
    return dy.sum(axis=0, dtype=np.float64).astype(dy.dtype)
