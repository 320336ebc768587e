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
                     accumulating a private partial sum (tiled along the row, or per column with many channels),
                     then the partials are added. The block count
                     does not depend on the thread count, so results are reproducible across machines.
3x3 kernels (MobileNet's) have register-blocked paths, chosen by measured thresholds: stride 1 forward and input
gradient (:func:`_forward3x3`, four columns per pass over a ring of zero-padded rows, so that border columns take
the same loop), stride 2 forward (:func:`_forward3x3s2`, two columns) and the weight gradient at stride 1 and 2
(:func:`_weight3x3`, four columns per pass over the same kind of ring, each channel's nine sums in registers; at
stride 1 two output rows per pass).
:func:`depthwise_backward` (what a layer calls) computes both gradients; on the stride-1 3x3 path in one pass over
dy (:func:`_backward3x3`), bit for bit what the two separate calls give.
The 3x3 kernels, and every kernel here whose outputs the wrappers allocate, are compiled ``noalias``
(:mod:`kernels._jit`): without it each channel loop began with LLVM's run-time checks that its output row does
not overlap its input rows, which cost more than the loop at 16-32 channels.
Rows are ranges of whole (flattened) arrays, addressed by unsigned offsets, never views: each view costs two atomic
reference-count updates (Numba's NRT incref and decref), and so does each array argument of a per-row helper that
calls another function (:func:`kernels._jit.kernel`). With views, those updates took 60% of a serial 128x16x16x16
forward.
The kernels are written for M == 1 (MobileNet's case). For M > 1 the wrappers repeat each input channel M times,
(N, H, W, C) -> (N, H, W, C*M), which turns the op into an M == 1 depthwise conv over C*M channels; dx is summed
back over the copies.
"""
import numba
import numpy as np
from numba import prange

from ._check import check_float_array, check_same_dtype, check_shape
from . import _jit
from ._jit import fast_kernel, fast_sized_kernel, kernel, parallel_kernel, sized_kernel
from .batchnorm import ACTIVATIONS, _bias_act_row, _scale_act_row, scale_act_forward
from .conv import _check_channels, _check_dy, _check_shape_arg
from .geometry import conv_geometry, normalize_window

_WEIGHT_BLOCKS = 16  # partial sums in the weight gradient: enough blocks to balance up to 16 threads

# From this many channels the weight gradient accumulates per column (:func:`_weight_row_cols`). Measured
# against the row-tiled accumulators, 3x3, 2 threads: 1.07-1.48x at 256-1024 channels (32x16x16x256 s2 0.29 vs
# 0.39 ms, 32x4x4x1024 0.22 vs 0.32 ms), mixed at 128 (0.92-1.07x), 0.42-0.8x at 16-64 channels.
_MIN_CHANNELS_WEIGHT_COLS = 256

# Where the weight gradient takes the blocked 3x3 kernel (:func:`_weight3x3`, four columns per pass from padded
# rows) rather than :func:`_backward_weight`. Stride 1: wherever the stride-1 input gradient does (input width
# >= 4), so that the fused backward pass, which uses it at every width, gives the same bits. In-process A/B, 2
# threads: 32x64x64x32 1.43x, 32x32x32x128 1.97x, 32x16x16x256 1.24x, 128x8x8x64 1.11x, 32x8x8x512 1.06x,
# 128x16x16x16 level; on 4x4 maps 0.73-0.85x as a separate pass but 1.10x (128x4x4x128) and 0.85x (32x4x4x1024)
# inside the fused pass, where training runs them. Keeping the other accumulators in the fused kernel as well
# pushed the cold compile of all kernels to 44-45 s. Stride 2, from 8 output columns (input sizes):
# 1x112x112x64 1.96x, 32x64x64x64 1.65x, 32x32x32x128 1.48x, 128x16x16x32 1.26x, 32x16x16x256 1.23x. From 4
# output columns where the generic loops would tile their accumulators along the row (fewer than
# _MIN_CHANNELS_WEIGHT_COLS channels), measured in round 18, kernels alone: 128x8x8x64 1.19x and 1.38x, 32x8x8x128
# 1.28x, 128x8x8x128 1.23x, 128x8x8x32 1.10x, 128x8x8x16 2.45x; level with the per-column loops at 256-384
# channels, 0.90-0.95x at 32x8x8x512; 0.55-0.82x at 2 columns. (In round 13: 0.79-1.04x at 4 columns.)
_MIN_WIDTH_WEIGHT_3X3_S2 = 8
_MIN_WIDTH_WEIGHT_3X3_S2_TILED = 4


def _use_weight3x3(KH, KW, sh, sw, in_width, out_width, channels):
    """Whether the weight gradient takes :func:`_weight3x3`: at stride 1 exactly where :func:`depthwise_backward`
    may take the fused pass (input rows at least 4 wide), at stride 2 from 8 output columns, or from 4 with fewer
    than :data:`_MIN_CHANNELS_WEIGHT_COLS` channels (C*M)."""
    if _use_3x3(KH, KW, sh, sw, in_width):
        return True
    least = _MIN_WIDTH_WEIGHT_3X3_S2 if channels >= _MIN_CHANNELS_WEIGHT_COLS else _MIN_WIDTH_WEIGHT_3X3_S2_TILED
    return _use_3x3_s2(KH, KW, sh, sw, out_width) and out_width >= least


_W_LEGEND = "(KH, KW, C, M)"

# (bias, lo, hi) of an output pass that does not happen: an empty bias skips it.
_NO_PASS = {t: (np.zeros(0, t), t(-np.inf), t(np.inf)) for t in (np.float32, np.float64)}
# The (lo, hi) clip of each activation as scalars of each dtype, made once rather than per call.
_BOUNDS = {t: {act: (t(lo), t(hi)) for act, (lo, hi) in ACTIVATIONS.items()} for t in (np.float32, np.float64)}
# (center, scale, shift, lo, hi) of an input pass that does not happen: an empty shift skips it.
_NO_IN_PASS = {t: (np.zeros(0, t), np.zeros(0, t), np.zeros(0, t), t(-np.inf), t(np.inf))
               for t in (np.float32, np.float64)}


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


@sized_kernel(noalias=True)
def _forward(y, x, wt, sh, sw, pt, pl, bias, act_lo, act_hi):
    """y: (N, OH, OW, C) output, written entirely; x: (N, H, W, C); wt: (KH, KW, OW*C), w tiled OW times;
    bias (C,), act_lo, act_hi: the output pass of :func:`_bias_act_row`, none when bias is empty (0,)."""
    N, OH, OW, C = y.shape
    H, W = x.shape[1], x.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    yf, xf, wf = y.reshape(-1), x.reshape(-1), wt.reshape(-1)  # whole arrays and offsets: no view per row
    L = OW * C  # values per output row, and per tap of wt
    u = np.uint64
    for r in prange(N * OH):
        n = r // OH
        oh = r - n * OH
        yb = u(r * L)
        for j in range(u(L)):
            yf[yb + j] = 0.0
        for kh in range(KH):
            ih = oh * sh - pt + kh
            if ih < 0 or ih >= H:
                continue
            xb = u((n * H + ih) * W * C)
            for kw in range(KW):
                lo, hi = _tap_range(kw, pl, sw, W, OW)
                runs, span = _runs(lo, hi, sw, C)
                wb = u((kh * KW + kw) * L)
                for q in range(runs):
                    yo = u((lo + q) * C)
                    xo = xb + u(((lo + q) * sw - pl + kw) * C)
                    yq, wq = yb + yo, wb + yo
                    for j in range(u(span)):
                        yf[yq + j] += xf[xo + j] * wf[wq + j]
        if bias.shape[0] > 0:
            _bias_act_row(yf, r * L, (r + 1) * L, bias, act_lo, act_hi)


@sized_kernel(noalias=True)
def _backward_input(dx, dy, wt, sh, sw, pt, pl):
    """dx: (N, H, W, C) output, written entirely; dy: (N, OH, OW, C); wt: (KH, KW, OW*C), w tiled OW times.

    Input row ih is read by output row oh through tap kh when oh*sh - pt + kh == ih.
    """
    N, H, W, C = dx.shape
    OH, OW = dy.shape[1], dy.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    dxf, dyf, wf = dx.reshape(-1), dy.reshape(-1), wt.reshape(-1)
    L = OW * C
    u = np.uint64
    for r in prange(N * H):
        n = r // H
        ih = r - n * H
        xb = u(r * W * C)
        for j in range(u(W * C)):
            dxf[xb + j] = 0.0
        for kh in range(KH):
            t = ih + pt - kh
            if t < 0 or t % sh != 0 or t // sh >= OH:
                continue
            yb = u((n * OH + t // sh) * L)
            for kw in range(KW):
                lo, hi = _tap_range(kw, pl, sw, W, OW)
                runs, span = _runs(lo, hi, sw, C)
                wb = u((kh * KW + kw) * L)
                for q in range(runs):
                    yo = u((lo + q) * C)
                    xo = xb + u(((lo + q) * sw - pl + kw) * C)
                    yq, wq = yb + yo, wb + yo
                    for j in range(u(span)):
                        dxf[xo + j] += dyf[yq + j] * wf[wq + j]


@kernel(noalias=True)
def _weight_row(acc, KH, KW, dyf, r, xf, n, H, oh, sh, sw, pt, pl, W, OW, C):
    """Add output row r = (n, oh)'s weight-gradient terms to acc, the block's (KH, KW, OW*C) accumulator flat, tiled
    along the row (entry ow*C + c of a tap belongs to channel c); dyf and xf are dy and x flat.

    The tap loops are :func:`_forward`'s, written out again: one helper adding a tap's run for both gave the same
    bits but made the generic paths 5-16% slower (interleaved A/B in one process)."""
    L = OW * C
    u = np.uint64
    yb = u(r * L)
    for kh in range(KH):
        ih = oh * sh - pt + kh
        if ih < 0 or ih >= H:
            continue
        xb = u((n * H + ih) * W * C)
        for kw in range(KW):
            lo, hi = _tap_range(kw, pl, sw, W, OW)
            runs, span = _runs(lo, hi, sw, C)
            ab = u((kh * KW + kw) * L)
            for q in range(runs):
                yo = u((lo + q) * C)
                xo = xb + u(((lo + q) * sw - pl + kw) * C)
                aq, yq = ab + yo, yb + yo
                for j in range(u(span)):
                    acc[aq + j] += xf[xo + j] * dyf[yq + j]


@kernel(noalias=True)
def _weight_row_cols(acc, KH, KW, dyf, r, xf, n, H, oh, sh, sw, pt, pl, W, OW, C):
    """:func:`_weight_row` into a per-channel accumulator, (KH, KW, C) flat: one run of C values per column."""
    u = np.uint64
    Cu = u(C)
    yb = u(r * OW * C)
    for kh in range(KH):
        ih = oh * sh - pt + kh
        if ih < 0 or ih >= H:
            continue
        xb = u((n * H + ih) * W * C)
        for kw in range(KW):
            lo, hi = _tap_range(kw, pl, sw, W, OW)
            ab = u((kh * KW + kw) * C)
            for ow in range(lo, hi):
                xo = xb + u((ow * sw - pl + kw) * C)
                yo = yb + u(ow * C)
                for c in range(Cu):
                    acc[ab + c] += xf[xo + c] * dyf[yo + c]


@sized_kernel(noalias=True)
def _backward_weight(partial, dy, x, sh, sw, pt, pl, per_column):
    """partial: (B, KH, KW, L) output, block b's sum over its share of output rows; dy: (N, OH, OW, C);
    x: (N, H, W, C).

    L = OW*C (``per_column`` False): the accumulator is tiled along the row, entry ow*C + c belonging to channel c,
    so a stride-1 tap is one long run per row. L = C (``per_column`` True): one accumulator per channel, a loop
    start per column but OW times less accumulator; with many channels the runs are long anyway and the tiled
    accumulator (KH*KW*OW*C values per block) no longer fits in L1.
    """
    B, KH, KW = partial.shape[0], partial.shape[1], partial.shape[2]
    N, OH, OW, C = dy.shape
    H, W = x.shape[1], x.shape[2]
    dyf, xf = dy.reshape(-1), x.reshape(-1)
    rows = N * OH
    for blk in prange(B):
        acc = partial[blk].reshape(-1)  # (KH*KW*L,)
        acc[:] = 0.0
        for r in range(blk * rows // B, (blk + 1) * rows // B):
            n = r // OH
            if per_column:
                _weight_row_cols(acc, KH, KW, dyf, r, xf, n, H, r - n * OH, sh, sw, pt, pl, W, OW, C)
            else:
                _weight_row(acc, KH, KW, dyf, r, xf, n, H, r - n * OH, sh, sw, pt, pl, W, OW, C)


# ---- 3x3 stride-1 fast path (MobileNet's depthwise kernel; also its stride-1 input gradient) ----
#
# One output row is computed from the three input rows its taps read, so each output value is one fused 9-term
# sum, stored once. Each input row is first copied into a ring of three rows padded with zeros on both sides
# (:func:`_ring_rows`; consecutive output rows share two of their three rows, so each input row is copied once),
# and then every column, border or not, goes through one loop four columns at a time (:func:`_row3x3`): the 9
# weights are loaded once per channel vector and the 6 input columns under the 4 outputs once each. Offsets into a
# row are unsigned: with a signed index Numba emits a negative-index wraparound select that stops LLVM from
# vectorizing, and with one slice per column the vectorizer's runtime overlap checks (one per pair of slices)
# cost more than a short channel loop.
# Before, border columns and the last < 4 interior columns went one at a time with bounds checks, at ~3x the cost
# of an interior column (a quarter of a 16-column row, half of an 8-column one), and maps under 16 columns or 32
# channels used the generic loops. Against that, 2 threads, medians of 61 alternating calls, forward / forward +
# both gradients: 128x16x16x16 1.16x / 1.30x, 128x8x8x64 1.30x / 1.32x, 128x4x4x128 1.07x / 1.40x, 32x8x8x512
# 1.06x / 1.23x, 1x14x14x512 1.48x / 1.17x, 32x64x64x16 1.14x / 1.10x; level at 32x32x32x64, 32x32x32x128,
# 32x16x16x256 and the res-224 maps; 0.79-0.90x / 0.90x at 32x64x64x32, where the copy costs more than the border
# columns saved (reading the interior in place there as well took a second copy of the four-column loop in every
# kernel and pushed the cold compile of all kernels to 44 s). 2x2 maps keep the generic loops (0.70x / 0.79x).
_MIN_WIDTH_3X3 = 4


def _use_3x3(KH, KW, sh, sw, width):
    """Whether the stride-1 3x3 kernel serves an output row of ``width`` columns."""
    return (KH, KW, sh, sw) == (3, 3, 1, 1) and width >= _MIN_WIDTH_3X3


# The stride-2 3x3 forward (:func:`_forward3x3s2`) against the tiled loops, batch 32 (res-128 MobileNet shapes) and
# 128 (Fashion-MNIST shapes), 2 threads, ms: 64x64x64 2.54 vs 3.30, 32x32x128 0.96 vs 1.02, 16x16x256 0.24 vs
# 0.34, 8x8x512 0.148 vs 0.169, 16x16x32 0.221 vs 0.234; level at 8x8x64 (4 output columns), slower at 4x4x128
# (0.081 vs 0.074: two output columns, both border columns).
_MIN_WIDTH_3X3_S2 = 4


def _use_3x3_s2(KH, KW, sh, sw, width):
    """Whether the stride-2 3x3 forward kernel serves an output row of ``width`` columns."""
    return (KH, KW, sh, sw) == (3, 3, 2, 2) and width >= _MIN_WIDTH_3X3_S2


@kernel
def _channel_offsets(C):
    """j*C for j = 1..8 as unsigned ints: the offsets of the 3x3 kernels' columns and taps (unsigned for the
    reason in the note on the 3x3 path)."""
    u = np.uint64
    return u(C), u(2 * C), u(3 * C), u(4 * C), u(5 * C), u(6 * C), u(7 * C), u(8 * C)


@kernel(inline=True)
def _six_columns(k, C):
    """The offsets of six consecutive columns of C channels from offset k (unsigned): what four output columns of a
    stride-1 3x3 row read in one input row."""
    u = np.uint64
    return k, k + u(C), k + u(2 * C), k + u(3 * C), k + u(4 * C), k + u(5 * C)


@fast_kernel(noalias=True)
def _column3x3(y, yo, src, a, b, d, wf, C, W, sw, pl, ow):
    """y[yo + ow*C:yo + (ow+1)*C] = the 3x3 sum at output column ow (column stride sw) of the output row at yo, from
    the rows at offsets a, b, d of src (W columns each), skipping taps outside [0, W).

    For the border columns. Unsigned offsets into whole rows, no slices: with a slice per tap (and signed
    indices) a border column cost as much as ~15 interior columns, 2/3 of a 64x64x32 forward (112 vs 38 us per
    image). The sum per tap is in the same order as before, so the output is bitwise the same.
    """
    u = np.uint64
    Cu = u(C)
    o = u(yo + ow * C)
    for c in range(u(0), Cu):
        y[o + c] = 0.0
    for kw in range(3):
        iw = ow * sw - pl + kw
        if 0 <= iw < W:
            k = u(iw * C)
            sa, sb, sd = u(a) + k, u(b) + k, u(d) + k
            ka, kb, kd = u(kw * C), u((3 + kw) * C), u((6 + kw) * C)
            for c in range(u(0), Cu):
                y[o + c] += src[sa + c] * wf[ka + c] + src[sb + c] * wf[kb + c] + src[sd + c] * wf[kd + c]


@fast_kernel(noalias=True)
def _row3x3(y, yo, src, a, b, d, wf, C, OW):
    """One output row of the stride-1 3x3 conv: y[yo:yo + OW*C] from the three padded input rows at offsets a, b,
    d of src ((OW + 2)*C values each: output column ow reads their columns ow, ow + 1, ow + 2). Four columns per
    pass, then one."""
    u = np.uint64
    Cu = u(C)
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    ow = 0
    while ow + 4 <= OW:
        o0 = u(ow * C)  # output j reads padded columns j, j+1, j+2 of the 6 starting at the same offset
        y0 = u(yo) + o0
        y1, y2, y3 = y0 + m1, y0 + m2, y0 + m3
        a0, a1, a2, a3, a4, a5 = _six_columns(u(a) + o0, C)
        b0, b1, b2, b3, b4, b5 = _six_columns(u(b) + o0, C)
        d0, d1, d2, d3, d4, d5 = _six_columns(u(d) + o0, C)
        for c in range(u(0), Cu):
            v0, v1, v2 = wf[c], wf[c + m1], wf[c + m2]
            v3, v4, v5 = wf[c + m3], wf[c + m4], wf[c + m5]
            v6, v7, v8 = wf[c + m6], wf[c + m7], wf[c + m8]
            p0, p1, p2, p3, p4, p5 = src[c + a0], src[c + a1], src[c + a2], src[c + a3], src[c + a4], src[c + a5]
            q0, q1, q2, q3, q4, q5 = src[c + b0], src[c + b1], src[c + b2], src[c + b3], src[c + b4], src[c + b5]
            s0, s1, s2, s3, s4, s5 = src[c + d0], src[c + d1], src[c + d2], src[c + d3], src[c + d4], src[c + d5]
            y[c + y0] = ((p0 * v0 + p1 * v1 + p2 * v2) + (q0 * v3 + q1 * v4 + q2 * v5)
                         + (s0 * v6 + s1 * v7 + s2 * v8))
            y[c + y1] = ((p1 * v0 + p2 * v1 + p3 * v2) + (q1 * v3 + q2 * v4 + q3 * v5)
                         + (s1 * v6 + s2 * v7 + s3 * v8))
            y[c + y2] = ((p2 * v0 + p3 * v1 + p4 * v2) + (q2 * v3 + q3 * v4 + q4 * v5)
                         + (s2 * v6 + s3 * v7 + s4 * v8))
            y[c + y3] = ((p3 * v0 + p4 * v1 + p5 * v2) + (q3 * v3 + q4 * v4 + q5 * v5)
                         + (s3 * v6 + s4 * v7 + s5 * v8))
        ow += 4
    for ow in range(ow, OW):
        o0 = u(ow * C)
        y0, a0, b0, d0 = u(yo) + o0, u(a) + o0, u(b) + o0, u(d) + o0
        for c in range(u(0), Cu):
            y[c + y0] = ((src[c + a0] * wf[c] + src[c + a0 + m1] * wf[c + m1] + src[c + a0 + m2] * wf[c + m2])
                         + (src[c + b0] * wf[c + m3] + src[c + b0 + m1] * wf[c + m4] + src[c + b0 + m2] * wf[c + m5])
                         + (src[c + d0] * wf[c + m6] + src[c + d0 + m1] * wf[c + m7] + src[c + d0 + m2] * wf[c + m8]))


@fast_kernel(noalias=True, inline=True)  # into the row helpers, which then make no call (kernels._jit.kernel)
def _weight_col3x3(acc, dy, g, src, a, b, d, C):
    """acc (9*C,) += the nine weight-gradient terms of one output column, dy[g:g + C], whose taps read the three
    consecutive columns from offsets a, b, d of src (unsigned): the last columns of :func:`_weight_row3x3`,
    :func:`_weight_rows3x3` and :func:`_weight_row3x3s2`, one at a time."""
    u = np.uint64
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    for c in range(u(0), u(C)):
        e = dy[c + g]
        acc[c] += src[c + a] * e
        acc[c + m1] += src[c + a + m1] * e
        acc[c + m2] += src[c + a + m2] * e
        acc[c + m3] += src[c + b] * e
        acc[c + m4] += src[c + b + m1] * e
        acc[c + m5] += src[c + b + m2] * e
        acc[c + m6] += src[c + d] * e
        acc[c + m7] += src[c + d + m1] * e
        acc[c + m8] += src[c + d + m2] * e


@fast_kernel(noalias=True)
def _weight_row3x3(acc, dy, go, src, a, b, d, C, OW):
    """acc (9*C,) += the stride-1 3x3 weight-gradient terms of one output row, entry (kh*3 + kw)*C + c: the row is
    dy[go:go + OW*C]; a, b, d the offsets in src of the padded input rows under it ((OW + 2)*C values each, as
    :func:`_row3x3` reads them).

    Four columns per pass: each channel's nine sums of four products stay in registers and go into acc once, so
    per product there is about one load instead of the three loads and a store of :func:`_weight_row`."""
    u = np.uint64
    Cu = u(C)
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    ow = 0
    while ow + 4 <= OW:
        o0 = u(ow * C)  # dy columns ow..ow+3 pair with padded columns ow+j+kw
        g0 = u(go) + o0
        g1, g2, g3 = g0 + m1, g0 + m2, g0 + m3
        a0, a1, a2, a3, a4, a5 = _six_columns(u(a) + o0, C)
        b0, b1, b2, b3, b4, b5 = _six_columns(u(b) + o0, C)
        d0, d1, d2, d3, d4, d5 = _six_columns(u(d) + o0, C)
        for c in range(u(0), Cu):
            e0, e1, e2, e3 = dy[c + g0], dy[c + g1], dy[c + g2], dy[c + g3]
            p0, p1, p2, p3, p4, p5 = src[c + a0], src[c + a1], src[c + a2], src[c + a3], src[c + a4], src[c + a5]
            q0, q1, q2, q3, q4, q5 = src[c + b0], src[c + b1], src[c + b2], src[c + b3], src[c + b4], src[c + b5]
            s0, s1, s2, s3, s4, s5 = src[c + d0], src[c + d1], src[c + d2], src[c + d3], src[c + d4], src[c + d5]
            acc[c] += (p0 * e0 + p1 * e1) + (p2 * e2 + p3 * e3)
            acc[c + m1] += (p1 * e0 + p2 * e1) + (p3 * e2 + p4 * e3)
            acc[c + m2] += (p2 * e0 + p3 * e1) + (p4 * e2 + p5 * e3)
            acc[c + m3] += (q0 * e0 + q1 * e1) + (q2 * e2 + q3 * e3)
            acc[c + m4] += (q1 * e0 + q2 * e1) + (q3 * e2 + q4 * e3)
            acc[c + m5] += (q2 * e0 + q3 * e1) + (q4 * e2 + q5 * e3)
            acc[c + m6] += (s0 * e0 + s1 * e1) + (s2 * e2 + s3 * e3)
            acc[c + m7] += (s1 * e0 + s2 * e1) + (s3 * e2 + s4 * e3)
            acc[c + m8] += (s2 * e0 + s3 * e1) + (s4 * e2 + s5 * e3)
        ow += 4
    for ow in range(ow, OW):
        o0 = u(ow * C)
        _weight_col3x3(acc, dy, u(go) + o0, src, u(a) + o0, u(b) + o0, u(d) + o0, C)


@fast_kernel(noalias=True)
def _weight_rows3x3(acc, dy, go, src, a, b, d, e, C, OW):
    """:func:`_weight_row3x3` for two consecutive output rows of one image at once: dy[go:go + 2*OW*C], the first
    row over the padded input rows at offsets a, b, d of src, the second over b, d, e.

    Four columns of both rows per pass, and each of the nine sums goes into acc once for the pair: acc's loads and
    stores, 18 per pass of one row, fall to 9 per pass of two, and the two middle input rows are loaded once for
    both. Measured against one row per pass, the two versions alternating in one process (2 threads, stride 1,
    float32): the weight gradient 1.00-1.14x over the MobileNet shapes, the fused backward 1.02-1.13x (32x4x4x1024
    1.26x and 1.42x), 0.97-0.99x at 32x32x32x128. Three rows per pass were no faster (0.96-1.09x against two).
    The sums are added in another order than row by row, so the bits differ from that; every caller pairs the same
    rows (:func:`_weight_pairs`)."""
    u = np.uint64
    Cu = u(C)
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    gn = u(go) + u(OW * C)  # the second row's dy
    ow = 0
    while ow + 4 <= OW:
        o0 = u(ow * C)
        g0, h0 = u(go) + o0, gn + o0
        g1, g2, g3 = g0 + m1, g0 + m2, g0 + m3
        h1, h2, h3 = h0 + m1, h0 + m2, h0 + m3
        a0, a1, a2, a3, a4, a5 = _six_columns(u(a) + o0, C)
        b0, b1, b2, b3, b4, b5 = _six_columns(u(b) + o0, C)
        d0, d1, d2, d3, d4, d5 = _six_columns(u(d) + o0, C)
        f0, f1, f2, f3, f4, f5 = _six_columns(u(e) + o0, C)
        for c in range(u(0), Cu):
            e0, e1, e2, e3 = dy[c + g0], dy[c + g1], dy[c + g2], dy[c + g3]  # first row
            k0, k1, k2, k3 = dy[c + h0], dy[c + h1], dy[c + h2], dy[c + h3]  # second row
            p0, p1, p2, p3, p4, p5 = src[c + a0], src[c + a1], src[c + a2], src[c + a3], src[c + a4], src[c + a5]
            q0, q1, q2, q3, q4, q5 = src[c + b0], src[c + b1], src[c + b2], src[c + b3], src[c + b4], src[c + b5]
            s0, s1, s2, s3, s4, s5 = src[c + d0], src[c + d1], src[c + d2], src[c + d3], src[c + d4], src[c + d5]
            t0, t1, t2, t3, t4, t5 = src[c + f0], src[c + f1], src[c + f2], src[c + f3], src[c + f4], src[c + f5]
            acc[c] += ((p0 * e0 + p1 * e1) + (p2 * e2 + p3 * e3)) + ((q0 * k0 + q1 * k1) + (q2 * k2 + q3 * k3))
            acc[c + m1] += ((p1 * e0 + p2 * e1) + (p3 * e2 + p4 * e3)) + ((q1 * k0 + q2 * k1) + (q3 * k2 + q4 * k3))
            acc[c + m2] += ((p2 * e0 + p3 * e1) + (p4 * e2 + p5 * e3)) + ((q2 * k0 + q3 * k1) + (q4 * k2 + q5 * k3))
            acc[c + m3] += ((q0 * e0 + q1 * e1) + (q2 * e2 + q3 * e3)) + ((s0 * k0 + s1 * k1) + (s2 * k2 + s3 * k3))
            acc[c + m4] += ((q1 * e0 + q2 * e1) + (q3 * e2 + q4 * e3)) + ((s1 * k0 + s2 * k1) + (s3 * k2 + s4 * k3))
            acc[c + m5] += ((q2 * e0 + q3 * e1) + (q4 * e2 + q5 * e3)) + ((s2 * k0 + s3 * k1) + (s4 * k2 + s5 * k3))
            acc[c + m6] += ((s0 * e0 + s1 * e1) + (s2 * e2 + s3 * e3)) + ((t0 * k0 + t1 * k1) + (t2 * k2 + t3 * k3))
            acc[c + m7] += ((s1 * e0 + s2 * e1) + (s3 * e2 + s4 * e3)) + ((t1 * k0 + t2 * k1) + (t3 * k2 + t4 * k3))
            acc[c + m8] += ((s2 * e0 + s3 * e1) + (s4 * e2 + s5 * e3)) + ((t2 * k0 + t3 * k1) + (t4 * k2 + t5 * k3))
        ow += 4
    for ow in range(ow, OW):
        o0 = u(ow * C)
        _weight_col3x3(acc, dy, u(go) + o0, src, u(a) + o0, u(b) + o0, u(d) + o0, C)
        _weight_col3x3(acc, dy, gn + o0, src, u(b) + o0, u(d) + o0, u(e) + o0, C)


@kernel(inline=True)
def _weight_pairs(r, r1, OH):
    """Whether output row r of a block's rows [r0, r1) starts a pair for :func:`_weight_rows3x3`: row r + 1 is in
    the block and in the same image. Blocks walk their rows from r0 and step by two after a pair, so the pairing,
    and with it every bit of the sums, depends only on the blocks, never on the kernel that walks them."""
    return r + 1 < r1 and (r + 1) % OH != 0


@fast_kernel(noalias=True)
def _weight_row3x3s2(acc, dy, go, src, a, b, d, C, OW):
    """:func:`_weight_row3x3` at stride 2: the rows at offsets a, b, d of src are padded rows ((2*OW + 1)*C values),
    output column ow reading their columns 2*ow .. 2*ow + 2. Four columns per pass over nine padded columns (27
    input offsets: the overlap checks that once kept such a loop scalar are gone with noalias)."""
    u = np.uint64
    Cu = u(C)
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    ow = 0
    while ow + 4 <= OW:
        g0 = u(go) + u(ow * C)
        g1, g2, g3 = g0 + m1, g0 + m2, g0 + m3
        k0 = u(2 * ow * C)  # dy column ow + t pairs with padded columns 2t + kw from here
        a0, b0, d0 = u(a) + k0, u(b) + k0, u(d) + k0
        for c in range(u(0), Cu):
            e0, e1, e2, e3 = dy[c + g0], dy[c + g1], dy[c + g2], dy[c + g3]
            k = c + a0
            p0, p1, p2, p3, p4 = src[k], src[k + m1], src[k + m2], src[k + m3], src[k + m4]
            p5, p6, p7, p8 = src[k + m5], src[k + m6], src[k + m7], src[k + m8]
            acc[c] += (p0 * e0 + p2 * e1) + (p4 * e2 + p6 * e3)
            acc[c + m1] += (p1 * e0 + p3 * e1) + (p5 * e2 + p7 * e3)
            acc[c + m2] += (p2 * e0 + p4 * e1) + (p6 * e2 + p8 * e3)
            k = c + b0
            p0, p1, p2, p3, p4 = src[k], src[k + m1], src[k + m2], src[k + m3], src[k + m4]
            p5, p6, p7, p8 = src[k + m5], src[k + m6], src[k + m7], src[k + m8]
            acc[c + m3] += (p0 * e0 + p2 * e1) + (p4 * e2 + p6 * e3)
            acc[c + m4] += (p1 * e0 + p3 * e1) + (p5 * e2 + p7 * e3)
            acc[c + m5] += (p2 * e0 + p4 * e1) + (p6 * e2 + p8 * e3)
            k = c + d0
            p0, p1, p2, p3, p4 = src[k], src[k + m1], src[k + m2], src[k + m3], src[k + m4]
            p5, p6, p7, p8 = src[k + m5], src[k + m6], src[k + m7], src[k + m8]
            acc[c + m6] += (p0 * e0 + p2 * e1) + (p4 * e2 + p6 * e3)
            acc[c + m7] += (p1 * e0 + p3 * e1) + (p5 * e2 + p7 * e3)
            acc[c + m8] += (p2 * e0 + p4 * e1) + (p6 * e2 + p8 * e3)
        ow += 4
    for ow in range(ow, OW):
        k0 = u(2 * ow * C)
        _weight_col3x3(acc, dy, u(go) + u(ow * C), src, u(a) + k0, u(b) + k0, u(d) + k0, C)


@kernel(noalias=True)
def _ring_rows(ring, held, src, row_len, base, H, ih, pl, C, first, last, in_center, in_k, in_shift, in_lo,
               in_hi):
    """The padded rows of input rows ih, ih + 1, ih + 2 of one image (rows base .. base + H - 1 of src, a flat array
    of rows of row_len values), as their offsets in ring.

    ring (S*L,), flat, keeps input row i in slot i % S (values from (i % S)*L), input column iw at padded column
    iw + pl, so that consecutive output rows copy one new input row each; held (S,) says which row each slot holds
    (base + i, or -1 for a padding row: all zeros). S is 3, or 4 for a weight gradient that takes two output rows
    at a time (:func:`_weight_rows3x3`: it asks for ih + 1 after ih, and the fourth slot keeps ih). Input columns
    [first, last) are copied; padded columns outside the input are never written and stay zero. A non-empty
    in_shift (C,) maps each copied row to clip((row - in_center) * in_k + in_shift, in_lo, in_hi)
    (:func:`_scale_act_row`) in cache: the output pass of the layer before (a folded bias, or a training batch norm
    and its activation), deferred to this copy.
    """
    S = held.shape[0]
    L = ring.shape[0] // S
    u = np.uint64
    for t in range(3):
        i = ih + t
        slot = i % S
        key = base + i if 0 <= i < H else -1
        if held[slot] != key:
            r0 = slot * L
            if key < 0:
                for j in range(u(r0), u(r0 + L)):
                    ring[j] = 0.0
            elif last > first:
                d0, s0 = u(r0 + (first + pl) * C), u(key * row_len + first * C)
                for j in range(u((last - first) * C)):
                    ring[d0 + j] = src[s0 + j]
                if in_shift.shape[0] > 0:
                    _scale_act_row(ring, r0 + (first + pl) * C, r0 + (last + pl) * C, in_center, in_k, in_shift,
                                   in_lo, in_hi)
            held[slot] = key
    return (ih % S) * L, ((ih + 1) % S) * L, ((ih + 2) % S) * L


@kernel(noalias=True)
def _copy_row(y, start, row, L):
    """y[start:start + L] = row[:L], y flat: a finished output row leaves its buffer in one run of stores. Not
    inlined: one compiled copy serves every kernel that buffers its rows (as fast, measured)."""
    u = np.uint64
    o = u(start)
    for j in range(u(L)):
        y[o + j] = row[j]


@kernel
def _span3x3(W, OW, pl):
    """The input columns [first, last) that some output column of a stride-1 3x3 row reads (output width OW,
    input width W, pl columns of left padding): what the ring copies."""
    return max(0, -pl), min(W, OW + 2 - pl)


@fast_sized_kernel(noalias=True)
def _forward3x3(y, x, wf, pt, pl, blocks, buffered, bias, act_lo, act_hi, in_center, in_k, in_shift, in_lo,
                in_hi):
    """Stride-1 3x3 depthwise conv. y: (N, OH, OW, C) output, written entirely; x: (N, H, W, C);
    wf: (9*C,) weights, entry (kh*3 + kw)*C + c; pt and pl may be any ints; bias (C,), act_lo, act_hi: the
    output pass of :func:`_bias_act_row`, none when bias is empty (0,); in_center, in_k, in_shift, in_lo, in_hi:
    the input pass of :func:`_scale_act_row`, on the
    input rows as they enter the ring (the previous layer's output pass). Output rows are split into ``blocks``
    runs, each with its own ring of padded input rows (:func:`_ring_rows`); the split changes no value.
    ``buffered``: each row is computed in a buffer of one row and then stored in one run (see :func:`_buffered`).
    """
    N, OH, OW, C = y.shape
    H, W = x.shape[1], x.shape[2]
    yf, xf = y.reshape(-1), x.reshape(-1)
    first, last = _span3x3(W, OW, pl)
    rows, L = N * OH, OW * C
    for blk in prange(blocks):
        ring = np.zeros(3 * (OW + 2) * C, y.dtype)
        held = np.full(3, -1, np.int64)
        row = np.empty(L if buffered else 0, y.dtype)
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            n = r // OH
            a, b, d = _ring_rows(ring, held, xf, W * C, n * H, H, r - n * OH - pt, pl, C, first, last, in_center,
                                 in_k, in_shift, in_lo, in_hi)
            if buffered:
                _row3x3(row, 0, ring, a, b, d, wf, C, OW)
                if bias.shape[0] > 0:
                    _bias_act_row(row, 0, L, bias, act_lo, act_hi)
                _copy_row(yf, r * L, row, L)
            else:  # as it was before rows had a buffer: one pointer, known offsets (a shared path ran 4% slower)
                _row3x3(yf, r * L, ring, a, b, d, wf, C, OW)
                if bias.shape[0] > 0:
                    _bias_act_row(yf, r * L, (r + 1) * L, bias, act_lo, act_hi)


@fast_sized_kernel(noalias=True)
def _weight3x3(partial, dy, x, stride, pt, pl, in_center, in_k, in_shift, in_lo, in_hi):
    """Weight gradient of the 3x3 conv at stride 1 or 2 (both axes). partial: (B, 3, 3, C) output, block b's sum
    over its share of the output rows (as in :func:`_backward_weight`); dy: (N, OH, OW, C); x: (N, H, W, C);
    in_center, in_k, in_shift, in_lo, in_hi: the input pass of the forward (:func:`_ring_rows`, empty for none),
    applied again to the copied rows, so x is the pass's input. Each block reads the input rows through its
    own ring of zero-padded rows ((OW - 1)*stride + 3 columns: every output column reads inside it, so border
    columns take the same loop) and accumulates with :func:`_weight_row3x3s2` at stride 2, and at stride 1 with
    :func:`_weight_rows3x3` two rows at a time where :func:`_weight_pairs` allows (a ring of four rows), else
    :func:`_weight_row3x3`: exactly as :func:`_backward3x3` does."""
    B = partial.shape[0]
    N, OH, OW, C = dy.shape
    H, W = x.shape[1], x.shape[2]
    dyf, xf = dy.reshape(-1), x.reshape(-1)
    span = (OW - 1) * stride + 3  # padded columns the row reads
    first, last = max(0, -pl), min(W, span - pl)
    rows, L = N * OH, OW * C
    slots = 4 if stride == 1 else 3  # stride 1 takes rows in pairs, over four input rows
    for blk in prange(B):
        acc = partial[blk].reshape(9 * C)
        acc[:] = 0.0
        ring = np.zeros(slots * span * C, dy.dtype)
        held = np.full(slots, -1, np.int64)
        r, r1 = blk * rows // B, (blk + 1) * rows // B
        while r < r1:
            n = r // OH
            ih = (r - n * OH) * stride - pt
            a, b, d = _ring_rows(ring, held, xf, W * C, n * H, H, ih, pl, C, first, last, in_center, in_k, in_shift,
                                 in_lo, in_hi)
            if stride != 1:
                _weight_row3x3s2(acc, dyf, r * L, ring, a, b, d, C, OW)
                r += 1
            elif _weight_pairs(r, r1, OH):
                e = _ring_rows(ring, held, xf, W * C, n * H, H, ih + 1, pl, C, first, last, in_center, in_k,
                               in_shift, in_lo, in_hi)[2]
                _weight_rows3x3(acc, dyf, r * L, ring, a, b, d, e, C, OW)
                r += 2
            else:
                _weight_row3x3(acc, dyf, r * L, ring, a, b, d, C, OW)
                r += 1


@parallel_kernel(noalias=True)
def _backward3x3(dx, partial, dy, x, wf, pt, pl, buffered, in_center, in_k, in_shift, in_lo, in_hi):
    """Both gradients of the stride-1 3x3 conv in one pass over dy. dx: (N, H, W, C) output, written entirely;
    partial: (B, 3, 3, C) output as in :func:`_weight3x3`; dy: (N, OH, OW, C); x: (N, H, W, C);
    wf: (9*C,) the weights flipped in both axes, entry (kh*3 + kw)*C + c; ``buffered``: dx rows as the output
    rows of :func:`_forward3x3`; in_center, in_k, in_shift, in_lo, in_hi: the forward's input pass, applied to
    the copied x rows as in :func:`_weight3x3` (empty for none).

    Block b computes its weight-gradient rows (the same rows, in the same order, as :func:`_weight3x3`) and
    input-gradient rows (each as in :func:`_forward3x3` on dy with the flipped kernel), interleaved: a pair of
    weight rows (or a single one, as :func:`_weight_pairs` says), then as many input-gradient rows. With 'same'
    padding the dy rows that input row i reads are the ones the weight gradient just read, so dy comes from memory
    once instead of twice. Every value is computed exactly as by the two separate kernels. Compiled
    parallel only (it serves large maps, see :func:`depthwise_backward`): a serial build would add its own
    compile time to a cold start for maps that stay in cache between two separate passes anyway.
    """
    B = partial.shape[0]
    N, OH, OW, C = dy.shape
    H, W = x.shape[1], x.shape[2]
    dyf, xf, dxf = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    qt, ql = 2 - pt, 2 - pl  # dx is the 3x3 conv of dy with the flipped kernel and this padding
    first, last = _span3x3(OW, W, ql)
    x_first, x_last = _span3x3(W, OW, pl)
    rows, in_rows = N * OH, N * H
    for blk in prange(B):
        acc = partial[blk].reshape(9 * C)
        acc[:] = 0.0
        ring = np.zeros(3 * (W + 2) * C, dy.dtype)  # padded dy rows under the input-gradient taps
        held = np.full(3, -1, np.int64)
        x_ring = np.zeros(4 * (OW + 2) * C, dy.dtype)  # padded x rows under the weight-gradient taps (pairs)
        x_held = np.full(4, -1, np.int64)
        no_pass = in_shift[:0]  # dy rows are copied as they are
        row = np.empty(W * C if buffered else 0, dy.dtype)
        r, r1 = blk * rows // B, (blk + 1) * rows // B
        i, i1 = blk * in_rows // B, (blk + 1) * in_rows // B
        while r < r1 or i < i1:
            steps = 1
            if r < r1:
                n = r // OH
                ih = r - n * OH - pt
                xa, xb, xd = _ring_rows(x_ring, x_held, xf, W * C, n * H, H, ih, pl, C, x_first, x_last, in_center,
                                        in_k, in_shift, in_lo, in_hi)
                if _weight_pairs(r, r1, OH):
                    xe = _ring_rows(x_ring, x_held, xf, W * C, n * H, H, ih + 1, pl, C, x_first, x_last, in_center,
                                    in_k, in_shift, in_lo, in_hi)[2]
                    _weight_rows3x3(acc, dyf, r * OW * C, x_ring, xa, xb, xd, xe, C, OW)
                    steps = 2
                else:
                    _weight_row3x3(acc, dyf, r * OW * C, x_ring, xa, xb, xd, C, OW)
                r += steps
            for _ in range(steps):  # as many dx rows as weight rows, so both read the same dy rows while cached
                if i < i1:
                    n = i // H
                    a, b, d = _ring_rows(ring, held, dyf, OW * C, n * OH, OH, i - n * H - qt, ql, C, first, last,
                                         no_pass, no_pass, no_pass, in_lo, in_hi)
                    if buffered:
                        _row3x3(row, 0, ring, a, b, d, wf, C, W)
                        _copy_row(dxf, i * W * C, row, W * C)
                    else:
                        _row3x3(dxf, i * W * C, ring, a, b, d, wf, C, W)
                    i += 1


@fast_kernel(noalias=True)
def _row3x3s2(y, yo, src, a, b, d, wf, C, W, OW, pl, lo, hi):
    """The interior of one output row of the stride-2 3x3 conv, y[yo + lo*C:yo + stop*C], from the input rows at
    offsets a, b, d of src (W columns each, no padding columns), two columns per pass over [lo, hi): returns stop,
    the first column it left (hi or hi - 1). The caller does the others with :func:`_column3x3`, so that this
    function makes no call (see :func:`kernels._jit.kernel`).

    Output columns ow and ow + 1 read the five input columns from 2*ow - pl, the middle one shared. Two columns,
    not four as at stride 1: with four, the loop has 27 input offsets and LLVM gives up on the runtime overlap
    checks it needs before vectorizing ("too many memory checks"), and the loop ran scalar, 1.5x slower than
    the generic one.
    """
    u = np.uint64
    Cu = u(C)
    m1, m2, m3, m4, m5, m6, m7, m8 = _channel_offsets(C)
    ow = lo
    while ow + 2 <= hi:
        y0 = u(yo + ow * C)
        y1 = y0 + m1
        k0 = u((ow * 2 - pl) * C)  # outputs t read columns 2t, 2t+1, 2t+2 of the 5 starting here
        a0, b0, d0 = u(a) + k0, u(b) + k0, u(d) + k0
        a1, a2, a3, a4 = a0 + m1, a0 + m2, a0 + m3, a0 + m4
        b1, b2, b3, b4 = b0 + m1, b0 + m2, b0 + m3, b0 + m4
        d1, d2, d3, d4 = d0 + m1, d0 + m2, d0 + m3, d0 + m4
        for c in range(u(0), Cu):
            v0, v1, v2 = wf[c], wf[c + m1], wf[c + m2]
            v3, v4, v5 = wf[c + m3], wf[c + m4], wf[c + m5]
            v6, v7, v8 = wf[c + m6], wf[c + m7], wf[c + m8]
            p0, p1, p2, p3, p4 = src[c + a0], src[c + a1], src[c + a2], src[c + a3], src[c + a4]
            q0, q1, q2, q3, q4 = src[c + b0], src[c + b1], src[c + b2], src[c + b3], src[c + b4]
            s0, s1, s2, s3, s4 = src[c + d0], src[c + d1], src[c + d2], src[c + d3], src[c + d4]
            y[c + y0] = ((p0 * v0 + p1 * v1 + p2 * v2) + (q0 * v3 + q1 * v4 + q2 * v5)
                         + (s0 * v6 + s1 * v7 + s2 * v8))
            y[c + y1] = ((p2 * v0 + p3 * v1 + p4 * v2) + (q2 * v3 + q3 * v4 + q4 * v5)
                         + (s2 * v6 + s3 * v7 + s4 * v8))
        ow += 2
    return ow


@fast_sized_kernel(noalias=True)
def _forward3x3s2(y, x, wf, pt, pl, blocks, bias, act_lo, act_hi, in_center, in_k, in_shift, in_lo, in_hi):
    """Stride-2 3x3 depthwise conv, two output columns per pass (:func:`_row3x3s2`). y: (N, OH, OW, C) output,
    written entirely; x: (N, H, W, C); wf: (9*C,) weights, entry (kh*3 + kw)*C + c; bias (C,), act_lo, act_hi:
    the output pass of :func:`_bias_act_row`, none when bias is empty (0,); in_center, in_k, in_shift, in_lo,
    in_hi: the input pass of :func:`_scale_act_row`, on the input rows, which are then read from a ring of three
    copies (:func:`_ring_rows`, no padding columns) instead of in place. Rows in place need all three input rows
    inside the map; an output row that reads a padding row reads through the ring as well (it holds the zeros).
    Output rows are split into ``blocks`` runs, each with its own ring.
    """
    N, OH, OW, C = y.shape
    H, W = x.shape[1], x.shape[2]
    yf, xf = y.reshape(-1), x.reshape(-1)
    lo = min(OW, (pl + 1) // 2)  # interior: 0 <= 2*ow - pl and 2*ow - pl + 2 < W
    hi = max(lo, min(OW, (W - 3 + pl) // 2 + 1)) if W - 3 + pl >= 0 else lo
    two = 2 * (OW // OW)  # the stride as a plain int, as in :func:`_row3x3`
    none = C - C  # 0 as a plain int: literal zeros made Numba compile _ring_rows a second time, for this call alone
    rows, L, XL = N * OH, OW * C, W * C
    copies = in_shift.shape[0] > 0
    for blk in prange(blocks):
        ring = np.zeros(3 * XL, y.dtype)
        held = np.full(3, -1, np.int64)
        for r in range(blk * rows // blocks, (blk + 1) * rows // blocks):
            n = r // OH
            ih = (r - n * OH) * 2 - pt
            if copies or ih < 0 or ih + 2 >= H:
                a, b, d = _ring_rows(ring, held, xf, XL, n * H, H, ih, none, C, none, W, in_center, in_k, in_shift,
                                     in_lo, in_hi)
                src = ring
            else:
                a = (n * H + ih) * XL
                b, d = a + XL, a + 2 * XL
                src = xf
            stop = _row3x3s2(yf, r * L, src, a, b, d, wf, C, W, OW, pl, lo, hi)
            for ow in range(lo):
                _column3x3(yf, r * L, src, a, b, d, wf, C, W, two, pl, ow)
            for ow in range(stop, OW):
                _column3x3(yf, r * L, src, a, b, d, wf, C, W, two, pl, ow)
            if bias.shape[0] > 0:
                _bias_act_row(yf, r * L, (r + 1) * L, bias, act_lo, act_hi)


# Work passed to the serial/parallel rule: two units per output value, so the kernels run on both threads from 2^18
# outputs (the rule's 2^19 is for one-pass elementwise kernels; a 3x3 depthwise output costs nine mult-adds).
# Measured, 2 threads, us serial vs parallel: 128x1x1x512 11 vs 74, 128x2x2x256 49 vs 88, 128x8x8x64 s2 (131k
# outputs) 146 vs 185, 128x4x4x128 (262k) 170 vs 167, 128x16x16x16 (524k) 545 vs 405: below ~2^18 outputs the
# launch costs more than the second thread saves.
def _work(y):
    return 2 * y.size


# Output rows computed in a buffer of one row and then stored in one run (:func:`_copy_row`), from this many bytes
# of output: with the output far out of cache, stores that miss, mixed into the row's arithmetic, stall it; the
# same stores in a loop of their own stream. Measured, 2 threads, stride-1 forward, in-process A/B against rows
# written in place: 32x64x64x32 1.23x, 32x32x32x128 1.31x, 32x64x64x64 1.30x; level at 32x16x16x256 (8 MiB of
# output); 0.95-0.99x on the maps under 1 MiB, where the output stays in cache and the copy is extra work. The
# fused backward (its dx rows): 1.14x at 32x64x64x32, 1.07x at 32x32x32x128. Not the stride-2 forward, whose
# output is a quarter of its input: 0.92-0.97x at 32x64x64x64 (8 MiB of output).
_MIN_BUFFERED_BYTES = 1 << 23


def _buffered(y):
    """Whether the 3x3 kernels writing ``y`` compute each row in a buffer first (see above)."""
    return y.nbytes >= _MIN_BUFFERED_BYTES


def _blocks(y):
    """Runs of output rows for :func:`_forward3x3` and :func:`_forward3x3s2` producing ``y``: one per thread when
    they run parallel, else one (each run fills its ring afresh, so fewer runs copy less)."""
    return numba.get_num_threads() if _jit.use_parallel(_work(y)) else 1


def _check_w(w):
    check_float_array("w", w, 4, _W_LEGEND)


def _tiled(w, OW):
    """w (KH, KW, C, M) -> (KH, KW, OW*C*M) with entry ow*C*M + c*M + m = w[kh, kw, c, m]: one weight per value
    of a flattened output row, so a stride-1 run over many columns is a plain elementwise product."""
    KH, KW, C, M = w.shape
    return np.ascontiguousarray(np.tile(w.reshape(KH, KW, C * M), (1, 1, OW)))  # (KH, KW, OW*C*M)


def _flat(w):
    """w (KH, KW, C, M) -> (KH*KW*C*M,) contiguous, entry (kh*KW + kw)*C*M + c*M + m, as the 3x3 kernel reads it."""
    return np.ascontiguousarray(w).reshape(-1)  # (KH*KW*C*M,)


def _expand(x, M):
    """x (N, H, W, C) -> (N, H, W, C*M) with channel c*M + m = x[..., c]: the M == 1 view of a multiplier-M op."""
    x = np.ascontiguousarray(x)
    return x if M == 1 else np.repeat(x, M, axis=3)  # (N, H, W, C*M)


def depthwise_forward(x, w, *, stride=1, padding="valid", bias=None, act=None, in_bias=None, in_act=None,
                      in_center=None, in_scale=None):
    """Depthwise convolution: each input channel convolved with its own M filters, optionally followed by a
    per-channel bias and an activation computed in the same pass (a batch norm folded for inference), and
    optionally preceded by a per-channel affine map and an activation on its input (the previous layer's output
    pass, deferred: a folded batch norm's bias, or a training batch norm applied from its batch statistics).

    y = act(depthwise(in_act((x - in_center) * in_scale + in_bias), w) + bias), the padding zeros added after
    in_act: bit for bit :func:`kernels.batchnorm.scale_act_forward` on x, the plain forward, then
    :func:`kernels.batchnorm.bias_act_forward` on its output.
    Each output row gets its bias and activation while it is still in cache. The 3x3 kernels apply the input pass
    as they copy each input row into a ring of three rows (the stride-1 kernel copies them anyway; the stride-2
    one then reads the copies instead of x): no pass over memory (see :func:`input_pass_is_free`). Elsewhere it
    is a pass of its own over x.

    Args:
        x: (N, H, W, C) float32 or float64, any strides.
        w: (KH, KW, C, M), same dtype; M is the depth multiplier.
        stride: int or (sh, sw).
        padding: 'same' (TensorFlow rule, odd pad bottom/right), 'valid', int or (ph, pw).
        bias: optional (C*M,) per output channel, same dtype.
        act: None, 'relu' or 'relu6', applied after the bias (with or without one).
        in_bias: optional (C,) per input channel, same dtype, added to x first.
        in_act: None, 'relu' or 'relu6', applied to x after in_bias (with or without one).
        in_center, in_scale: optional (C,), same dtype: x is first centred and scaled, (x - in_center) * in_scale
            (a batch norm's mean and gamma * inv_std), then in_bias and in_act follow.

    Returns:
        y: (N, OH, OW, C*M), x's dtype; channel c*M + m is input channel c through filter m.
    """
    check_float_array("x", x, 4, "(N, H, W, C)")
    _check_w(w)
    check_same_dtype(x=x, w=w)
    _check_channels(x.shape, w.shape, _W_LEGEND)
    N, H, W, C = x.shape
    KH, KW, _, M = w.shape
    out_pass = _pass_args("bias", bias, "act", act, C * M, x.dtype)
    in_pass = _in_pass_args(in_center, in_scale, in_bias, in_act, C, x.dtype)
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    ring, s2 = _use_3x3(KH, KW, sh, sw, g.ow), _use_3x3_s2(KH, KW, sh, sw, g.ow)
    if in_pass[2].size and not ((ring or s2) and M == 1):  # no input copy to fold the input pass into
        x, in_pass = _apply_in_pass(x, in_pass, in_act)
    y = np.empty((N, g.oh, g.ow, C * M), x.dtype)
    if ring:
        _forward3x3(y, _expand(x, M), _flat(w), g.pt, g.pl, _blocks(y), _buffered(y), *out_pass, *in_pass,
                    work=_work(y))
    elif s2:
        _forward3x3s2(y, _expand(x, M), _flat(w), g.pt, g.pl, _blocks(y), *out_pass, *in_pass, work=_work(y))
    else:
        _forward(y, _expand(x, M), _tiled(w, g.ow), sh, sw, g.pt, g.pl, *out_pass, work=_work(y))
    return y


def _pass_args(bias_name, bias, act_name, act, channels, dtype):
    """Validated (bias, lo, hi) of an output or input pass: an empty bias when there is none (no act, no bias),
    zeros for an activation alone."""
    if act not in ACTIVATIONS:
        raise ValueError(f"{act_name} must be one of None, 'relu', 'relu6', got {act!r}")
    if bias is not None:
        check_float_array(bias_name, bias, 1, f"({channels},)")
        check_shape(bias_name, bias, (channels,))
        if bias.dtype != dtype:
            raise TypeError(f"{bias_name} must have x's dtype {dtype}, got {bias.dtype}")
    elif act is None:
        return _NO_PASS[dtype.type]
    else:
        bias = np.zeros(channels, dtype)
    lo, hi = _BOUNDS[dtype.type][act]
    return np.ascontiguousarray(bias), lo, hi


def _in_pass_args(center, scale, bias, act, channels, dtype):
    """Validated (center, scale, shift, lo, hi) of an input pass: empty vectors when there is none (no act and no
    vector), zeros and ones for the vectors not given."""
    if center is None and scale is None and bias is None and act is None:
        return _NO_IN_PASS[dtype.type]
    vectors = []
    for name, v, fill in (("in_center", center, 0.0), ("in_scale", scale, 1.0)):
        if v is None:
            vectors.append(np.full(channels, fill, dtype))
            continue
        check_float_array(name, v, 1, f"({channels},)")
        check_shape(name, v, (channels,))
        if v.dtype != dtype:
            raise TypeError(f"{name} must have x's dtype {dtype}, got {v.dtype}")
        vectors.append(np.ascontiguousarray(v))
    shift, lo, hi = _pass_args("in_bias", bias, "in_act", act, channels, dtype)
    if shift.size == 0:  # no bias and no act, but a center or a scale
        shift = np.zeros(channels, dtype)
    return (*vectors, shift, lo, hi)


def _apply_in_pass(x, in_pass, act):
    """x with its input pass applied in a pass of its own (where no kernel copies the rows), and the empty pass."""
    return scale_act_forward(x, *in_pass[:3], act=act), _NO_IN_PASS[x.dtype.type]


def input_pass_is_free(kernel_size, stride, padding, in_shape, depth_multiplier=1):
    """Whether :func:`depthwise_forward` applies ``in_bias`` / ``in_act`` as it copies the input rows (the 3x3
    kernels, stride 1 or 2, on maps at least 4 columns wide, multiplier 1) rather than in a pass of its own.

    Args:
        kernel_size, stride, padding: the convolution's window, as for :func:`depthwise_forward`.
        in_shape: the per-sample input shape (H, W, C).
        depth_multiplier: M.
    """
    (KH, KW), (sh, sw), pad = normalize_window(kernel_size, stride, padding)
    g = conv_geometry(in_shape[0], in_shape[1], (KH, KW), (sh, sw), pad)
    return depth_multiplier == 1 and (_use_3x3(KH, KW, sh, sw, g.ow) or _use_3x3_s2(KH, KW, sh, sw, g.ow))


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
    return _input_gradient(dy, w, x_shape, g, sh, sw)


def _input_gradient(dy, w, x_shape, g, sh, sw):
    """:func:`depthwise_backward_input` on validated arguments; g, sh, sw the geometry and strides."""
    N, H, W, C = x_shape
    KH, KW, _, M = w.shape
    dx = np.empty((N, H, W, C * M), dy.dtype)  # (N, H, W, C*M): gradient of each repeated channel
    if _use_3x3(KH, KW, sh, sw, W):
        # Stride 1: dx[ih, iw] = sum_{kh, kw} dy[ih + pt - kh, iw + pl - kw] w[kh, kw] is a forward depthwise conv
        # of dy with the kernel flipped in both axes and padding 2 - pt, 2 - pl (dy rows outside [0, OH) are 0).
        _forward3x3(dx, np.ascontiguousarray(dy), _flat(w[::-1, ::-1]), 2 - g.pt, 2 - g.pl, _blocks(dy),
                    _buffered(dx), *_NO_PASS[dy.dtype.type], *_NO_IN_PASS[dy.dtype.type], work=_work(dy))
    else:
        _backward_input(dx, np.ascontiguousarray(dy), _tiled(w, g.ow), sh, sw, g.pt, g.pl, work=_work(dy))
    return dx if M == 1 else dx.reshape(N, H, W, C, M).sum(axis=4)  # (N, H, W, C)


def depthwise_backward(dy, x, w, *, stride=1, padding="valid", need_dx=True, in_center=None, in_scale=None,
                       in_bias=None, in_act=None):
    """Both gradients at once: what a layer's backward pass needs.

    Equal bit for bit to :func:`depthwise_backward_weight` and :func:`depthwise_backward_input`. Where the input
    gradient takes the stride-1 3x3 kernel and the map is large enough to run in parallel (``TINYCONV_PARALLEL_MIN``),
    one fused pass (:func:`_backward3x3`) computes both and reads dy once; smaller maps stay in cache between the two
    separate passes anyway.

    Args:
        dy: (N, OH, OW, C*M) upstream gradient, float32 or float64, any strides.
        x: (N, H, W, C) forward input, same dtype.
        w: (KH, KW, C, M), same dtype.
        stride, padding: as in the forward call.
        need_dx: False to skip the input gradient (the first layer of a network).
        in_center, in_scale, in_bias, in_act: the forward call's input pass, if it had one: x is then the pass's
            input, and the weight gradient applies the pass again as it copies x's rows (the blocked 3x3 kernels;
            elsewhere in a pass of its own). dx is the gradient with respect to the pass's output.

    Returns:
        (dx, dw): dx (N, H, W, C) or None when ``need_dx`` is False; dw (KH, KW, C, M); dy's dtype.
    """
    check_float_array("x", x, 4, "(N, H, W, C)")
    _check_w(w)
    _check_channels(x.shape, w.shape, _W_LEGEND)
    N, H, W, C = x.shape
    KH, KW, _, M = w.shape
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = normalize_window((KH, KW), stride, padding)[1]
    _check_dy(dy, (N, g.oh, g.ow, C * M), "(N, OH, OW, C*M)")
    check_same_dtype(dy=dy, x=x, w=w)
    in_pass = _in_pass_args(in_center, in_scale, in_bias, in_act, C, x.dtype)
    if in_pass[2].size and not (M == 1 and _use_weight3x3(KH, KW, sh, sw, W, g.ow, C)):
        x, in_pass = _apply_in_pass(x, in_pass, in_act)  # no row copy to apply it in
    if not (need_dx and M == 1 and _use_3x3(KH, KW, sh, sw, W) and _work(dy) >= _jit.PARALLEL_MIN_WORK):
        dw = _weight_gradient(dy, x, w.shape, g, sh, sw, in_pass)  # arguments validated once, above
        return (_input_gradient(dy, w, x.shape, g, sh, sw) if need_dx else None), dw
    partial, per_column = _weight_partials(N * g.oh, KH, KW, g.ow, C, dy.dtype, blocked=True)
    dx = np.empty(x.shape, dy.dtype)
    _backward3x3(dx, partial, np.ascontiguousarray(dy), np.ascontiguousarray(x), _flat(w[::-1, ::-1]), g.pt, g.pl,
                 _buffered(dx), *in_pass)
    return dx, _weight_sum(partial, w.shape, g.ow, per_column)


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
    return _weight_gradient(dy, x, w_shape, g, sh, sw, _NO_IN_PASS[dy.dtype.type])


def _weight_gradient(dy, x, w_shape, g, sh, sw, in_pass):
    """:func:`depthwise_backward_weight` on validated arguments; g, sh, sw the geometry and strides; in_pass the
    forward's input pass (:func:`_in_pass_args`), non-empty only where the blocked kernel applies it."""
    N = x.shape[0]
    KH, KW, C, M = w_shape
    blocked = _use_weight3x3(KH, KW, sh, sw, x.shape[2], g.ow, C * M)
    partial, per_column = _weight_partials(N * g.oh, KH, KW, g.ow, C * M, dy.dtype, blocked=blocked)
    if blocked:
        _weight3x3(partial, np.ascontiguousarray(dy), _expand(x, M), sh, g.pt, g.pl, *in_pass, work=_work(dy))
    else:
        _backward_weight(partial, np.ascontiguousarray(dy), _expand(x, M), sh, sw, g.pt, g.pl, per_column,
                         work=_work(dy))
    return _weight_sum(partial, (KH, KW, C, M), g.ow, per_column)


def _weight_partials(rows, KH, KW, OW, channels, dtype, blocked=False):
    """The blocks' accumulators for :func:`_backward_weight` over ``rows`` output rows, (B, KH, KW, L), and whether
    they are per channel (L = channels: the blocked 3x3 kernel, or from :data:`_MIN_CHANNELS_WEIGHT_COLS` on) or
    tiled along the row (L = OW*channels)."""
    per_column = blocked or channels >= _MIN_CHANNELS_WEIGHT_COLS
    return np.empty((min(_WEIGHT_BLOCKS, rows), KH, KW, (1 if per_column else OW) * channels), dtype), per_column


def _weight_sum(partial, w_shape, OW, per_column):
    """dw (KH, KW, C, M) from the blocks' partial sums (B, KH, KW, L) of :func:`_backward_weight`."""
    KH, KW, C, M = w_shape
    if per_column:
        return partial.sum(axis=0).reshape(KH, KW, C, M)
    return partial.sum(axis=0).reshape(KH, KW, OW, C, M).sum(axis=2)
