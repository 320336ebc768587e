"""Parameter updates of the optimizers, one pass per parameter array.

Shape legend: every array is a parameter flattened to (P,): p the parameter, g its gradient, buf its momentum
buffer, all the same dtype and C-contiguous. Scalars (wd, mu, lr, lr * mu) come in the parameters' dtype.

A NumPy update makes eight passes over small arrays (about a microsecond each, for ~85 arrays per MobileNet step);
one loop per array does the same arithmetic in the same order, each operation rounded to the dtype as NumPy
rounds it (no FMA contraction), so the result is bitwise that of ``tinyconv.optim.SGD``'s NumPy formula.
"""
import numba

from ._jit import sized_kernel


@sized_kernel
def _sgd_kernel(p, g, buf, wd, mu, lr, lr_mu, nesterov):
    """t = p * wd + g;  buf = buf * mu + t;  p = (p - t * lr) - buf * lr_mu (Nesterov) or p - buf * lr."""
    for i in numba.prange(p.shape[0]):
        t = p[i] * wd + g[i]
        b = buf[i] * mu + t
        buf[i] = b
        if nesterov:
            p[i] = (p[i] - t * lr) - b * lr_mu
        else:
            p[i] = p[i] - b * lr


def sgd_update(p, g, buf, *, lr, momentum, weight_decay, nesterov):
    """One SGD step with momentum (torch.optim.SGD, dampening 0), in place on ``p`` and ``buf``.

    Args:
        p, g, buf: parameter, gradient and momentum buffer: same shape, same float dtype, C-contiguous.
        lr, momentum, weight_decay: Python floats, rounded to p's dtype as NumPy rounds a scalar operand.
        nesterov: Nesterov momentum if true.
    """
    if not (p.shape == g.shape == buf.shape and p.dtype == g.dtype == buf.dtype):
        raise ValueError(f"p, g and buf must share shape and dtype, got {p.shape} {p.dtype}, {g.shape} {g.dtype}, "
                         f"{buf.shape} {buf.dtype}")
    if not (p.flags.c_contiguous and g.flags.c_contiguous and buf.flags.c_contiguous):
        raise ValueError("p, g and buf must be C-contiguous")
    t = p.dtype.type
    _sgd_kernel(p.reshape(-1), g.reshape(-1), buf.reshape(-1), t(weight_decay), t(momentum), t(lr),
                t(lr * momentum), bool(nesterov), work=p.size)
