"""Softmax cross-entropy with optional label smoothing, numerically stable (log-sum-exp).

Shape legend: N batch, K classes.

With p = softmax(z) and the target distribution q = (1 - ls) * onehot(label) + ls / K (Keras's and PyTorch's
label smoothing), the per-example loss is
    -sum_k q_k log p_k = lse(z) - (1 - ls) z_label - (ls / K) sum_k z_k,   lse(z) = m + log sum_k exp(z_k - m),
with m = max_k z_k so no exp overflows; its gradient with respect to z is p - q.

The kernels are serial: N x K is tiny (32 x 1000 at most) and a parallel launch would cost more than the work.
"""
import numbers

import numpy as np

from kernels._check import check_float_array
from kernels._jit import kernel


@kernel
def _forward_kernel(probs, row_loss, logits, labels, smoothing):
    """probs (N, K) = softmax of each row; row_loss (N,) float64 = that row's smoothed cross-entropy."""
    n_size, k_size = logits.shape
    for n in range(n_size):
        m = logits[n, 0]
        for k in range(1, k_size):
            m = max(m, logits[n, k])
        total = 0.0
        logit_sum = 0.0
        for k in range(k_size):
            e = np.exp(logits[n, k] - m)
            probs[n, k] = e
            total += e
            logit_sum += logits[n, k]
        inv_total = 1.0 / total
        for k in range(k_size):
            probs[n, k] *= inv_total
        lse = m + np.log(total)
        row_loss[n] = lse - (1.0 - smoothing) * logits[n, labels[n]] - smoothing / k_size * logit_sum


@kernel
def _backward_kernel(dlogits, probs, labels, smoothing, scale):
    """dlogits = scale * (probs - q) / N."""
    n_size, k_size = probs.shape
    factor = scale / n_size
    off_target = smoothing / k_size
    for n in range(n_size):
        for k in range(k_size):
            dlogits[n, k] = factor * (probs[n, k] - off_target)
        dlogits[n, labels[n]] -= factor * (1.0 - smoothing)


def _check_labels(labels, n_size, k_size):
    """Integer (N,) labels in [0, K), returned as contiguous int64."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy array of integer class indices, got {type(labels).__name__}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype (class indices), got {labels.dtype}")
    if labels.shape != (n_size,):
        raise ValueError(f"labels must have shape ({n_size},) to match logits, got {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= k_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"labels must be in [0, {k_size}) for {k_size} classes; labels[{i}] = {labels[i]} "
                         f"({bad.size} out of range)")
    return np.ascontiguousarray(labels, dtype=np.int64)


def _check_smoothing(label_smoothing):
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def softmax_cross_entropy_forward(logits, labels, *, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch.

    Args:
        logits: (N, K) float32/float64, all finite.
        labels: (N,) integer class indices in [0, K).
        label_smoothing: ls in [0, 1]; targets are q = (1 - ls) * onehot + ls / K.

    Returns:
        (loss, probs): loss a Python float, mean over the batch of -sum_k q_k log p_k; probs (N, K) softmax of
        the logits, logits' dtype, which is what :func:`softmax_cross_entropy_backward` needs.

    Raises:
        ValueError: a logit is NaN or Inf (training has diverged), or a label is out of range.
    """
    check_float_array("logits", logits, ndim=2, legend="(N, K)")
    n_size, k_size = logits.shape
    labels = _check_labels(labels, n_size, k_size)
    smoothing = _check_smoothing(label_smoothing)
    if not np.isfinite(logits).all():
        bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
        raise ValueError(f"logits contain {bad} NaN or Inf value(s): training has diverged; "
                         f"lower the learning rate (or check the input data)")
    probs = np.empty_like(logits, order="C")
    row_loss = np.empty(n_size, np.float64)
    _forward_kernel(probs, row_loss, np.ascontiguousarray(logits), labels, smoothing)
    return float(row_loss.mean()), probs


def softmax_cross_entropy_backward(probs, labels, *, label_smoothing=0.0, scale=1.0):
    """Gradient of the mean loss with respect to the logits.

    Args:
        probs: (N, K) from :func:`softmax_cross_entropy_forward`.
        labels: (N,) integer class indices in [0, K).
        label_smoothing: as in the forward.
        scale: multiplies the gradient (e.g. a loss scale or a 1 / accumulation-steps factor).

    Returns:
        dlogits (N, K) = scale * (probs - q) / N, probs' dtype.
    """
    check_float_array("probs", probs, ndim=2, legend="(N, K)")
    n_size, k_size = probs.shape
    labels = _check_labels(labels, n_size, k_size)
    smoothing = _check_smoothing(label_smoothing)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    dlogits = np.empty_like(probs, order="C")
    _backward_kernel(dlogits, np.ascontiguousarray(probs), labels, smoothing, float(scale))
    return dlogits
