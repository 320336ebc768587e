"""Elementwise activations: ReLU and ReLU6 (MobileNet v1's activation), forward and backward.

Shape legend: any shape, typically (N, H, W, C) or (N, C); the kernels see the flat contiguous view (size,) so
one compiled loop per dtype serves every rank.

The backward takes the forward's output y (not x): for both functions "x was in the linear region" is the same
test on y (y > 0 for ReLU, 0 < y < 6 for ReLU6), and y is what the next layer already holds. At the kinks
(x == 0, x == 6) the gradient is 0, as in PyTorch. NaN propagates forward (a diverging run must stay visible).
MobileNet fuses these into the batch norm before them (``kernels.batchnorm``); these serve the unfused layers.
"""
import numba
import numpy as np

from kernels._check import check_float_array, check_same_dtype
from kernels._jit import sized_kernel


@sized_kernel
def _relu_kernel(y, x):
    for i in numba.prange(x.shape[0]):
        v = x[i]
        y[i] = 0.0 if v < 0.0 else v


@sized_kernel
def _relu6_kernel(y, x):
    for i in numba.prange(x.shape[0]):
        v = x[i]
        v = 0.0 if v < 0.0 else v
        y[i] = 6.0 if v > 6.0 else v


@sized_kernel
def _relu_backward_kernel(dx, dy, y):
    for i in numba.prange(dy.shape[0]):
        dx[i] = dy[i] if y[i] > 0.0 else 0.0


@sized_kernel
def _relu6_backward_kernel(dx, dy, y):
    for i in numba.prange(dy.shape[0]):
        v = y[i]
        dx[i] = dy[i] if (v > 0.0 and v < 6.0) else 0.0


def _forward(kernel_fn, x):
    check_float_array("x", x)
    x_flat = np.ascontiguousarray(x).reshape(-1)  # (size,)
    y = np.empty_like(x_flat)
    kernel_fn(y, x_flat, work=x_flat.size)
    return y.reshape(x.shape)


def _backward(kernel_fn, dy, y):
    check_float_array("dy", dy)
    check_float_array("y", y)
    if y.shape != dy.shape:
        raise ValueError(f"y (the forward output) must have the shape of dy {dy.shape}, got {y.shape}")
    check_same_dtype(dy=dy, y=y)
    dy_flat = np.ascontiguousarray(dy).reshape(-1)  # (size,)
    y_flat = np.ascontiguousarray(y).reshape(-1)  # (size,)
    dx = np.empty_like(dy_flat)
    kernel_fn(dx, dy_flat, y_flat, work=dx.size)
    return dx.reshape(dy.shape)


def relu_forward(x):
    """y = max(x, 0).

    Args:
        x: float32/float64 array of any shape, e.g. (N, H, W, C).

    Returns:
        y shaped like x, x's dtype.
    """
    return _forward(_relu_kernel, x)


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0.

    Args:
        dy: upstream gradient, any shape, float32/float64.
        y: the output of :func:`relu_forward`, dy's shape and dtype.

    Returns:
        dx shaped like dy, dy's dtype.
    """
    return _backward(_relu_backward_kernel, dy, y)


def relu6_forward(x):
    """y = min(max(x, 0), 6).

    Args:
        x: float32/float64 array of any shape, e.g. (N, H, W, C).

    Returns:
        y shaped like x, x's dtype.
    """
    return _forward(_relu6_kernel, x)


def relu6_backward(dy, y):
    """dx = dy where 0 < y < 6, else 0.

    Args:
        dy: upstream gradient, any shape, float32/float64.
        y: the output of :func:`relu6_forward`, dy's shape and dtype.

    Returns:
        dx shaped like dy, dy's dtype.
    """
    return _backward(_relu6_backward_kernel, dy, y)
