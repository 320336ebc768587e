"""Inverted dropout: zero each element with probability ``rate`` and scale the survivors by 1 / (1 - rate).

Shape legend: any shape, typically (N, C) before MobileNet's classifier or (N, H, W, C); the kernels see the
flat contiguous view (size,).

Randomness comes from a caller-seeded ``numpy.random.Generator`` (same seed, same mask). The uniform draws are
made by NumPy in x's dtype straight into the mask buffer, which one pass then turns into the mask (0 or
1 / (1 - rate)) while writing y, so the forward touches memory twice and allocates nothing beyond its outputs.
"""
import numbers

import numba
import numpy as np

from kernels._check import check_float_array, check_same_dtype
from kernels._jit import sized_kernel


@sized_kernel
def _dropout_kernel(y, mask, x, rate, scale):
    """mask holds uniform [0, 1) draws on entry; keeps where draw >= rate (probability 1 - rate)."""
    for i in numba.prange(x.shape[0]):
        keep = scale if mask[i] >= rate else 0.0
        mask[i] = keep
        y[i] = x[i] * keep


@sized_kernel
def _multiply_kernel(dx, dy, mask):
    for i in numba.prange(dy.shape[0]):
        dx[i] = dy[i] * mask[i]


def dropout_forward(x, *, rate, rng):
    """Inverted dropout (training mode; at inference simply skip the layer).

    Args:
        x: float32/float64 array of any shape.
        rate: probability of dropping an element, in [0, 1). With rate 0, y is a copy of x, the mask is ones
            and rng is not drawn from.
        rng: a ``numpy.random.Generator`` seeded by the caller, e.g. ``np.random.default_rng(seed)``.

    Returns:
        (y, mask): both shaped like x, x's dtype; mask holds 0 or 1 / (1 - rate) and is what
        :func:`dropout_backward` needs.
    """
    check_float_array("x", x)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"rate must be a float in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1) (the probability of dropping an element), got {rate!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if rate == 0.0:
        return x.copy(), np.ones(x.shape, x.dtype)
    x_flat = np.ascontiguousarray(x).reshape(-1)  # (size,)
    mask = np.empty_like(x_flat)
    rng.random(out=mask, dtype=x.dtype)
    y = np.empty_like(x_flat)
    # The threshold in x's dtype, so a float32 draw is compared with the float32 rate it can actually equal.
    _dropout_kernel(y, mask, x_flat, x.dtype.type(rate), x.dtype.type(1.0 / (1.0 - rate)), work=x_flat.size)
    return y.reshape(x.shape), mask.reshape(x.shape)


def dropout_backward(dy, mask):
    """dx = dy * mask.

    Args:
        dy: upstream gradient, float32/float64, any shape.
        mask: from :func:`dropout_forward`, dy's shape and dtype.

    Returns:
        dx shaped like dy, dy's dtype.
    """
    check_float_array("dy", dy)
    check_float_array("mask", mask)
    if mask.shape != dy.shape:
        raise ValueError(f"mask must have the shape of dy {dy.shape}, got {mask.shape}")
    check_same_dtype(dy=dy, mask=mask)
    dy_flat = np.ascontiguousarray(dy).reshape(-1)  # (size,)
    dx = np.empty_like(dy_flat)
    _multiply_kernel(dx, dy_flat, np.ascontiguousarray(mask).reshape(-1), work=dy_flat.size)
    return dx.reshape(dy.shape)
