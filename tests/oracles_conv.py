"""Naive oracles for the conv kernels (conv2d, depthwise, pointwise), plus the shared test draws and torch reference.

The oracles are written from the definitions, independently of kernels/: they pad with np.pad, loop over output
pixels in Python and contract one receptive field at a time with einsum, always in float64. Only the output size
and padding come from geometry.conv_geometry, the project's single definition of them.

    conv2d     y[n, oh, ow, k]       = b[k] + sum_{kh, kw, c} xp[n, oh*sh + kh, ow*sw + kw, c] w[kh, kw, c, k]
    depthwise  y[n, oh, ow, c*M + m] =        sum_{kh, kw}    xp[n, oh*sh + kh, ow*sw + kw, c] w[kh, kw, c, m]
    pointwise  y[n, h, w, k]         = b[k] + sum_c           x[n, h, w, c] w[c, k]
where xp is x zero-padded by (pt, pb, pl, pr).
"""
import contextlib

import numba
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from kernels.geometry import conv_geometry


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _padded(x, g):
    return np.pad(np.asarray(x, np.float64), ((0, 0), (g.pt, g.pb), (g.pl, g.pr), (0, 0)))


def _windows(x_shape, w_shape, stride, padding):
    """Geometry plus, per output pixel, the slices of the padded input it reads."""
    N, H, W, _ = x_shape
    KH, KW = w_shape[0], w_shape[1]
    g = conv_geometry(H, W, (KH, KW), stride, padding)
    sh, sw = _pair(stride)
    cells = [(oh, ow, slice(oh * sh, oh * sh + KH), slice(ow * sw, ow * sw + KW))
             for oh in range(g.oh) for ow in range(g.ow)]
    return g, cells


def _crop(xp, g, x_shape):
    return xp[:, g.pt:g.pt + x_shape[1], g.pl:g.pl + x_shape[2], :]


# ---- standard convolution, w (KH, KW, C, K) ----

def im2col(x, w_shape, stride=1, padding="valid"):
    """Each output pixel's receptive field as one row (kh, kw, c order): (N*OH*OW, KH*KW*C), float64."""
    g, cells = _windows(x.shape, w_shape, stride, padding)
    xp = _padded(x, g)
    rows = [xp[n, r, c, :].reshape(-1) for n in range(x.shape[0]) for _, _, r, c in cells]
    return np.array(rows).reshape(x.shape[0] * g.oh * g.ow, w_shape[0] * w_shape[1] * x.shape[3])


def conv2d_forward(x, w, b=None, stride=1, padding="valid"):
    g, cells = _windows(x.shape, w.shape, stride, padding)
    xp = _padded(x, g)
    y = np.zeros((x.shape[0], g.oh, g.ow, w.shape[3]))
    for oh, ow, rows, cols in cells:
        y[:, oh, ow, :] = np.einsum("nhwc,hwck->nk", xp[:, rows, cols, :], w)
    return y if b is None else y + b


def conv2d_backward_input(dy, w, x_shape, stride=1, padding="valid"):
    g, cells = _windows(x_shape, w.shape, stride, padding)
    dxp = _padded(np.zeros(x_shape), g)
    for oh, ow, rows, cols in cells:
        dxp[:, rows, cols, :] += np.einsum("nk,hwck->nhwc", dy[:, oh, ow, :], w)
    return _crop(dxp, g, x_shape)


def conv2d_backward_weight(dy, x, w_shape, stride=1, padding="valid"):
    g, cells = _windows(x.shape, w_shape, stride, padding)
    xp = _padded(x, g)
    dw = np.zeros(w_shape)
    for oh, ow, rows, cols in cells:
        dw += np.einsum("nhwc,nk->hwck", xp[:, rows, cols, :], dy[:, oh, ow, :])
    return dw


def conv2d_backward_bias(dy):
    db = np.zeros(dy.shape[3])
    for n in range(dy.shape[0]):
        db += dy[n].sum(axis=(0, 1))
    return db


# ---- depthwise convolution, w (KH, KW, C, M), output channel c*M + m ----

def depthwise_forward(x, w, stride=1, padding="valid"):
    g, cells = _windows(x.shape, w.shape, stride, padding)
    xp = _padded(x, g)
    N, C, M = x.shape[0], w.shape[2], w.shape[3]
    y = np.zeros((N, g.oh, g.ow, C * M))
    for oh, ow, rows, cols in cells:
        y[:, oh, ow, :] = np.einsum("nhwc,hwcm->ncm", xp[:, rows, cols, :], w).reshape(N, C * M)
    return y


def depthwise_backward_input(dy, w, x_shape, stride=1, padding="valid"):
    g, cells = _windows(x_shape, w.shape, stride, padding)
    dxp = _padded(np.zeros(x_shape), g)
    N, C, M = x_shape[0], w.shape[2], w.shape[3]
    for oh, ow, rows, cols in cells:
        dxp[:, rows, cols, :] += np.einsum("ncm,hwcm->nhwc", dy[:, oh, ow, :].reshape(N, C, M), w)
    return _crop(dxp, g, x_shape)


def depthwise_backward_weight(dy, x, w_shape, stride=1, padding="valid"):
    g, cells = _windows(x.shape, w_shape, stride, padding)
    xp = _padded(x, g)
    N, C, M = x.shape[0], w_shape[2], w_shape[3]
    dw = np.zeros(w_shape)
    for oh, ow, rows, cols in cells:
        dw += np.einsum("nhwc,ncm->hwcm", xp[:, rows, cols, :], dy[:, oh, ow, :].reshape(N, C, M))
    return dw


# ---- pointwise (1x1) convolution, w (C, K) ----

def pointwise_forward(x, w, b=None):
    N, H, W, _ = x.shape
    y = np.zeros((N, H, W, w.shape[1]))
    for i in range(H):
        for j in range(W):
            y[:, i, j, :] = np.einsum("nc,ck->nk", x[:, i, j, :], w)
    return y if b is None else y + b


def pointwise_backward_input(dy, w):
    N, H, W, _ = dy.shape
    dx = np.zeros((N, H, W, w.shape[0]))
    for i in range(H):
        for j in range(W):
            dx[:, i, j, :] = np.einsum("nk,ck->nc", dy[:, i, j, :], w)
    return dx


def pointwise_backward_weight(dy, x):
    dw = np.zeros((x.shape[3], dy.shape[3]))
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            dw += np.einsum("nc,nk->ck", x[:, i, j, :], dy[:, i, j, :])
    return dw


# ---- shared test inputs ----

LAYOUTS = ("contiguous", "strided", "transposed")


def make_array(rng, shape, layout="contiguous"):
    """Standard normal float64 array of ``shape``, contiguous or a non-contiguous view of a bigger array."""
    if layout == "contiguous":
        return rng.standard_normal(shape)
    if layout == "strided":  # every other element along the last axis
        return rng.standard_normal(tuple(shape[:-1]) + (2 * shape[-1],))[..., ::2]
    return rng.standard_normal(tuple(reversed(shape))).T  # Fortran order: every axis strided


@contextlib.contextmanager
def one_numba_thread():
    """Run parallel kernels on the calling thread only, for the hundreds of tiny calls a finite-difference check
    makes: waking a worker per call costs more than the call, and far more when other processes load the CPU.
    The oracle comparisons run with every thread, so the parallel split is still tested."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


@st.composite
def window_cases(draw, depthwise=False):
    """A conv geometry the kernels must accept: dict of N, H, W, C, K (or M), KH, KW, stride, padding, seed, layout."""
    case = dict(
        N=draw(st.integers(1, 4)), H=draw(st.integers(1, 12)), W=draw(st.integers(1, 12)),
        C=draw(st.integers(1, 8)), KH=draw(st.integers(1, 5)), KW=draw(st.integers(1, 5)),
        stride=draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))),
        padding=draw(st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 2),
                               st.tuples(st.integers(0, 2), st.integers(0, 2)))),
        seed=draw(st.integers(0, 2 ** 32 - 1)), layout=draw(st.sampled_from(LAYOUTS)))
    case["M" if depthwise else "K"] = draw(st.integers(1, 3) if depthwise else st.integers(1, 8))
    try:
        conv_geometry(case["H"], case["W"], (case["KH"], case["KW"]), case["stride"], case["padding"])
    except ValueError:
        assume(False)  # kernel larger than the padded input: rejected, tested as bad input instead
    return case


def torch_conv(x, w_oihw, b, dy, stride, padding, groups):
    """PyTorch's float64 conv2d on NHWC arrays with TF-style padding; returns y, dx, dw (OIHW), db (NHWC order).

    Asymmetric 'same' padding has no conv2d argument, so the input is padded with F.pad first. Torch runs on one
    thread: these tensors are tiny, and its idle worker threads would spin against Numba's and BLAS's.
    """
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _torch_conv(torch, F, x, w_oihw, b, dy, stride, padding, groups)
    finally:
        torch.set_num_threads(threads)


def _torch_conv(torch, F, x, w_oihw, b, dy, stride, padding, groups):
    g = conv_geometry(x.shape[1], x.shape[2], w_oihw.shape[2:], stride, padding)
    xt = torch.tensor(np.ascontiguousarray(x)).permute(0, 3, 1, 2).requires_grad_()  # (N, C, H, W)
    wt = torch.tensor(np.ascontiguousarray(w_oihw)).requires_grad_()
    bt = None if b is None else torch.tensor(b).requires_grad_()
    y = F.conv2d(F.pad(xt, (g.pl, g.pr, g.pt, g.pb)), wt, bt, stride=_pair(stride), groups=groups)
    y.backward(torch.tensor(np.ascontiguousarray(dy)).permute(0, 3, 1, 2))

    def to_nhwc(t):
        return t.detach().permute(0, 2, 3, 1).numpy()

    return to_nhwc(y), to_nhwc(xt.grad), wt.grad.numpy(), None if b is None else bt.grad.numpy()
