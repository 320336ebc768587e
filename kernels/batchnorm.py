"""Batch normalization over the channel axis, NHWC (or (N, C) after a flatten).

Shape legend: N batch, H W input size, C channels; M = N * H * W rows of the (M, C) view every kernel works on
(an NHWC array reshaped without a copy), so one code path serves 4-D and 2-D input.

Memory-bound passes, written to touch memory as few times as possible:
    train forward   statistics: one streaming pass (each thread's rows, block by block: a block's sum and then
                    its squared deviations are read from cache, blocks merged with Chan's formula);
                    normalize: one pass reading x, writing x_hat and y.
    backward        sums of dy and dy * x_hat: one pass; dx: one pass.
Sums accumulate in float64 per thread and are combined afterwards, so float32 statistics do not drift with M.
"""
import numba
import numpy as np

from kernels._check import check_float_array, check_same_dtype
from kernels._jit import kernel, parallel_kernel

# Rows per statistics block: a block (rows x C) is read twice, the second time from cache, so it must fit in L2.
_BLOCK_BYTES = 128 * 1024


@parallel_kernel
def _stats_kernel(count_out, mean_out, m2_out, x, block_rows):
    """Per-chunk (count, mean, sum of squared deviations) of each channel, in float64.

    count_out (P,), mean_out (P, C), m2_out (P, C): one row per chunk of rows of x (M, C). Within a chunk, each
    block of ``block_rows`` rows is reduced in two passes (mean, then squared deviations from that mean; the
    second pass hits cache) and merged into the chunk's running result with Chan et al.'s formula
        mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 * n_a * n_b / n,   d = mean_b - mean_a,
    which is as stable as a two-pass variance and reads x from memory once.
    """
    n_chunks = count_out.shape[0]
    m, c_size = x.shape
    for p in numba.prange(n_chunks):
        start = p * m // n_chunks
        stop = (p + 1) * m // n_chunks
        block_mean = np.empty(c_size, np.float64)
        block_m2 = np.empty(c_size, np.float64)
        n_a = 0
        for c in range(c_size):
            mean_out[p, c] = 0.0
            m2_out[p, c] = 0.0
        for b0 in range(start, stop, block_rows):
            b1 = min(b0 + block_rows, stop)
            n_b = b1 - b0
            for c in range(c_size):
                block_mean[c] = 0.0
                block_m2[c] = 0.0
            for i in range(b0, b1):
                for c in range(c_size):
                    block_mean[c] += x[i, c]
            for c in range(c_size):
                block_mean[c] /= n_b
            for i in range(b0, b1):
                for c in range(c_size):
                    d = x[i, c] - block_mean[c]
                    block_m2[c] += d * d
            n = n_a + n_b
            for c in range(c_size):
                d = block_mean[c] - mean_out[p, c]
                mean_out[p, c] += d * (n_b / n)
                m2_out[p, c] += block_m2[c] + d * d * (n_a * (n_b / n))
            n_a = n
        count_out[p] = n_a


@kernel
def _merge_stats_kernel(mean_out, m2_out, count, mean, m2):
    """Merge per-chunk (count (P,), mean (P, C), m2 (P, C)) into mean_out (C,), m2_out (C,) (Chan's formula)."""
    n_a = 0
    c_size = mean_out.shape[0]
    for c in range(c_size):
        mean_out[c] = 0.0
        m2_out[c] = 0.0
    for p in range(count.shape[0]):
        n_b = count[p]
        if n_b == 0:
            continue
        n = n_a + n_b
        for c in range(c_size):
            d = mean[p, c] - mean_out[c]
            mean_out[c] += d * (n_b / n)
            m2_out[c] += m2[p, c] + d * d * (n_a * (n_b / n))
        n_a = n


@parallel_kernel
def _normalize_kernel(y, x_hat, x, mean, inv_std, gamma, beta):
    """x_hat = (x - mean) * inv_std and y = gamma * x_hat + beta, rows of (M, C); per-channel vectors (C,)."""
    m, c_size = x.shape
    for i in numba.prange(m):
        for c in range(c_size):
            xh = (x[i, c] - mean[c]) * inv_std[c]
            x_hat[i, c] = xh
            y[i, c] = gamma[c] * xh + beta[c]


@parallel_kernel
def _affine_kernel(y, x, scale, shift):
    """y = x * scale + shift, rows of (M, C); scale, shift (C,)."""
    m, c_size = x.shape
    for i in numba.prange(m):
        for c in range(c_size):
            y[i, c] = x[i, c] * scale[c] + shift[c]


@parallel_kernel
def _backward_sums_kernel(dbeta_part, dgamma_part, dy, x_hat):
    """Per-chunk float64 sums of dy and dy * x_hat over rows of (M, C) into (P, C) partials."""
    n_chunks = dbeta_part.shape[0]
    m, c_size = dy.shape
    for p in numba.prange(n_chunks):
        start = p * m // n_chunks
        stop = (p + 1) * m // n_chunks
        for c in range(c_size):
            dbeta_part[p, c] = 0.0
            dgamma_part[p, c] = 0.0
        for i in range(start, stop):
            for c in range(c_size):
                g = dy[i, c]
                dbeta_part[p, c] += g
                dgamma_part[p, c] += g * x_hat[i, c]


@parallel_kernel
def _backward_dx_kernel(dx, dy, x_hat, k, dbeta_mean, dgamma_mean):
    """dx = k * (dy - dbeta_mean - x_hat * dgamma_mean), rows of (M, C); per-channel vectors (C,)."""
    m, c_size = dy.shape
    for i in numba.prange(m):
        for c in range(c_size):
            dx[i, c] = k[c] * (dy[i, c] - dbeta_mean[c] - x_hat[i, c] * dgamma_mean[c])


def _n_chunks(m):
    """Chunks for the per-thread reductions: one per thread (never more than rows)."""
    return max(1, min(m, numba.get_num_threads()))


def _check_x(name, x):
    """Validate an activation for BN: float, 2-D (N, C) or 4-D (N, H, W, C)."""
    check_float_array(name, x)
    if x.ndim not in (2, 4):
        raise ValueError(f"{name} must be 4-D (N, H, W, C) or 2-D (N, C), got shape {x.shape}")
    return x


def _check_channel_vectors(c_size, x_name, **vectors):
    for name, v in vectors.items():
        check_float_array(name, v, ndim=1, legend="(C,)")
        if v.shape[0] != c_size:
            raise ValueError(f"{name} must have shape ({c_size},) to match the {c_size} channels of {x_name}, "
                             f"got {v.shape}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def batchnorm_forward_train(x, gamma, beta, running_mean, running_var, *, momentum=0.99, eps=1e-3):
    """Training-mode batch normalization with batch statistics; updates the running statistics in place.

    y = gamma * x_hat + beta,  x_hat = (x - mean) * inv_std,  inv_std = 1 / sqrt(var + eps), where mean and var
    are the per-channel statistics over the m = N * H * W values of the batch (var biased: divided by m).

    Running statistics follow Keras (``BatchNormalization(momentum=0.99)``):
        running = momentum * running + (1 - momentum) * batch_stat,
    where the variance fed to the running average is the unbiased batch variance var * m / (m - 1) (as TF's
    fused batch norm and PyTorch do), while normalization uses the biased one. For m = 1 the factor is taken
    as 1 (TF's choice): the batch variance is 0 and x_hat is 0.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64 activations.
        gamma, beta: (C,) scale and offset, x's dtype.
        running_mean, running_var: (C,) writable buffers, x's dtype; updated in place.
        momentum: decay of the running averages, in [0, 1].
        eps: added to the variance, > 0.

    Returns:
        (y, x_hat, inv_std): y and x_hat shaped like x (x's dtype); inv_std (C,) x's dtype. x_hat and inv_std
        are what :func:`batchnorm_backward` needs.
    """
    _check_x("x", x)
    c_size = x.shape[-1]
    _check_channel_vectors(c_size, "x", gamma=gamma, beta=beta, running_mean=running_mean,
                           running_var=running_var)
    check_same_dtype(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if not v.flags.writeable:
            raise ValueError(f"{name} must be writable: it is updated in place, got a read-only array")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (Keras convention, e.g. 0.99), got {momentum!r}")
    eps = _check_positive("eps", eps)

    x2 = np.ascontiguousarray(x).reshape(-1, c_size)  # (M, C)
    m = x2.shape[0]
    n_chunks = _n_chunks(m)
    count = np.empty(n_chunks, np.int64)
    mean_part = np.empty((n_chunks, c_size), np.float64)
    m2_part = np.empty((n_chunks, c_size), np.float64)
    block_rows = max(1, _BLOCK_BYTES // (c_size * x.itemsize))
    _stats_kernel(count, mean_part, m2_part, x2, block_rows)
    mean = np.empty(c_size, np.float64)
    m2 = np.empty(c_size, np.float64)
    _merge_stats_kernel(mean, m2, count, mean_part, m2_part)

    var = m2 / m  # biased, used to normalize
    inv_std64 = 1.0 / np.sqrt(var + eps)
    inv_std = inv_std64.astype(x.dtype)
    y = np.empty_like(x2)
    x_hat = np.empty_like(x2)
    _normalize_kernel(y, x_hat, x2, mean.astype(x.dtype), inv_std, np.ascontiguousarray(gamma),
                      np.ascontiguousarray(beta))

    unbiased_var = m2 / max(m - 1, 1)
    running_mean *= momentum
    running_mean += ((1.0 - momentum) * mean).astype(x.dtype)
    running_var *= momentum
    running_var += ((1.0 - momentum) * unbiased_var).astype(x.dtype)
    return y.reshape(x.shape), x_hat.reshape(x.shape), inv_std


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, *, eps=1e-3):
    """Inference-mode batch normalization with the running statistics (one pass: y = x * scale + shift).

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64.
        gamma, beta, running_mean, running_var: (C,), x's dtype.
        eps: added to the variance, > 0.

    Returns:
        y shaped like x, x's dtype.
    """
    _check_x("x", x)
    c_size = x.shape[-1]
    _check_channel_vectors(c_size, "x", gamma=gamma, beta=beta, running_mean=running_mean,
                           running_var=running_var)
    check_same_dtype(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    eps = _check_positive("eps", eps)
    scale64 = gamma.astype(np.float64) / np.sqrt(running_var.astype(np.float64) + eps)
    shift64 = beta.astype(np.float64) - running_mean.astype(np.float64) * scale64
    x2 = np.ascontiguousarray(x).reshape(-1, c_size)  # (M, C)
    y = np.empty_like(x2)
    _affine_kernel(y, x2, scale64.astype(x.dtype), shift64.astype(x.dtype))
    return y.reshape(x.shape)


def batchnorm_backward(dy, x_hat, inv_std, gamma):
    """Gradients of training-mode batch normalization (batch statistics depend on x).

    Args:
        dy: (N, H, W, C) or (N, C) upstream gradient, float32/float64.
        x_hat: normalized input from :func:`batchnorm_forward_train`, shaped like dy.
        inv_std: (C,) from the forward.
        gamma: (C,) scale.

    Returns:
        (dx, dgamma, dbeta): dx shaped like dy; dgamma, dbeta (C,); all dy's dtype.
    """
    _check_x("dy", dy)
    check_float_array("x_hat", x_hat)
    if x_hat.shape != dy.shape:
        raise ValueError(f"x_hat must have the shape of dy {dy.shape}, got {x_hat.shape}")
    c_size = dy.shape[-1]
    _check_channel_vectors(c_size, "dy", inv_std=inv_std, gamma=gamma)
    check_same_dtype(dy=dy, x_hat=x_hat, inv_std=inv_std, gamma=gamma)

    dy2 = np.ascontiguousarray(dy).reshape(-1, c_size)  # (M, C)
    x_hat2 = np.ascontiguousarray(x_hat).reshape(-1, c_size)  # (M, C)
    m = dy2.shape[0]
    n_chunks = _n_chunks(m)
    dbeta_part = np.empty((n_chunks, c_size), np.float64)
    dgamma_part = np.empty((n_chunks, c_size), np.float64)
    _backward_sums_kernel(dbeta_part, dgamma_part, dy2, x_hat2)
    dbeta64 = dbeta_part.sum(axis=0)
    dgamma64 = dgamma_part.sum(axis=0)

    # With y = gamma * x_hat + beta, x_hat = (x - mean) * inv_std, mean and var over the m rows of a channel:
    #   dbeta  = sum_i dy_i,        dgamma = sum_i dy_i * x_hat_i,
    #   dx_i   = gamma * inv_std * (dy_i - dbeta / m - x_hat_i * dgamma / m)
    # (the two subtracted terms are the paths through mean and var; eps does not change the form).
    k = gamma.astype(np.float64) * inv_std.astype(np.float64)
    dx = np.empty_like(dy2)
    _backward_dx_kernel(dx, dy2, x_hat2, k.astype(dy.dtype), (dbeta64 / m).astype(dy.dtype),
                        (dgamma64 / m).astype(dy.dtype))
    return dx.reshape(dy.shape), dgamma64.astype(dy.dtype), dbeta64.astype(dy.dtype)
