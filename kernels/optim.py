"""Parameter updates of the optimizers: one pass over a parameter array, or over every parameter of a model at once.

Shape legend: every array is flat, (P,): p the parameters, g their gradients, buf the momentum buffers, all the
same dtype and C-contiguous. The update runs over pieces [starts[s], stops[s]) of them, piece s with weight decay
wds[s] (weight decay differs between parameters: kernels decay, biases and batch-norm vectors do not). Scalars
(mu, lr, lr * mu) and wds come in the parameters' dtype.

A NumPy update makes eight passes over small arrays (about a microsecond each, for ~85 arrays per MobileNet step);
one loop does the same arithmetic in the same order, each operation rounded to the dtype as NumPy rounds it (no
FMA contraction), so the result is bitwise that of ``tinyconv.optim.SGD``'s NumPy formula. When a model keeps its
parameters and gradients end to end in one flat array each (``tinyconv.Sequential`` does), one call updates all of
them: measured on the 2-core machine inside training steps, 1.35 against 1.84 ms for one call per array
(Fashion-MNIST, 823,434 values in 83 arrays), 2.29 against 2.92 ms (MobileNet 1.0 res 128, 4.2 M values). With
the loop vectorized (unsigned index, see :func:`_sgd_kernel`) the whole-model step in training steps takes
0.45-0.47 ms (Fashion-MNIST), 0.80 ms (MobileNet 0.5 res 128) and 1.83 ms (1.0 res 128), against 0.98-1.13, 1.47
and 3.63 ms before.
"""
import numba
import numpy as np

from ._jit import sized_kernel

PIECE = 1 << 15  # values per piece: the unit the threads share, small enough to balance two to sixteen threads


@sized_kernel
def _sgd_kernel(p, g, buf, starts, stops, wds, mu, lr, lr_mu, nesterov):
    """Over each piece s: t = p * wds[s] + g;  buf = buf * mu + t;  p = (p - t * lr) - buf * lr_mu (Nesterov) or
    p - buf * lr. Pieces are disjoint, so each prange iteration owns its values.

    The index is unsigned: from a signed start Numba guards every p[i] with a negative-index wraparound, which
    keeps LLVM from vectorizing the loop (0.50 ms against 0.09 ms for 823,434 float32 values in cache, one thread;
    the same bits, the arithmetic per value does not change)."""
    u = np.uint64
    for s in numba.prange(starts.shape[0]):
        wd = wds[s]
        for i in range(u(starts[s]), u(stops[s])):
            t = p[i] * wd + g[i]
            b = buf[i] * mu + t
            buf[i] = b
            if nesterov:
                p[i] = (p[i] - t * lr) - b * lr_mu
            else:
                p[i] = p[i] - b * lr


def pieces(sizes, weight_decays, dtype, piece=PIECE):
    """The pieces of parameters laid end to end: arrays of ``sizes`` values with ``weight_decays``, each cut into
    runs of at most ``piece`` values.

    Returns:
        (starts, stops, wds): int64, int64 and ``dtype`` arrays, one entry per piece.
    """
    starts, stops, wds = [], [], []
    offset = 0
    for size, wd in zip(sizes, weight_decays):
        for lo in range(offset, offset + size, piece):
            starts.append(lo)
            stops.append(min(lo + piece, offset + size))
            wds.append(wd)
        offset += size
    return np.array(starts, np.int64), np.array(stops, np.int64), np.array(wds, dtype=dtype)


def sgd_update(p, g, buf, *, lr, momentum, weight_decay, nesterov, layout=None):
    """One SGD step with momentum (torch.optim.SGD, dampening 0), in place on ``p`` and ``buf``.

    Args:
        p, g, buf: parameter, gradient and momentum buffer: same shape, same float dtype, C-contiguous.
        lr, momentum: Python floats, rounded to p's dtype as NumPy rounds a scalar operand.
        weight_decay: a Python float for the whole array; ignored when ``layout`` is given.
        nesterov: Nesterov momentum if true.
        layout: (starts, stops, wds) from :func:`pieces` when p holds several parameters end to end with their
            own weight decays; default: p is one parameter.
    """
    if not (p.shape == g.shape == buf.shape and p.dtype == g.dtype == buf.dtype):
        raise ValueError(f"p, g and buf must share shape and dtype, got {p.shape} {p.dtype}, {g.shape} {g.dtype}, "
                         f"{buf.shape} {buf.dtype}")
    if not (p.flags.c_contiguous and g.flags.c_contiguous and buf.flags.c_contiguous):
        raise ValueError("p, g and buf must be C-contiguous")
    if layout is None:
        layout = pieces((p.size,), (weight_decay,), p.dtype)
    starts, stops, wds = layout
    if not (wds.dtype == p.dtype and starts.dtype == stops.dtype == np.int64 and starts.ndim == 1
            and starts.shape == stops.shape == wds.shape
            and (starts.size == 0 or (starts.min() >= 0 and stops.max() <= p.size and (stops >= starts).all()))):
        raise ValueError(f"layout does not fit {p.size} {p.dtype} values; build it with kernels.optim.pieces")
    sgd_update_unchecked(p, g, buf, layout, lr=lr, momentum=momentum, nesterov=nesterov)


def sgd_update_unchecked(p, g, buf, layout, *, lr, momentum, nesterov):
    """:func:`sgd_update` without its checks, for callers that made the arrays and the layout themselves and
    checked them once (``tinyconv.optim.SGD``): ~85 calls a step where a model's parameters are not laid end to
    end, so the checks would cost as much as the updates of its small arrays."""
    t = p.dtype.type
    starts, stops, wds = layout
    _sgd_kernel(p.reshape(-1), g.reshape(-1), buf.reshape(-1), starts, stops, wds, t(momentum), t(lr),
                t(lr * momentum), bool(nesterov), work=p.size)
