"""Naive loop oracles for batch norm, activations, pooling, linear and loss, plus small test helpers.

Each oracle is written straight from the definition with plain Python loops over scalars (float64 throughout,
``math.fsum`` for the sums), shares no code with ``kernels/`` and is itself checked against central
differences in the tests. Shapes follow the kernels' legend: NHWC, N batch, H W size, C channels, K classes.
Window geometry (padding amounts, output size) comes from ``kernels.geometry.conv_geometry``, the project's
single source of truth, which the PyTorch cross-checks test independently.
"""
import contextlib
import math

import numba
import numpy as np
import pytest
from hypothesis import strategies as st

from kernels import _jit
from kernels.geometry import conv_geometry

LAYOUTS = ("contiguous", "strided", "transposed")


@contextlib.contextmanager
def numba_threads(n):
    """Run the enclosed kernels on min(n, available) numba threads, restoring the previous count after.

    With n > 1, size-dispatched kernels (``kernels._jit.sized_kernel``) run their parallel version whatever the
    size, so a test's small arrays still exercise the threads' disjoint writes and chunked reductions.
    """
    previous = numba.get_num_threads(), _jit.PARALLEL_MIN_WORK
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if n > 1:
        _jit.PARALLEL_MIN_WORK = 0
    try:
        yield
    finally:
        numba.set_num_threads(previous[0])
        _jit.PARALLEL_MIN_WORK = previous[1]


@pytest.fixture(autouse=True, scope="module")
def one_numba_thread():
    """Run a test module's kernels on one thread (import this fixture into the module to activate it).

    Property tests make thousands of tiny kernel calls; on a shared machine every multi-threaded launch waits
    for a worker to be scheduled (about 1 ms under load, against 5 us idle), which would dominate the suite.
    The parallel loops are the same code either way; tests that need several threads (chunked reductions,
    disjoint writes) wrap their calls in ``numba_threads(2)``.
    """
    with numba_threads(1):
        yield


def import_torch():
    """PyTorch for the cross-checks (skip when absent), on one thread for the same reason as above."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@st.composite
def nhwc_cases(draw, max_batch=4, max_channels=8, max_size=12):
    """Draw (shape (N, H, W, C), seed, layout): geometry and a seed, never the floats themselves."""
    shape = (draw(st.integers(1, max_batch)), draw(st.integers(1, max_size)), draw(st.integers(1, max_size)),
             draw(st.integers(1, max_channels)))
    return shape, draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from(LAYOUTS))


def with_layout(x, layout):
    """Return an array equal to ``x`` in the given memory layout (a non-contiguous view unless 'contiguous')."""
    if layout == "contiguous":
        return np.ascontiguousarray(x)
    if layout == "strided":
        buf = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        view = buf[..., ::2]  # every other channel: strided last axis
        view[...] = x
        return view
    if layout == "transposed":
        return np.asfortranarray(x)  # same values, reversed strides
    raise ValueError(layout)


def window_indices(o, stride, pad_before, k, size):
    """Input indices of output position o's window that fall inside the image (padding skipped)."""
    start = o * stride - pad_before
    return [i for i in range(start, start + k) if 0 <= i < size]


# ---------------------------------------------------------------------------------------------- batch norm

def _channel_values(x, c):
    return [float(v) for v in x[..., c].reshape(-1)]


def batchnorm_train_oracle(x, gamma, beta, running_mean, running_var, momentum, eps):
    """Training-mode BN from the definition; returns (y, x_hat, inv_std, new_running_mean, new_running_var)."""
    c_size = x.shape[-1]
    y = np.zeros(x.shape)
    x_hat = np.zeros(x.shape)
    inv_std = np.zeros(c_size)
    new_mean = np.zeros(c_size)
    new_var = np.zeros(c_size)
    for c in range(c_size):
        values = _channel_values(x, c)
        m = len(values)
        mean = math.fsum(values) / m
        var = math.fsum((v - mean) ** 2 for v in values) / m
        inv_std[c] = 1.0 / math.sqrt(var + eps)
        for idx in np.ndindex(*x.shape[:-1]):
            x_hat[idx + (c,)] = (float(x[idx + (c,)]) - mean) * inv_std[c]
            y[idx + (c,)] = float(gamma[c]) * x_hat[idx + (c,)] + float(beta[c])
        unbiased = var * m / (m - 1) if m > 1 else var
        new_mean[c] = momentum * float(running_mean[c]) + (1 - momentum) * mean
        new_var[c] = momentum * float(running_var[c]) + (1 - momentum) * unbiased
    return y, x_hat, inv_std, new_mean, new_var


def batchnorm_eval_oracle(x, gamma, beta, running_mean, running_var, eps):
    """Inference-mode BN: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta."""
    y = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        c = idx[-1]
        y[idx] = (float(gamma[c]) * (float(x[idx]) - float(running_mean[c]))
                  / math.sqrt(float(running_var[c]) + eps) + float(beta[c]))
    return y


def batchnorm_backward_oracle(dy, x, gamma, eps):
    """BN backward through the computational graph x -> (mean, var) -> x_hat -> y, term by term.

    Deliberately not the kernel's compact formula: the chain rule through var and mean separately,
        dx_hat = dy * gamma
        dvar   = sum(dx_hat * (x - mean)) * -1/2 (var + eps)^(-3/2)
        dmean  = -sum(dx_hat) / sqrt(var + eps) + dvar * sum(-2 (x - mean)) / m
        dx     = dx_hat / sqrt(var + eps) + dvar * 2 (x - mean) / m + dmean / m.
    Returns (dx, dgamma, dbeta).
    """
    c_size = x.shape[-1]
    dx = np.zeros(x.shape)
    dgamma = np.zeros(c_size)
    dbeta = np.zeros(c_size)
    positions = list(np.ndindex(*x.shape[:-1]))
    for c in range(c_size):
        xs = [float(x[p + (c,)]) for p in positions]
        gs = [float(dy[p + (c,)]) for p in positions]
        m = len(xs)
        mean = math.fsum(xs) / m
        var = math.fsum((v - mean) ** 2 for v in xs) / m
        std = math.sqrt(var + eps)
        dxh = [g * float(gamma[c]) for g in gs]
        dvar = math.fsum(d * (v - mean) for d, v in zip(dxh, xs)) * -0.5 * (var + eps) ** -1.5
        dmean = -math.fsum(dxh) / std + dvar * math.fsum(-2.0 * (v - mean) for v in xs) / m
        for p, v, d in zip(positions, xs, dxh):
            dx[p + (c,)] = d / std + dvar * 2.0 * (v - mean) / m + dmean / m
        dgamma[c] = math.fsum(g * (v - mean) / std for g, v in zip(gs, xs))
        dbeta[c] = math.fsum(gs)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------------------------- activations

def relu_oracle(x):
    y = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        y[idx] = max(float(x[idx]), 0.0)
    return y


def relu_backward_oracle(dy, x):
    """Gradient from the forward input x (the kernel uses the output y)."""
    dx = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        dx[idx] = float(dy[idx]) if x[idx] > 0 else 0.0
    return dx


def relu6_oracle(x):
    y = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        y[idx] = min(max(float(x[idx]), 0.0), 6.0)
    return y


def relu6_backward_oracle(dy, x):
    dx = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        dx[idx] = float(dy[idx]) if 0 < x[idx] < 6 else 0.0
    return dx


# ---------------------------------------------------------------------------------------------- pooling

def _pool_windows(x_shape, kernel_size, stride, padding):
    """Yield (oh, ow, rows, cols) for every output position, rows/cols the in-image window indices."""
    kh, kw = kernel_size
    sh, sw = stride
    g = conv_geometry(x_shape[1], x_shape[2], kernel_size, stride, padding)
    for oh in range(g.oh):
        for ow in range(g.ow):
            yield oh, ow, window_indices(oh, sh, g.pt, kh, x_shape[1]), window_indices(ow, sw, g.pl, kw, x_shape[2])


def pool_output_hw(x_shape, kernel_size, stride, padding):
    g = conv_geometry(x_shape[1], x_shape[2], kernel_size, stride, padding)
    return g.oh, g.ow


def maxpool_oracle(x, kernel_size, stride, padding):
    """(y, argmax) with argmax = ih * W + iw of the first maximum in row-major window order."""
    n_size, _, w, c_size = x.shape
    oh_size, ow_size = pool_output_hw(x.shape, kernel_size, stride, padding)
    y = np.zeros((n_size, oh_size, ow_size, c_size))
    argmax = np.zeros((n_size, oh_size, ow_size, c_size), np.int64)
    for oh, ow, rows, cols in _pool_windows(x.shape, kernel_size, stride, padding):
        for n in range(n_size):
            for c in range(c_size):
                best, best_idx = -math.inf, -1
                for ih in rows:
                    for iw in cols:
                        if x[n, ih, iw, c] > best:
                            best, best_idx = float(x[n, ih, iw, c]), ih * w + iw
                y[n, oh, ow, c] = best
                argmax[n, oh, ow, c] = best_idx
    return y, argmax


def maxpool_backward_oracle(dy, argmax, x_shape):
    n_size, _, w, c_size = x_shape
    dx = np.zeros(x_shape)
    for n, oh, ow, c in np.ndindex(*dy.shape):
        a = int(argmax[n, oh, ow, c])
        dx[n, a // w, a % w, c] += float(dy[n, oh, ow, c])
    return dx


def avgpool_oracle(x, kernel_size, stride, padding):
    """Mean over each window's in-image elements (count_include_pad=False)."""
    n_size, _, _, c_size = x.shape
    oh_size, ow_size = pool_output_hw(x.shape, kernel_size, stride, padding)
    y = np.zeros((n_size, oh_size, ow_size, c_size))
    for oh, ow, rows, cols in _pool_windows(x.shape, kernel_size, stride, padding):
        for n in range(n_size):
            for c in range(c_size):
                vals = [float(x[n, ih, iw, c]) for ih in rows for iw in cols]
                y[n, oh, ow, c] = math.fsum(vals) / len(vals)
    return y


def avgpool_backward_oracle(dy, x_shape, kernel_size, stride, padding):
    """Scatter: each dy entry spread evenly over its window's in-image elements."""
    n_size, _, _, c_size = x_shape
    dx = np.zeros(x_shape)
    for oh, ow, rows, cols in _pool_windows(x_shape, kernel_size, stride, padding):
        count = len(rows) * len(cols)
        for n in range(n_size):
            for c in range(c_size):
                for ih in rows:
                    for iw in cols:
                        dx[n, ih, iw, c] += float(dy[n, oh, ow, c]) / count
    return dx


def global_avgpool_oracle(x):
    n_size, h, w, c_size = x.shape
    y = np.zeros((n_size, c_size))
    for n in range(n_size):
        for c in range(c_size):
            y[n, c] = math.fsum(float(x[n, ih, iw, c]) for ih in range(h) for iw in range(w)) / (h * w)
    return y


def global_avgpool_backward_oracle(dy, x_shape):
    n_size, h, w, c_size = x_shape
    dx = np.zeros(x_shape)
    for n, ih, iw, c in np.ndindex(*x_shape):
        dx[n, ih, iw, c] = float(dy[n, c]) / (h * w)
    return dx


# ---------------------------------------------------------------------------------------------- linear, loss

def linear_oracle(x, w, b=None):
    n_size, c_size = x.shape
    k_size = w.shape[1]
    y = np.zeros((n_size, k_size))
    for n in range(n_size):
        for k in range(k_size):
            y[n, k] = math.fsum(float(x[n, c]) * float(w[c, k]) for c in range(c_size))
            if b is not None:
                y[n, k] += float(b[k])
    return y


def linear_backward_oracle(dy, x, w):
    """(dx, dw, db) of y = x @ w + b for upstream dy."""
    n_size, c_size = x.shape
    k_size = w.shape[1]
    dx = np.zeros((n_size, c_size))
    dw = np.zeros((c_size, k_size))
    db = np.zeros(k_size)
    for n in range(n_size):
        for c in range(c_size):
            dx[n, c] = math.fsum(float(dy[n, k]) * float(w[c, k]) for k in range(k_size))
    for c in range(c_size):
        for k in range(k_size):
            dw[c, k] = math.fsum(float(x[n, c]) * float(dy[n, k]) for n in range(n_size))
    for k in range(k_size):
        db[k] = math.fsum(float(dy[n, k]) for n in range(n_size))
    return dx, dw, db


def softmax_cross_entropy_oracle(logits, labels, label_smoothing):
    """(loss, probs): mean over rows of -sum_k q_k log p_k, q = (1 - ls) onehot + ls / K; stable log-softmax."""
    n_size, k_size = logits.shape
    probs = np.zeros((n_size, k_size))
    losses = []
    for n in range(n_size):
        row = [float(v) for v in logits[n]]
        m = max(row)
        log_total = math.log(math.fsum(math.exp(v - m) for v in row))
        log_p = [v - m - log_total for v in row]
        q = [label_smoothing / k_size + (1 - label_smoothing) * (k == labels[n]) for k in range(k_size)]
        losses.append(-math.fsum(qk * lk for qk, lk in zip(q, log_p)))
        probs[n] = [math.exp(lk) for lk in log_p]
    return math.fsum(losses) / n_size, probs


def softmax_cross_entropy_backward_oracle(probs, labels, label_smoothing, scale):
    n_size, k_size = probs.shape
    d = np.zeros((n_size, k_size))
    for n in range(n_size):
        for k in range(k_size):
            q = label_smoothing / k_size + (1 - label_smoothing) * (k == labels[n])
            d[n, k] = scale * (float(probs[n, k]) - q) / n_size
    return d
