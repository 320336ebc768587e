"""Batch normalization over the channel axis, NHWC (or (N, C) after a flatten), alone or fused with the activation
that follows it (ReLU, ReLU6), as in every MobileNet layer.

Shape legend: N batch, H W input size, C channels; M = N * H * W rows of the (M, C) view of x (an NHWC array
reshaped without a copy), so one code path serves 4-D and 2-D input. The kernels see (M/R, R*C): R consecutive rows
of that view as one (:func:`_group`), and each kernel repeats its per-channel vectors R times (:func:`_widen`), so
that a kernel row is long enough to fill LLVM's vector loop (64 float32 per pass with AVX-512) even with 16
channels. "Rows of (M, C)" below means these grouped rows.

Memory-bound passes, written to touch memory as few times as possible:
    train forward   statistics: one streaming pass (each thread's rows, block by block: a block's sum and then
                    its squared deviations are read from cache, blocks merged with Chan's formula);
                    normalize (+ activation): one pass reading x, writing y (and x_hat, for the unfused API).
    backward        sums of g and g * x_hat: one pass; dx: one pass; both read dy and x (or x_hat).
The fused backward keeps x, not x_hat: x_hat = (x - mean) * inv_std and the activation's mask (where the
pre-activation lay strictly inside (lo, hi)) are recomputed on the fly, so the forward writes one array instead of
three (x_hat, BN output, activation output) and the backward reads two instead of four.
Sums accumulate in x's dtype over blocks of at most a few hundred rows, then in float64 per thread, combined
afterwards, so float32 statistics do not drift with M.
Every loop is a :func:`kernels._jit.sized_kernel`: small maps run serial, large ones on every thread.
"""
import math

import numba
import numpy as np

from kernels._check import FLOAT_DTYPE_OBJECTS, check_float_array, check_same_dtype
from kernels import _jit
from kernels._jit import kernel, sized_kernel

ACTIVATIONS = {None: (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}
"""Activation fused after batch norm -> the (lo, hi) it clips to; the gradient passes where lo < v < hi."""

# Rows per statistics block: a block (rows x C) is read twice, the second time from cache, so it must fit in L2;
# its sums run in x's dtype (vector-wide; float32 widened to float64 per element ran at half the speed), so a
# block also holds at most _MAX_BLOCK_ROWS rows, which bounds the float32 rounding of a block's sum.
_BLOCK_BYTES = 128 * 1024
_MAX_BLOCK_ROWS = 256


@sized_kernel
def _stats_kernel(count_out, mean_out, m2_out, x, block_rows):
    """Per-chunk (count, mean, sum of squared deviations) of each column, in float64.

    count_out (P,), mean_out (P, L), m2_out (P, L): one row per chunk of rows of x (rows, L), grouped rows
    (:func:`_group`) whose column blocks :func:`_finish_stats_kernel` merges per channel. Within a chunk, each
    block of ``block_rows`` rows is reduced in two passes (mean, then squared deviations from that mean; the
    second pass hits cache), both summing in x's dtype over values already centred (on the block's first row,
    then on its mean rounded to x's dtype, the rounding corrected in float64), and merged into the chunk's
    running result with Chan et al.'s formula
        mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 * n_a * n_b / n,   d = mean_b - mean_a,
    which is as stable as a two-pass variance and reads x from memory once.
    """
    n_chunks = count_out.shape[0]
    m, c_size = x.shape
    for p in numba.prange(n_chunks):
        start = p * m // n_chunks
        stop = (p + 1) * m // n_chunks
        block_sum = np.empty(c_size, x.dtype)
        block_center = np.empty(c_size, x.dtype)
        block_m2 = np.empty(c_size, x.dtype)
        block_mean = np.empty(c_size, np.float64)
        n_a = 0
        for c in range(c_size):
            mean_out[p, c] = 0.0
            m2_out[p, c] = 0.0
        for b0 in range(start, stop, block_rows):
            b1 = min(b0 + block_rows, stop)
            n_b = b1 - b0
            block_sum[:] = 0.0
            block_m2[:] = 0.0
            for c in range(c_size):
                block_center[c] = x[b0, c]  # shift by a sample: the sum in x's dtype then runs on deviations
            i = b0
            while i + 4 <= b1:  # four rows per pass over the channels, each channel's sum still row by row
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                for c in range(c_size):
                    ctr = block_center[c]
                    block_sum[c] = (((block_sum[c] + (x0[c] - ctr)) + (x1[c] - ctr)) + (x2[c] - ctr)) + (x3[c] - ctr)
                i += 4
            for i in range(i, b1):
                for c in range(c_size):
                    block_sum[c] += x[i, c] - block_center[c]
            for c in range(c_size):
                mean_b = block_center[c] + np.float64(block_sum[c]) / n_b
                block_mean[c] = mean_b
                block_center[c] = mean_b
            i = b0
            while i + 4 <= b1:
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                for c in range(c_size):
                    ctr = block_center[c]
                    d0, d1, d2, d3 = x0[c] - ctr, x1[c] - ctr, x2[c] - ctr, x3[c] - ctr
                    block_m2[c] = (((block_m2[c] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
                i += 4
            for i in range(i, b1):
                for c in range(c_size):
                    d = x[i, c] - block_center[c]
                    block_m2[c] += d * d
            n = n_a + n_b
            for c in range(c_size):
                mean_b = block_mean[c]
                e = mean_b - block_center[c]  # sum (x - mean_b)^2 = sum (x - center)^2 - n_b * e^2
                m2_b = np.float64(block_m2[c]) - n_b * e * e
                d = mean_b - mean_out[p, c]
                mean_out[p, c] += d * (n_b / n)
                m2_out[p, c] += m2_b + d * d * (n_a * (n_b / n))
            n_a = n
        count_out[p] = n_a


@kernel
def _finish_stats_kernel(mean_out, inv_std_out, running_mean, running_var, count, group, mean_part, m2_part,
                         momentum, eps):
    """Merge the per-chunk statistics (Chan's formula), write mean and inv_std (C,) in x's dtype and update the
    running statistics in place; everything computed in float64.

    count (P,), mean_part (P*R, C), m2_part (P*R, C) from :func:`_stats_kernel` on grouped rows (R = ``group``
    rows of C values each, :func:`_group`): part p*R + j is chunk p's column block j, count[p] values. With m rows
    and the merged M2:
    var = M2 / m (biased: normalizes), unbiased = M2 / max(m - 1, 1) (feeds the running variance).
    """
    c_size = mean_out.shape[0]
    for c in range(c_size):
        n_a = 0
        mean = 0.0
        m2 = 0.0
        for p in range(mean_part.shape[0]):
            n_b = count[p // group]
            if n_b == 0:
                continue
            n = n_a + n_b
            d = mean_part[p, c] - mean
            mean += d * (n_b / n)
            m2 += m2_part[p, c] + d * d * (n_a * (n_b / n))
            n_a = n
        mean_out[c] = mean
        inv_std_out[c] = 1.0 / np.sqrt(m2 / n_a + eps)
        running_mean[c] = momentum * running_mean[c] + (1.0 - momentum) * mean
        running_var[c] = momentum * running_var[c] + (1.0 - momentum) * (m2 / max(n_a - 1, 1))


@kernel
def _widen(v, width):
    """A per-channel vector v (C,) as one entry per value of a grouped row (width = R*C,): v repeated R times.
    In the kernel, once per call: np.tile from Python cost ~5 us a vector, more than it saved on small maps."""
    c_size = v.shape[0]
    if c_size == width:
        return v
    out = np.empty(width, v.dtype)
    for j in range(width):
        out[j] = v[j % c_size]
    return out


@sized_kernel
def _normalize_kernel(y, x_hat, x, mean, inv_std, gamma, beta):
    """x_hat = (x - mean) * inv_std and y = gamma * x_hat + beta, rows of (M, C); per-channel vectors (C,)."""
    m, c_size = x.shape
    mean, inv_std, gamma, beta = (_widen(mean, c_size), _widen(inv_std, c_size), _widen(gamma, c_size),
                                  _widen(beta, c_size))
    for i in numba.prange(m):
        for c in range(c_size):
            xh = (x[i, c] - mean[c]) * inv_std[c]
            x_hat[i, c] = xh
            y[i, c] = gamma[c] * xh + beta[c]


@sized_kernel
def _scale_act_kernel(y, x, center, k, beta, lo, hi):
    """y = clip((x - center) * k + beta, lo, hi), rows of (M, C); center, k, beta (C,).

    Subtracting the center before scaling keeps float32 exact when the mean is large against the spread (a folded
    x * scale + shift would cancel). (lo, hi) = (-inf, inf) is plain batch norm; a NaN passes both comparisons
    and propagates. The backward recomputes the same expression to find where the activation passed gradient.
    """
    m, c_size = x.shape
    center, k, beta = _widen(center, c_size), _widen(k, c_size), _widen(beta, c_size)
    for i in numba.prange(m):
        for c in range(c_size):
            v = (x[i, c] - center[c]) * k[c] + beta[c]
            v = lo if v < lo else v
            y[i, c] = hi if v > hi else v


@kernel
def _bias_act_row(y, start, stop, bias, lo, hi):
    """y[start:stop] = clip(y + bias, lo, hi) in place, y flat (1-D), start a multiple of C, with bias (C,) per
    channel: the output pass of a convolution with batch norm folded into it. The depthwise kernels run it on each
    output row right after computing it (while it is in L1), so the folded batch norm and its activation cost no
    pass over memory; :func:`bias_act_forward` runs it over the rows of an array in place. The same operations as
    :func:`_scale_act_kernel` with center 0 and scale 1 (bit for bit); a NaN passes both comparisons and
    propagates.

    A row is a range of the whole array, not a view of it: a view made per row costs two atomic reference-count
    updates (Numba's NRT incref and decref); with views, such updates took 60% of a serial 128x16x16x16 depthwise
    forward."""
    C = bias.shape[0]
    u = np.uint64
    Cu = u(C)
    for ow in range((stop - start) // C):
        o = u(start + ow * C)
        for c in range(u(0), Cu):
            v = y[o + c] + bias[c]
            v = lo if v < lo else v
            y[o + c] = hi if v > hi else v


@kernel(inline=True)  # into _ring_rows, which then makes no call (see kernels._jit.kernel)
def _scale_act_row(y, start, stop, center, k, beta, lo, hi):
    """y[start:stop] = clip((y - center) * k + beta, lo, hi) in place, y flat (1-D), per-channel vectors (C,), start
    and stop multiples of C (a range, not a view, as in :func:`_bias_act_row`): :func:`_scale_act_kernel`'s
    operations on one row (bit for bit: compiled without contraction, like it). The depthwise kernels run it on
    each input row they copy, so that a training batch norm + activation whose output only feeds them is never
    written (with center 0 and k 1 it is the folded bias pass, bit for bit as well: (v - 0) * 1 is v)."""
    C = k.shape[0]
    u = np.uint64
    Cu = u(C)
    for ow in range((stop - start) // C):
        o = u(start + ow * C)
        for c in range(u(0), Cu):
            v = (y[o + c] - center[c]) * k[c] + beta[c]
            v = lo if v < lo else v
            y[o + c] = hi if v > hi else v


@sized_kernel
def _bias_act_rows_kernel(y, bias, lo, hi):
    """:func:`_bias_act_row` on every row of y (R, L) in place, L a multiple of bias's C.

    In place with one array argument: the two-array :func:`_scale_act_kernel` called with x is y vectorizes only
    after a runtime check that its output does not overlap its input, and in place that check fails and sends it
    to its scalar loop (a folded MobileNet 1.0 at res 128, batch 32, ran 1.18x faster in place this way than with
    a fresh output array)."""
    L = y.shape[1]
    flat = y.reshape(-1)
    for r in numba.prange(y.shape[0]):
        _bias_act_row(flat, r * L, (r + 1) * L, bias, lo, hi)


# Rows per block of the backward sums: a block's sums accumulate in x's dtype in L1, then go into float64, so no
# float32 sum runs over more than this many values.
_SUM_BLOCK_ROWS = 128


@sized_kernel
def _backward_sums_kernel(dbeta_part, dgamma_part, dy, x, mean, k, beta, lo, hi, block_rows):
    """Per-chunk sums of g and g * (x - mean) into float64 (P, L) partials, rows of (M, C) (grouped: L = R*C).

    g = dy * mask, mask = 1 where the activation was in its linear region, lo < v < hi with v = (x - mean) * k +
    beta the forward's pre-activation (same expression, same bits), else 0. The mask multiplies instead of
    selecting: LLVM vectorizes the product (a select of a loaded value kept this loop scalar, 3x slower), and a
    NaN or Inf in dy then reaches the sums wherever it sits, instead of vanishing where the unit was clipped.
    Each block of ``block_rows`` rows is summed in dy's dtype, then added to float64 running sums. The caller
    multiplies the second sum by inv_std to get sum g * x_hat.
    """
    n_chunks = dbeta_part.shape[0]
    m, c_size = dy.shape
    mean, k, beta = _widen(mean, c_size), _widen(k, c_size), _widen(beta, c_size)
    for p in numba.prange(n_chunks):
        start = p * m // n_chunks
        stop = (p + 1) * m // n_chunks
        sum_g = np.zeros(c_size, np.float64)
        sum_gd = np.zeros(c_size, np.float64)
        blk_g = np.empty(c_size, dy.dtype)
        blk_gd = np.empty(c_size, dy.dtype)
        for b0 in range(start, stop, block_rows):
            blk_g[:] = 0.0
            blk_gd[:] = 0.0
            for i in range(b0, min(b0 + block_rows, stop)):
                for c in range(c_size):
                    d = x[i, c] - mean[c]
                    v = d * k[c] + beta[c]
                    g = dy[i, c] * ((v > lo) & (v < hi))
                    blk_g[c] += g
                    blk_gd[c] += g * d
            for c in range(c_size):
                sum_g[c] += blk_g[c]
                sum_gd[c] += blk_gd[c]
        for c in range(c_size):
            dbeta_part[p, c] = sum_g[c]
            dgamma_part[p, c] = sum_gd[c]


@kernel
def _finish_backward_kernel(shift, slope, dgamma, dbeta, dbeta_part, dgamma_part, inv_std, k, m):
    """The per-channel factors of the dx pass and the parameter gradients, from the per-chunk sums (P*R, C) of
    :func:`_backward_sums_kernel`; everything in float64, rounded to the outputs' dtype once at the end.

    With y = gamma * x_hat + beta, x_hat = (x - mean) * inv_std, mean and var over the m rows of a channel, and
    g = dL/dy (the upstream gradient masked by the activation):
        dbeta  = sum_i g_i,        dgamma = sum_i g_i * x_hat_i,
        dx_i   = gamma * inv_std * (g_i - dbeta / m - x_hat_i * dgamma / m)
    (the two subtracted terms are the paths through mean and var; eps does not change the form). The dx kernel
    takes k = gamma * inv_std and the folded factors: dx_i = k g_i - shift - (x_i - mean) * slope, with
    shift = k * dbeta / m and slope = k * inv_std * dgamma / m. One call instead of a dozen small NumPy
    operations (the same operations in the same order, so the same bits): ~10 us less per layer.
    """
    for c in range(shift.shape[0]):
        db = dbeta_part[0, c]
        dg = dgamma_part[0, c]
        for p in range(1, dbeta_part.shape[0]):
            db += dbeta_part[p, c]
            dg += dgamma_part[p, c]
        s = np.float64(inv_std[c])
        kc = np.float64(k[c])
        dg = dg * s  # sum g * x_hat
        shift[c] = kc * db / m
        slope[c] = kc * s * dg / m
        dgamma[c] = dg
        dbeta[c] = db


@sized_kernel
def _backward_dx_kernel(dx, dy, x, mean, k, beta, lo, hi, shift, slope, n_chunks):
    """dx = k * g - shift - (x - mean) * slope, rows of (M, C), g = dy * mask as in the sums kernel, where
    shift = k * dbeta / m and slope = k * inv_std^2 * dgamma_d / m (dgamma_d = sum g * (x - mean)) are (C,).

    dx may be dy itself. Each row of dy is first copied to a small buffer: LLVM vectorizes a loop only after a
    runtime check that its output does not overlap its inputs, and dx == dy would send it to the scalar loop
    (measured 3x slower on cache-resident maps).
    """
    m, c_size = dy.shape
    mean, k, beta = _widen(mean, c_size), _widen(k, c_size), _widen(beta, c_size)
    shift, slope = _widen(shift, c_size), _widen(slope, c_size)
    for p in numba.prange(n_chunks):
        g = np.empty(c_size, dy.dtype)
        for i in range(p * m // n_chunks, (p + 1) * m // n_chunks):
            for c in range(c_size):
                g[c] = dy[i, c]
            for c in range(c_size):
                d = x[i, c] - mean[c]
                v = d * k[c] + beta[c]
                dx[i, c] = k[c] * (g[c] * ((v > lo) & (v < hi))) - shift[c] - d * slope[c]


def _n_chunks(m, work):
    """Chunks for the per-thread reductions (never more than rows): for work large enough to run in parallel, one
    per thread Numba may start (``NUMBA_NUM_THREADS``), whatever the calling thread uses now; else one. So a
    reduction run serially (with ``set_threads(1)``, or on one core in the split backward pass of
    ``tinyconv.sequential``) sums in the same chunks, and gives the same bits, as one run in parallel."""
    return max(1, min(m, numba.config.NUMBA_NUM_THREADS)) if work >= _jit.PARALLEL_MIN_WORK else 1


def _check_x(name, x):
    """Validate an activation for BN: float, 2-D (N, C) or 4-D (N, H, W, C)."""
    check_float_array(name, x)
    if x.ndim not in (2, 4):
        raise ValueError(f"{name} must be 4-D (N, H, W, C) or 2-D (N, C), got shape {x.shape}")
    return x


def _check_channel_vectors(c_size, x_name, **vectors):
    for name, v in vectors.items():
        if isinstance(v, np.ndarray) and v.shape == (c_size,) and v.dtype in FLOAT_DTYPE_OBJECTS:
            continue  # the usual case, settled without building a message
        check_float_array(name, v, ndim=1, legend="(C,)")
        if v.shape[0] != c_size:
            raise ValueError(f"{name} must have shape ({c_size},) to match the {c_size} channels of {x_name}, "
                             f"got {v.shape}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _check_act(act):
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of None, 'relu', 'relu6', got {act!r}")
    return ACTIVATIONS[act]


def _check_out(out, like):
    """A preallocated output: C-contiguous, ``like``'s shape and dtype (it is written through a 2-D view)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"out must have shape {like.shape} and dtype {like.dtype}, got {out.shape} {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writable C-contiguous array")
    return out


# Values per kernel row the grouping aims for. With C values per row, every row pays for starting a loop (its
# overlap checks, the remainder after 64-wide vector passes); serial, 2^19 float32 values, us at C = 16 / 32 / 512:
# normalize + ReLU 117 / 85 / 62, statistics 161 / 110 / 56, backward sums 261 / 230 / 89, dx 303 / 252 / 128.
_GROUP_VALUES = 128


def _group(m, c_size):
    """R, the rows of the (M, C) view each kernel row holds: the smallest power of two with R * C >=
    :data:`_GROUP_VALUES`, or, when M is not a multiple of that, the largest power of two below it that divides M
    (1 for odd M, as before the grouping)."""
    r = 1
    while r * c_size < _GROUP_VALUES and m % (2 * r) == 0:
        r *= 2
    return r


def _grouped(x):
    """(M/R, R*C) view of x and R (:func:`_group`); copies only if x is not C-contiguous."""
    x = np.ascontiguousarray(x)
    c_size = x.shape[-1]
    r = _group(x.size // c_size, c_size)
    return x.reshape(-1, r * c_size), r  # (M/R, R*C)


# The training forward's passes (the statistics, the output pass) run on two threads from this many times the
# general threshold (_jit.PARALLEL_MIN_WORK, 2^19: from 2^21 values); the statistics are still summed in the chunks
# of _n_chunks, so the bits do not depend on it. Measured per layer in training steps on the 2-core machine, two
# threads against one: 0.62-0.84x at 2^19 values (Fashion-MNIST, MobileNet 0.5 res 128), 0.84-0.93x at 2^20,
# 1.08-1.47x from 2^21 (each pass is one launch, which wakes the sleeping OpenMP worker; the backward's passes, two
# reads and one write, break even at 2^19). Whole training steps, in-process alternating, against 2^19:
# Fashion-MNIST 1.006-1.039x (forward 8.5-9.3 against 8.7-10.0 ms), MobileNet 0.5 res 128 0.99-1.04x, 1.0 res 128
# 0.96-1.00x (level within the noise of this hour).
TRAIN_FORWARD_PARALLEL_FACTOR = 4


def _train_forward_min():
    return _jit.PARALLEL_MIN_WORK * TRAIN_FORWARD_PARALLEL_FACTOR


def _batch_stats(x2, r, running_mean, running_var, momentum, eps):
    """Mean and inv_std (C,) over the values of each channel of x2 (M/R, R*C) (:func:`_grouped`), in x2's dtype;
    updates the running statistics in place."""
    rows, width = x2.shape
    c_size = width // r
    n_chunks = _n_chunks(rows, x2.size)
    count = np.empty(n_chunks, np.int64)
    mean_part = np.empty((n_chunks, width), np.float64)
    m2_part = np.empty((n_chunks, width), np.float64)
    block_rows = min(_MAX_BLOCK_ROWS, max(1, _BLOCK_BYTES // (width * x2.itemsize)))
    _stats_kernel(count, mean_part, m2_part, x2, block_rows, work=x2.size, min_work=_train_forward_min())
    mean = np.empty(c_size, x2.dtype)
    inv_std = np.empty(c_size, x2.dtype)
    # each chunk's R copies of a channel are parts of their own, merged with the chunks (P*R, C)
    _finish_stats_kernel(mean, inv_std, running_mean, running_var, count, r, mean_part.reshape(-1, c_size),
                         m2_part.reshape(-1, c_size), float(momentum), eps)
    return mean, inv_std


def _check_train_args(x, gamma, beta, running_mean, running_var, momentum, eps):
    _check_x("x", x)
    _check_channel_vectors(x.shape[-1], "x", gamma=gamma, beta=beta)
    check_same_dtype(x=x, gamma=gamma, beta=beta)
    return _check_stats_args(x, running_mean, running_var, momentum, eps, x_checked=True)


def _check_stats_args(x, running_mean, running_var, momentum, eps, x_checked=False):
    if not x_checked:
        _check_x("x", x)
    _check_channel_vectors(x.shape[-1], "x", running_mean=running_mean, running_var=running_var)
    check_same_dtype(x=x, running_mean=running_mean, running_var=running_var)
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if not v.flags.writeable:
            raise ValueError(f"{name} must be writable: it is updated in place, got a read-only array")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (Keras convention, e.g. 0.99), got {momentum!r}")
    return _check_positive("eps", eps)


def batchnorm_stats_train(x, running_mean, running_var, *, momentum=0.99, eps=1e-3):
    """The batch statistics of :func:`batchnorm_act_forward_train` alone, with the same running-statistics update:
    for a caller that applies the normalization inside the next kernel (the depthwise input pass) and never writes
    the batch norm's output. y = act((x - mean) * k + beta) with k = gamma * inv_std in x's dtype is then bit for
    bit what :func:`batchnorm_act_forward_train` writes, and :func:`batchnorm_act_backward` takes (x, mean,
    inv_std) as usual.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64 activations.
        running_mean, running_var: (C,) writable buffers, x's dtype; updated in place.
        momentum, eps: as in :func:`batchnorm_forward_train`.

    Returns:
        (mean, inv_std): (C,) each, x's dtype.
    """
    eps = _check_stats_args(x, running_mean, running_var, momentum, eps)
    x2, r = _grouped(x)  # (M/R, R*C)
    return _batch_stats(x2, r, running_mean, running_var, momentum, eps)


def scale_act_forward(x, center, scale, shift, *, act=None):
    """y = act((x - center) * scale + shift) per channel, one pass: a training batch norm's output from its batch
    statistics (center = mean, scale = gamma * inv_std, shift = beta), bit for bit as
    :func:`batchnorm_act_forward_train` writes it.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64.
        center, scale, shift: (C,), x's dtype.
        act: None, 'relu' or 'relu6'.

    Returns:
        y shaped like x, x's dtype.
    """
    _check_x("x", x)
    _check_channel_vectors(x.shape[-1], "x", center=center, scale=scale, shift=shift)
    check_same_dtype(x=x, center=center, scale=scale, shift=shift)
    lo, hi = _check_act(act)
    x2, r = _grouped(x)  # (M/R, R*C)
    y = np.empty(x.shape, x.dtype)
    _scale_act_kernel(y.reshape(x2.shape), x2, np.ascontiguousarray(center), np.ascontiguousarray(scale),
                      np.ascontiguousarray(shift), x.dtype.type(lo), x.dtype.type(hi), work=x2.size)
    return y


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
    eps = _check_train_args(x, gamma, beta, running_mean, running_var, momentum, eps)
    x2, r = _grouped(x)  # (M/R, R*C)
    mean, inv_std = _batch_stats(x2, r, running_mean, running_var, momentum, eps)
    y = np.empty_like(x2)
    x_hat = np.empty_like(x2)
    _normalize_kernel(y, x_hat, x2, mean, inv_std, np.ascontiguousarray(gamma), np.ascontiguousarray(beta),
                      work=x2.size)
    return y.reshape(x.shape), x_hat.reshape(x.shape), inv_std


def batchnorm_act_forward_train(x, gamma, beta, running_mean, running_var, *, act="relu", momentum=0.99,
                                eps=1e-3, out=None):
    """Training-mode batch normalization followed by an activation, in one pass after the statistics.

    y = act(gamma * (x - mean) * inv_std + beta) with act ReLU, ReLU6 or none, and the batch statistics and
    running-statistics update of :func:`batchnorm_forward_train`.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64 activations. Keep it: the backward recomputes x_hat from it.
        gamma, beta: (C,) scale and offset, x's dtype.
        running_mean, running_var: (C,) writable buffers, x's dtype; updated in place.
        act: 'relu', 'relu6' or None.
        momentum: decay of the running averages, in [0, 1].
        eps: added to the variance, > 0.
        out: optional writable C-contiguous buffer shaped like x (x's dtype) to write y into; must not be x.

    Returns:
        (y, mean, inv_std): y shaped like x (``out`` when given); mean and inv_std (C,) x's dtype. With x they
        are what :func:`batchnorm_act_backward` needs.
    """
    eps = _check_train_args(x, gamma, beta, running_mean, running_var, momentum, eps)
    lo, hi = _check_act(act)
    x2, r = _grouped(x)  # (M/R, R*C)
    y = np.empty(x.shape, x.dtype) if out is None else _check_out(out, x)
    if np.may_share_memory(y, x):
        raise ValueError("out must not overlap x: the backward reads x")
    mean, inv_std = _batch_stats(x2, r, running_mean, running_var, momentum, eps)
    k = gamma * inv_std  # (C,), x's dtype: the backward computes the same product to find the same mask
    _scale_act_kernel(y.reshape(x2.shape), x2, mean, k, np.ascontiguousarray(beta), x.dtype.type(lo),
                      x.dtype.type(hi), work=x2.size, min_work=_train_forward_min())
    return y, mean, inv_std


def _forward_eval(x, gamma, beta, running_mean, running_var, act, eps, out):
    _check_x("x", x)
    _check_channel_vectors(x.shape[-1], "x", gamma=gamma, beta=beta, running_mean=running_mean,
                           running_var=running_var)
    check_same_dtype(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    eps = _check_positive("eps", eps)
    lo, hi = _check_act(act)
    k64 = gamma.astype(np.float64) / np.sqrt(running_var.astype(np.float64) + eps)
    x2, r = _grouped(x)  # (M/R, R*C)
    y = np.empty(x.shape, x.dtype) if out is None else _check_out(out, x)
    _scale_act_kernel(y.reshape(x2.shape), x2, np.ascontiguousarray(running_mean), k64.astype(x.dtype),
                      np.ascontiguousarray(beta), x.dtype.type(lo), x.dtype.type(hi), work=x2.size)
    return y


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, *, eps=1e-3):
    """Inference-mode batch normalization with the running statistics, one pass.

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64.
        gamma, beta, running_mean, running_var: (C,), x's dtype.
        eps: added to the variance, > 0.

    Returns:
        y shaped like x, x's dtype.
    """
    return _forward_eval(x, gamma, beta, running_mean, running_var, None, eps, None)


def batchnorm_act_forward_eval(x, gamma, beta, running_mean, running_var, *, act="relu", eps=1e-3, out=None):
    """Inference-mode batch normalization followed by an activation, one pass.

    y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta), act 'relu', 'relu6' or None.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64.
        gamma, beta, running_mean, running_var: (C,), x's dtype.
        act: 'relu', 'relu6' or None.
        eps: added to the variance, > 0.
        out: optional writable C-contiguous buffer shaped like x (x's dtype); may be x itself (in place).

    Returns:
        y shaped like x, x's dtype (``out`` when given).
    """
    return _forward_eval(x, gamma, beta, running_mean, running_var, act, eps, out)


def bias_act_forward(x, bias, *, act="relu", out=None):
    """y = act(x + bias) with a per-channel bias: what is left of batch norm and its activation once the batch
    norm is folded into the convolution before it (inference), in one pass.

    The same bits in place (``out=x``, the fast way: one array, see :func:`_bias_act_rows_kernel`) or not.

    Args:
        x: (N, H, W, C) or (N, C) float32/float64.
        bias: (C,), x's dtype.
        act: 'relu', 'relu6' or None.
        out: optional writable C-contiguous buffer shaped like x (x's dtype); may be x itself (in place).

    Returns:
        y shaped like x, x's dtype (``out`` when given).
    """
    _check_x("x", x)
    _check_channel_vectors(x.shape[-1], "x", bias=bias)
    check_same_dtype(x=x, bias=bias)
    lo, hi = (x.dtype.type(v) for v in _check_act(act))
    bias = np.ascontiguousarray(bias)
    if out is x and x.flags.c_contiguous and x.flags.writeable:  # in place: one array, rows of whole images
        _bias_act_rows_kernel(x.reshape(-1, x.shape[-1] * (x.shape[2] if x.ndim == 4 else 1)), bias, lo, hi,
                              work=x.size)
        return x
    x2, r = _grouped(x)  # (M/R, R*C)
    y = np.empty(x.shape, x.dtype) if out is None else _check_out(out, x)
    if np.may_share_memory(y, x):
        raise ValueError("out must be x itself or not overlap it")
    c_size = x.shape[-1]
    _scale_act_kernel(y.reshape(x2.shape), x2, np.zeros(c_size, x.dtype), np.ones(c_size, x.dtype), bias, lo, hi,
                      work=x2.size)
    return y


def _backward(dy, x, mean, inv_std, k, beta, lo, hi, out):
    """Shared by both backward APIs: x_hat = (x - mean) * inv_std, mask from (x - mean) * k + beta."""
    c_size = dy.shape[-1]
    dy2, r = _grouped(dy)  # (M/R, R*C)
    x2 = np.ascontiguousarray(x).reshape(dy2.shape)  # (M/R, R*C)
    rows, width = dy2.shape
    n_chunks = _n_chunks(rows, dy2.size)
    dbeta_part = np.empty((n_chunks, width), np.float64)
    dgamma_part = np.empty((n_chunks, width), np.float64)
    dtype = dy.dtype.type
    _backward_sums_kernel(dbeta_part, dgamma_part, dy2, x2, mean, k, beta, dtype(lo), dtype(hi), _SUM_BLOCK_ROWS,
                          work=dy2.size)
    shift, slope = np.empty(c_size, dy.dtype), np.empty(c_size, dy.dtype)
    dgamma, dbeta = np.empty(c_size, dy.dtype), np.empty(c_size, dy.dtype)
    # each chunk's R copies of a channel are parts of their own (P*R, C)
    _finish_backward_kernel(shift, slope, dgamma, dbeta, dbeta_part.reshape(-1, c_size),
                            dgamma_part.reshape(-1, c_size), inv_std, k, rows * r)
    dx = np.empty(dy.shape, dy.dtype) if out is None else _check_out(out, dy)
    if out is not None and out is not dy and np.may_share_memory(out, dy):
        raise ValueError("out must be dy itself or not overlap it")
    if np.may_share_memory(dx, x):
        raise ValueError("out must not overlap x")
    _backward_dx_kernel(dx.reshape(dy2.shape), dy2, x2, mean, k, beta, dtype(lo), dtype(hi), shift, slope,
                        n_chunks, work=dy2.size)
    return dx, dgamma, dbeta


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
    zeros, ones = np.zeros(c_size, dy.dtype), np.ones(c_size, dy.dtype)
    k = (gamma.astype(np.float64) * inv_std.astype(np.float64)).astype(dy.dtype)
    lo, hi = ACTIVATIONS[None]
    return _backward(dy, x_hat, zeros, ones, k, zeros, lo, hi, None)  # x_hat is x with mean 0 and inv_std 1


def batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, *, act="relu", out=None):
    """Gradients of :func:`batchnorm_act_forward_train`: the activation's mask and batch norm's backward in two
    passes over dy and x.

    Args:
        dy: (N, H, W, C) or (N, C) gradient of the activation's output, float32/float64.
        x: the forward's input, shaped like dy.
        mean, inv_std: (C,) from the forward.
        gamma, beta: (C,) the parameters the forward used.
        act: the forward's activation.
        out: optional writable C-contiguous buffer shaped like dy for dx; may be dy itself (in place), must not
            overlap x.

    Returns:
        (dx, dgamma, dbeta): dx shaped like dy (``out`` when given); dgamma, dbeta (C,); all dy's dtype.
    """
    _check_x("dy", dy)
    check_float_array("x", x)
    if x.shape != dy.shape:
        raise ValueError(f"x must have the shape of dy {dy.shape}, got {x.shape}")
    _check_channel_vectors(dy.shape[-1], "dy", mean=mean, inv_std=inv_std, gamma=gamma, beta=beta)
    check_same_dtype(dy=dy, x=x, mean=mean, inv_std=inv_std, gamma=gamma, beta=beta)
    lo, hi = _check_act(act)
    k = gamma * inv_std  # (C,): the forward's product, bit for bit
    return _backward(dy, x, np.ascontiguousarray(mean), np.ascontiguousarray(inv_std), k,
                     np.ascontiguousarray(beta), lo, hi, out)
