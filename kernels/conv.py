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
Without them, the forward of a 3x3 stride-2 conv on three channels (MobileNet's input layer at inference) on a
batch whose rows would not stay in cache skips im2col: :func:`_direct3x3s2`, a loop along the output columns.
"""
import numba
import numpy as np
from numba import prange

from ._check import check_float_array, check_same_dtype, check_shape
from ._jit import fast_kernel, kernel, parallel_kernel, sized_kernel
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


# --- the input layer's forward without im2col: 3x3, stride 2, three channels ---------------------------------------
# For a 3-channel input an im2col row is 27 values copied in three runs of nine, and the GEMM has 16-32 columns:
# both are slow for their size. This loop vectorizes along the output columns instead (rounds 12 and 19 had tried
# the output channels): each input row is split by column parity into one plane per (channel, parity), so that the
# tap (kw, c) of output columns ow .. ow + 15 is 16 consecutive values of one plane (padded column 2*ow + kw: plane
# kw % 2, position ow + kw // 2). For each output channel, one pass over the row sums all 27 taps in one expression.


@kernel(noalias=True)
def _split_row3(planes, o, xf, xb, W, P, pl):
    """planes[o + (2c + q)*P + j] = padded input row column 2j + q, channel c (3 channels): x's row at xf[xb:] is
    W columns of 3 values, and padded column t is input column t - pl; columns outside the input are 0."""
    u = np.uint64
    for c in range(3):
        for q in range(2):
            po = u(o + (2 * c + q) * P)
            lo = min(P, max(0, (pl - q + 1) // 2))  # the first j whose input column 2j + q - pl is >= 0
            hi = min(P, max(lo, (W - 1 + pl - q) // 2 + 1))  # one past the last whose column is < W
            for j in range(u(0), u(lo)):
                planes[po + j] = 0.0
            for j in range(u(hi), u(P)):
                planes[po + j] = 0.0
            s0 = u(xb + (2 * lo + q - pl) * 3 + c)
            for j in range(u(hi - lo)):
                planes[po + u(lo) + j] = xf[s0 + j * u(6)]


@fast_kernel(noalias=True)
def _direct_row3(acc, planes, a, b, d, wt, K, OW, P):
    """acc[k*OW + ow] = the 3x3 stride-2 sum of output column ow, channel k, from the split rows at offsets a, b, d
    of planes (input rows kh = 0, 1, 2, as :func:`_split_row3` lays them out); wt: (K*27,) weights, entry
    k*27 + (kh*3 + kw)*3 + c."""
    u = np.uint64
    P2 = 2 * P
    # each (row, channel): its even plane e (taps kw = 0 at j and kw = 2 at j + 1) and its odd plane (kw = 1)
    e0, e1, e2 = u(a), u(a + P2), u(a + 2 * P2)
    e3, e4, e5 = u(b), u(b + P2), u(b + 2 * P2)
    e6, e7, e8 = u(d), u(d + P2), u(d + 2 * P2)
    Pu, one = u(P), u(1)  # unsigned throughout: a signed index is checked for wraparound, and gathered
    for k in range(K):
        t = k * 27
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = (wt[t], wt[t + 1], wt[t + 2], wt[t + 3], wt[t + 4], wt[t + 5],
                                              wt[t + 6], wt[t + 7], wt[t + 8])
        v0, v1, v2, v3, v4, v5, v6, v7, v8 = (wt[t + 9], wt[t + 10], wt[t + 11], wt[t + 12], wt[t + 13],
                                              wt[t + 14], wt[t + 15], wt[t + 16], wt[t + 17])
        z0, z1, z2, z3, z4, z5, z6, z7, z8 = (wt[t + 18], wt[t + 19], wt[t + 20], wt[t + 21], wt[t + 22],
                                              wt[t + 23], wt[t + 24], wt[t + 25], wt[t + 26])
        ab = u(k * OW)
        for j in range(u(OW)):
            acc[ab + j] = (
                (w0 * planes[e0 + j] + w1 * planes[e1 + j] + w2 * planes[e2 + j]
                 + w3 * planes[e0 + Pu + j] + w4 * planes[e1 + Pu + j] + w5 * planes[e2 + Pu + j]
                 + w6 * planes[e0 + one + j] + w7 * planes[e1 + one + j] + w8 * planes[e2 + one + j])
                + (v0 * planes[e3 + j] + v1 * planes[e4 + j] + v2 * planes[e5 + j]
                   + v3 * planes[e3 + Pu + j] + v4 * planes[e4 + Pu + j] + v5 * planes[e5 + Pu + j]
                   + v6 * planes[e3 + one + j] + v7 * planes[e4 + one + j] + v8 * planes[e5 + one + j])
                + (z0 * planes[e6 + j] + z1 * planes[e7 + j] + z2 * planes[e8 + j]
                   + z3 * planes[e6 + Pu + j] + z4 * planes[e7 + Pu + j] + z5 * planes[e8 + Pu + j]
                   + z6 * planes[e6 + one + j] + z7 * planes[e7 + one + j] + z8 * planes[e8 + one + j]))


@kernel(noalias=True)
def _store_kmajor(yf, yb, acc, K, OW):
    """yf[yb + ow*K + k] = acc[k*OW + ow]: a row computed channel by channel, stored as NHWC."""
    u = np.uint64
    Ku, OWu = u(K), u(OW)
    for ow in range(OWu):
        o = u(yb) + ow * Ku
        for k in range(Ku):
            yf[o + k] = acc[k * OWu + ow]


@kernel(noalias=True)
def _direct_rows(yf, xf, wt, pt, pl, N, H, W, OH, OW, K, r0, r1):
    """Output rows r0 .. r1 - 1 (of N*OH) of :func:`_direct3x3s2`, with a ring of the last three split input rows
    (an input row is read by two output rows) and a buffer for one output row's sums."""
    P = OW + 1  # positions per plane: output column ow reads j = ow and ow + 1
    S = 6 * P  # one split row: 3 channels x 2 parities
    ring = np.zeros(3 * S, yf.dtype)
    held = np.full(3, -1, np.int64)
    acc = np.empty(K * OW, yf.dtype)
    for r in range(r0, r1):
        n = r // OH
        ih0 = (r - n * OH) * 2 - pt  # >= -2: pt <= 2 for a 3x3 window
        for ih in range(ih0, ih0 + 3):
            slot = (ih + 3) % 3
            key = n * H + ih if 0 <= ih < H else -1
            if held[slot] != key:
                if key < 0:
                    for j in range(slot * S, (slot + 1) * S):
                        ring[j] = 0.0
                else:
                    _split_row3(ring, slot * S, xf, key * W * 3, W, P, pl)
                held[slot] = key
        _direct_row3(acc, ring, ((ih0 + 3) % 3) * S, ((ih0 + 4) % 3) * S, ((ih0 + 5) % 3) * S, wt, K, OW, P)
        _store_kmajor(yf, r * OW * K, acc, K, OW)


@parallel_kernel(noalias=True)
def _direct3x3s2(y, x, wt, pt, pl, blocks):
    """y = the 3x3 stride-2 conv of x (N, H, W, 3), y (N, OH, OW, K) written entirely; wt as in
    :func:`_direct_row3`. Output rows are split into ``blocks`` runs (:func:`_direct_rows`). Compiled parallel
    only, around a serial body that compiles once: it serves large batches (see :func:`_use_direct`); on one
    thread it runs as one block."""
    N, OH, OW, K = y.shape
    H, W = x.shape[1], x.shape[2]
    yf, xf = y.reshape(-1), x.reshape(-1)
    rows = N * OH
    for blk in prange(blocks):
        _direct_rows(yf, xf, wt, pt, pl, N, H, W, OH, OW, K, blk * rows // blocks, (blk + 1) * rows // blocks)


# The direct loop serves batches whose im2col rows would take at least this many bytes. Folded MobileNet inference,
# the same model alternating between the two paths in one process (round 20, 2 threads): alpha 0.5 res 128 batch
# 32 (14 MB of rows) 1.044-1.10x, alpha 1.0 1.008-1.015x; below, the two measurements disagree: alpha 0.5 batch 8
# (3.5 MB) 1.02-1.05x and res 224 batch 2 (2.7 MB) 1.02-1.04x in the forward, but the layer alone, called over and
# over on one batch that stays in cache, 0.76-0.84x and 0.85-0.95x (at batch 32: 1.09-1.68x); batch 2 at res 128
# 0.92-0.93x and one image at res 224 0.96-0.97x in the forward. So only from 8 MiB, where both agree.
_DIRECT_MIN_BYTES = 1 << 23


def _use_direct(w_shape, stride, g, rows_bytes):
    """Whether :func:`conv2d_forward`, given no im2col rows, takes :func:`_direct3x3s2`: a 3x3 window at stride 2
    on three channels, padding at most 2 on each side, and a batch whose rows would take ``rows_bytes`` >=
    ``_DIRECT_MIN_BYTES``."""
    return (rows_bytes >= _DIRECT_MIN_BYTES and tuple(w_shape[:3]) == (3, 3, 3) and tuple(stride) == (2, 2)
            and 0 <= g.pt <= 2 and 0 <= g.pl <= 2)


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
            images at a time, see ``_CHUNK_BYTES``; or not at all for a large batch through a 3x3 stride-2 window
            on three channels, see ``_use_direct``).

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
    row_bytes = g.oh * g.ow * KH * KW * C * x.dtype.itemsize  # one image's im2col rows
    images = _images_per_chunk(N, row_bytes) if cols is None else N
    if cols is None and _use_direct(w.shape, normalize_window((KH, KW), stride, padding)[1], g, N * row_bytes):
        wt = np.ascontiguousarray(w2d.T).reshape(-1)  # (K*27,): each output channel's 27 taps together
        _direct3x3s2(y, np.ascontiguousarray(x), wt, g.pt, g.pl, numba.get_num_threads())
    elif images < N:  # rows for a few images at a time, each chunk multiplied while its rows are in cache
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
