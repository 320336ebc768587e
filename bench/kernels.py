"""Every kernel, forward and each backward, at MobileNet's shapes, next to PyTorch's CPU path (and NumPy's BLAS).

    .venv/bin/python -m bench.kernels                    # both workloads, writes bench/results/kernels.md
    .venv/bin/python -m bench.kernels --quick            # the small workload, 3 repeats: a smoke run
    .venv/bin/python -m bench.kernels --case depthwise   # only rows whose label contains 'depthwise'

Workloads (the shapes come from the model itself, ``Sequential.layer_shapes``, one row per distinct shape):
    mobilenet-1.0-128-b32   MobileNet 1.0, 128x128x3, batch 32 (the ImageNet-style case);
    fmnist-0.5-32-b128      MobileNet 0.5, 32x32x1, batch 128, 10 classes (``tinyconv.train``'s default).

For each row: validate our result against PyTorch's at that very shape (relative max error, float32 tolerances),
then time ours and PyTorch's in both layouts (NCHW and channels_last; the best is taken) with the repeats
interleaved, and report medians. Conv-like rows turn time into GFLOP/s with the layers' analytic mult-adds
(``Layer.macs``; each backward does as many as the forward); memory-bound rows report GB/s of their compulsory
traffic (every input read once, every output written once). Pointwise rows are also timed as bare NumPy GEMMs
with preallocated outputs: the floor a 1x1 conv on BLAS can reach. PyTorch's strided convs get an input already
padded TensorFlow's way, so their pad copy is not timed (PyTorch at its best). Both engines run on 2 threads.
"""
if __name__ == "__main__":
    from bench._harness import reexec_for_benchmark
    reexec_for_benchmark("bench.kernels")

import sys
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from bench import _harness as h

MODULE = "bench.kernels"
DEFAULT_OUT = "bench/results/kernels.md"
DEFAULT_REPEATS = 5


class Workload(NamedTuple):
    """A model configuration and batch whose layer shapes are benchmarked."""
    name: str
    alpha: float
    resolution: int
    batch: int
    in_channels: int
    classes: int
    dropout: float
    label_smoothing: float


WORKLOADS = (
    Workload("mobilenet-1.0-128-b32", 1.0, 128, 32, 3, 1000, 1e-3, 0.0),
    Workload("fmnist-0.5-32-b128", 0.5, 32, 128, 1, 10, 0.2, 0.1),
)


class Op(NamedTuple):
    """One timed row: our call and PyTorch's, with how to validate and how to count.

    Attributes:
        workload, family, op, shape: labels ('depthwise', 'backward weight', '32x64x64x32 s1').
        layers: names of the model's layers with this shape (the count weights per-step totals).
        ours: zero-argument callable running our kernel.
        torch: dict layout -> zero-argument callable running PyTorch's equivalent.
        check: zero-argument callable returning (ours, reference) arrays to compare, or a list of such pairs.
        tol: largest accepted relative max error.
        flops: analytic FLOPs (2 x mult-adds) of the call, or None for memory-bound ops.
        bytes: compulsory traffic of the call in bytes (inputs read once, outputs written once).
        gemm: bare NumPy GEMM(s) doing the same products (pointwise rows), or None.
    """
    workload: str
    family: str
    op: str
    shape: str
    layers: tuple
    ours: Callable
    torch: dict
    check: Callable
    tol: float
    flops: Optional[float]
    bytes: float
    gemm: Optional[Callable] = None

    @property
    def label(self):
        return f"{self.workload} {self.family} {self.op} {self.shape}"


def _nbytes(*arrays):
    return float(sum(a.size * a.itemsize for a in arrays))


def _nchw(torch, a):
    """NHWC numpy array -> (NCHW contiguous tensor, channels_last tensor) holding the same values."""
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW
    return {"NCHW": t.contiguous(), "channels_last": t.contiguous(memory_format=torch.channels_last)}


def _nhwc(t):
    """torch NCHW-shaped tensor (any memory format) -> NHWC numpy array."""
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def _conv_ops(torch, wl, family, layer, x_shape, layer_names, rng):
    """Forward, backward input and backward weight of a standard, depthwise or pointwise conv layer."""
    from kernels import conv as conv_k
    from kernels import depthwise as dw_k
    from kernels import pointwise as pw_k
    from kernels.geometry import conv_geometry
    aten = torch.ops.aten
    n = wl.batch
    hh, ww, c = x_shape
    x = rng.standard_normal((n, hh, ww, c), dtype=np.float32)
    out_shape = layer.output_shape(x_shape)
    dy = rng.standard_normal((n, *out_shape), dtype=np.float32)
    macs = float(layer.macs(x_shape) * n)
    if family == "pointwise":
        w = layer.params["kernel"]  # (C, K)
        wt = torch.from_numpy(w.T.copy())[:, :, None, None]  # (K, C, 1, 1)
        stride, groups, pads, kernel = (1, 1), 1, None, (1, 1)
        fwd = lambda: pw_k.pointwise_forward(x, w)  # noqa: E731
        bwd_in = lambda: pw_k.pointwise_backward_input(dy, w)  # noqa: E731
        bwd_w = lambda: pw_k.pointwise_backward_weight(dy, x)  # noqa: E731
    else:
        stride, padding = layer.stride, layer.padding
        kernel = layer.kernel_size
        g = conv_geometry(hh, ww, kernel, stride, padding)
        pads = (g.pl, g.pr, g.pt, g.pb)
        if family == "depthwise":
            w = layer.params["depthwise_kernel"]  # (KH, KW, C, 1)
            wt = torch.from_numpy(w[:, :, :, 0].transpose(2, 0, 1).copy())[:, None]  # (C, 1, KH, KW)
            groups = c
            fwd = lambda: dw_k.depthwise_forward(x, w, stride=stride, padding=padding)  # noqa: E731
            bwd_in = lambda: dw_k.depthwise_backward_input(dy, w, x.shape, stride=stride, padding=padding)  # noqa
            bwd_w = lambda: dw_k.depthwise_backward_weight(dy, x, w.shape, stride=stride, padding=padding)  # noqa
        else:
            w = layer.params["kernel"]  # (KH, KW, C, K)
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())  # (K, C, KH, KW)
            groups = 1
            fwd = lambda: conv_k.conv2d_forward(x, w, stride=stride, padding=padding)  # noqa: E731
            bwd_in = lambda: conv_k.conv2d_backward_input(dy, w, x.shape, stride=stride, padding=padding)  # noqa
            bwd_w = lambda: conv_k.conv2d_backward_weight(dy, x, w.shape, stride=stride, padding=padding)  # noqa
    # PyTorch's input: symmetric padding goes inside the conv; TensorFlow's asymmetric 'same' is applied up front.
    if pads is None or (pads[0] == pads[1] and pads[2] == pads[3]):
        conv_pad = [0, 0] if pads is None else [pads[2], pads[0]]
        xs = _nchw(torch, x)
        crop = None
    else:
        conv_pad = [0, 0]
        xp = np.pad(x, ((0, 0), (pads[2], pads[3]), (pads[0], pads[1]), (0, 0)))
        xs = _nchw(torch, xp)
        crop = (pads[2], pads[0])
    dys = _nchw(torch, dy)
    wts = {"NCHW": wt.contiguous(), "channels_last": wt.contiguous(memory_format=torch.channels_last)}

    def t_fwd(lay):
        return lambda: torch.nn.functional.conv2d(xs[lay], wts[lay], stride=stride, padding=conv_pad, groups=groups)

    def t_bwd(lay, mask):
        return lambda: aten.convolution_backward(dys[lay], xs[lay], wts[lay], None, list(stride), conv_pad, [1, 1],
                                                 False, [0, 0], groups, mask)

    def torch_dx(res):
        dx = _nhwc(res[0])
        return dx if crop is None else dx[:, crop[0]:crop[0] + hh, crop[1]:crop[1] + ww]

    def torch_dw(res):
        d = res[1]
        if family == "pointwise":
            return d[:, :, 0, 0].T.numpy()
        if family == "depthwise":
            return d[:, 0].permute(1, 2, 0).unsqueeze(-1).numpy()
        return d.permute(2, 3, 1, 0).numpy()

    layouts = ("NCHW", "channels_last")
    shape = (f"{n}x{hh}x{ww}x{c}" + (f"->{out_shape[2]}" if family != "depthwise" else "")
             + (f" k{kernel[0]}" if family == "conv" else "") + (f" s{stride[0]}" if family != "pointwise" else ""))
    y_bytes = 4.0 * n * np.prod(out_shape)
    common = dict(workload=wl.name, family=family, shape=shape, layers=layer_names, flops=2 * macs)
    ops = [
        Op(op="forward", ours=fwd, torch={lay: t_fwd(lay) for lay in layouts},
           check=lambda: [(fwd(), _nhwc(t_fwd(lay)())) for lay in layouts], tol=1e-4,
           bytes=_nbytes(x, w) + y_bytes, **common),
        Op(op="backward input", ours=bwd_in, torch={lay: t_bwd(lay, [True, False, False]) for lay in layouts},
           check=lambda: [(bwd_in(), torch_dx(t_bwd(lay, [True, False, False])())) for lay in layouts],
           tol=1e-4, bytes=_nbytes(dy, w, x), **common),
        Op(op="backward weight", ours=bwd_w, torch={lay: t_bwd(lay, [False, True, False]) for lay in layouts},
           check=lambda: [(bwd_w(), torch_dw(t_bwd(lay, [False, True, False])())) for lay in layouts],
           tol=1e-3, bytes=_nbytes(dy, x, w), **common),
    ]
    if family == "pointwise":
        x2d = x.reshape(-1, c)  # (NHW, C)
        dy2d = dy.reshape(-1, w.shape[1])  # (NHW, K)
        y_buf = np.empty((x2d.shape[0], w.shape[1]), np.float32)
        dx_buf = np.empty_like(x2d)
        dw_buf = np.empty_like(w)
        gemms = (lambda: np.matmul(x2d, w, out=y_buf), lambda: np.matmul(dy2d, w.T, out=dx_buf),
                 lambda: np.matmul(x2d.T, dy2d, out=dw_buf))
        ops = [o._replace(gemm=gm) for o, gm in zip(ops, gemms)]
    return ops


def _batchnorm_ops(torch, wl, layer, x_shape, layer_names, rng):
    from kernels import batchnorm as bn_k
    n = wl.batch
    c = x_shape[-1]
    x = (rng.standard_normal((n, *x_shape), dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    eps, mom = layer.eps, layer.momentum
    _, x_hat, inv_std = bn_k.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy(), momentum=mom, eps=eps)
    xs, dys = _nchw(torch, x), _nchw(torch, dy)
    tg, tb = torch.from_numpy(gamma), torch.from_numpy(beta)
    trm, trv = torch.zeros(c), torch.ones(c)
    saved = {lay: torch.native_batch_norm(xs[lay], tg, tb, trm.clone(), trv.clone(), True, 1 - mom, eps)
             for lay in xs}
    aten = torch.ops.aten

    def t_train(lay):
        return lambda: torch.native_batch_norm(xs[lay], tg, tb, trm, trv, True, 1 - mom, eps)[0]

    def t_eval(lay):
        return lambda: torch.nn.functional.batch_norm(xs[lay], trm, trv, tg, tb, False, 0.0, eps)

    def t_bwd(lay):
        return lambda: aten.native_batch_norm_backward(dys[lay], xs[lay], tg, trm, trv, saved[lay][1],
                                                       saved[lay][2], True, eps, [True, True, True])

    def ours_train():
        return bn_k.batchnorm_forward_train(x, gamma, beta, rm, rv, momentum=mom, eps=eps)

    def ours_eval():
        return bn_k.batchnorm_forward_eval(x, gamma, beta, rm, rv, eps=eps)

    def ours_bwd():
        return bn_k.batchnorm_backward(dy, x_hat, inv_std, gamma)

    def check_eval():
        # Same running statistics on both sides (training-mode calls above have moved ours).
        trm.copy_(torch.from_numpy(rm))
        trv.copy_(torch.from_numpy(rv))
        return [(ours_eval(), _nhwc(t_eval(lay)())) for lay in xs]

    def check_bwd():
        pairs = []
        for lay in xs:
            dx, dgamma, dbeta = t_bwd(lay)()
            ours = ours_bwd()
            pairs += [(ours[0], _nhwc(dx)), (ours[1], dgamma.numpy()), (ours[2], dbeta.numpy())]
        return pairs

    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="batchnorm", shape=shape, layers=layer_names, flops=None)
    layouts = tuple(xs)
    return [
        Op(op="forward train", ours=ours_train, torch={lay: t_train(lay) for lay in layouts},
           check=lambda: [(ours_train()[0], _nhwc(t_train(lay)())) for lay in layouts], tol=1e-4,
           bytes=3 * _nbytes(x), **common),
        Op(op="forward eval", ours=ours_eval, torch={lay: t_eval(lay) for lay in layouts}, check=check_eval,
           tol=1e-5, bytes=2 * _nbytes(x), **common),
        Op(op="backward", ours=ours_bwd, torch={lay: t_bwd(lay) for lay in layouts}, check=check_bwd, tol=1e-3,
           bytes=3 * _nbytes(x), **common),
    ]


def _batchnorm_act_ops(torch, wl, layer, x_shape, layer_names, rng):
    """Fused batch norm + ReLU (``BatchNormAct``) against PyTorch's two ops: native_batch_norm then relu, and
    threshold_backward then native_batch_norm_backward (what autograd runs for BatchNorm2d + ReLU)."""
    from kernels import batchnorm as bn_k
    if layer.act_kind != "relu":
        raise ValueError(f"layer '{layer.name}': the benchmark compares BN + ReLU, got act {layer.act_kind!r}")
    aten = torch.ops.aten
    n = wl.batch
    c = x_shape[-1]
    x = (rng.standard_normal((n, *x_shape), dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    eps, mom = layer.eps, layer.momentum
    _, mean, inv_std = bn_k.batchnorm_act_forward_train(x, gamma, beta, rm.copy(), rv.copy(), momentum=mom, eps=eps)
    xs, dys = _nchw(torch, x), _nchw(torch, dy)
    tg, tb = torch.from_numpy(gamma), torch.from_numpy(beta)
    trm, trv = torch.zeros(c), torch.ones(c)
    saved = {}
    for lay in xs:
        out, m_, s_ = torch.native_batch_norm(xs[lay], tg, tb, trm.clone(), trv.clone(), True, 1 - mom, eps)
        saved[lay] = (torch.relu(out), m_, s_)

    def t_train(lay):
        return lambda: torch.relu_(torch.native_batch_norm(xs[lay], tg, tb, trm, trv, True, 1 - mom, eps)[0])

    def t_eval(lay):
        return lambda: torch.relu_(torch.nn.functional.batch_norm(xs[lay], trm, trv, tg, tb, False, 0.0, eps))

    def t_bwd(lay):
        y, m_, s_ = saved[lay]
        return lambda: aten.native_batch_norm_backward(aten.threshold_backward(dys[lay], y, 0), xs[lay], tg, trm,
                                                       trv, m_, s_, True, eps, [True, True, True])

    def ours_train():
        return bn_k.batchnorm_act_forward_train(x, gamma, beta, rm, rv, momentum=mom, eps=eps)

    def ours_eval():
        return bn_k.batchnorm_act_forward_eval(x, gamma, beta, rm, rv, eps=eps)

    def ours_bwd():
        return bn_k.batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta)

    def check_eval():
        trm.copy_(torch.from_numpy(rm))
        trv.copy_(torch.from_numpy(rv))
        return [(ours_eval(), _nhwc(t_eval(lay)())) for lay in xs]

    def check_bwd():
        pairs = []
        for lay in xs:
            dx, dgamma, dbeta = t_bwd(lay)()
            ours = ours_bwd()
            pairs += [(ours[0], _nhwc(dx)), (ours[1], dgamma.numpy()), (ours[2], dbeta.numpy())]
        return pairs

    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="batchnorm+relu", shape=shape, layers=layer_names, flops=None)
    layouts = tuple(xs)
    return [
        Op(op="forward train", ours=ours_train, torch={lay: t_train(lay) for lay in layouts},
           check=lambda: [(ours_train()[0], _nhwc(t_train(lay)())) for lay in layouts], tol=1e-4,
           bytes=2 * _nbytes(x), **common),
        Op(op="forward eval", ours=ours_eval, torch={lay: t_eval(lay) for lay in layouts}, check=check_eval,
           tol=1e-5, bytes=2 * _nbytes(x), **common),
        Op(op="backward", ours=ours_bwd, torch={lay: t_bwd(lay) for lay in layouts}, check=check_bwd, tol=1e-3,
           bytes=3 * _nbytes(x), **common),
    ]


def _relu_ops(torch, wl, x_shape, layer_names, rng):
    from kernels import activation as act_k
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    y = act_k.relu_forward(x)
    xs, dys, ys = _nchw(torch, x), _nchw(torch, dy), _nchw(torch, y)
    layouts = tuple(xs)
    fwd = lambda: act_k.relu_forward(x)  # noqa: E731
    bwd = lambda: act_k.relu_backward(dy, y)  # noqa: E731

    def t_fwd(lay):
        return lambda: torch.relu(xs[lay])

    def t_bwd(lay):
        return lambda: torch.ops.aten.threshold_backward(dys[lay], ys[lay], 0)

    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="relu", shape=shape, layers=layer_names, flops=None, tol=0.0)
    return [
        Op(op="forward", ours=fwd, torch={lay: t_fwd(lay) for lay in layouts},
           check=lambda: [(fwd(), _nhwc(t_fwd(lay)())) for lay in layouts], bytes=2 * _nbytes(x), **common),
        Op(op="backward", ours=bwd, torch={lay: t_bwd(lay) for lay in layouts},
           check=lambda: [(bwd(), _nhwc(t_bwd(lay)())) for lay in layouts], bytes=3 * _nbytes(x), **common),
    ]


def _pool_ops(torch, wl, x_shape, layer_names, rng):
    from kernels import pool as pool_k
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal((n, x_shape[-1]), dtype=np.float32)
    xs = _nchw(torch, x)
    tdy = torch.from_numpy(dy)[:, :, None, None]
    layouts = tuple(xs)
    fwd = lambda: pool_k.global_avgpool_forward(x)  # noqa: E731
    bwd = lambda: pool_k.global_avgpool_backward(dy, x.shape)  # noqa: E731

    def t_fwd(lay):
        return lambda: torch.nn.functional.adaptive_avg_pool2d(xs[lay], 1)

    def t_bwd(lay):
        return lambda: torch.ops.aten._adaptive_avg_pool2d_backward(tdy, xs[lay])

    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="global avgpool", shape=shape, layers=layer_names, flops=None,
                  tol=1e-5)
    return [
        Op(op="forward", ours=fwd, torch={lay: t_fwd(lay) for lay in layouts},
           check=lambda: [(fwd(), t_fwd(lay)()[:, :, 0, 0].numpy()) for lay in layouts],
           bytes=_nbytes(x, dy), **common),
        Op(op="backward", ours=bwd, torch={lay: t_bwd(lay) for lay in layouts},
           check=lambda: [(bwd(), _nhwc(t_bwd(lay)())) for lay in layouts], bytes=_nbytes(x, dy), **common),
    ]


def _dropout_ops(torch, wl, layer, x_shape, layer_names, rng):
    """Dropout: masks are random on both sides, so ours is checked against NumPy (y = x * mask) instead."""
    from kernels import dropout as drop_k
    n = wl.batch
    rate = layer.rate
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    gen = np.random.default_rng(1)
    _, mask = drop_k.dropout_forward(x, rate=rate, rng=gen)
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tmask = torch.native_dropout(tx, rate, True)[1]
    fwd = lambda: drop_k.dropout_forward(x, rate=rate, rng=gen)  # noqa: E731
    bwd = lambda: drop_k.dropout_backward(dy, mask)  # noqa: E731

    def check_fwd():
        y, m = fwd()
        return [(y, x * m)]

    shape = f"{n}x{'x'.join(map(str, x_shape))} p{rate:g}"
    common = dict(workload=wl.name, family="dropout", shape=shape, layers=layer_names, flops=None, tol=1e-6)
    return [
        Op(op="forward", ours=fwd, torch={"-": lambda: torch.native_dropout(tx, rate, True)}, check=check_fwd,
           bytes=3 * _nbytes(x), **common),
        Op(op="backward", ours=bwd,
           torch={"-": lambda: torch.ops.aten.native_dropout_backward(tdy, tmask, 1 / (1 - rate))},
           check=lambda: [(bwd(), dy * mask)], bytes=3 * _nbytes(x), **common),
    ]


def _linear_ops(torch, wl, layer, x_shape, layer_names, rng):
    from kernels import linear as lin_k
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    w, b = layer.params["kernel"], layer.params["bias"]
    dy = rng.standard_normal((n, w.shape[1]), dtype=np.float32)
    tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w.T.copy(), b, dy))
    fwd = lambda: lin_k.linear_forward(x, w, b)  # noqa: E731
    bwd_in = lambda: lin_k.linear_backward_input(dy, w)  # noqa: E731
    bwd_w = lambda: lin_k.linear_backward_weight(dy, x)  # noqa: E731
    t_fwd = lambda: torch.nn.functional.linear(tx, tw, tb)  # noqa: E731
    t_in = lambda: torch.mm(tdy, tw)  # noqa: E731
    t_w = lambda: torch.mm(tdy.T, tx)  # noqa: E731
    shape = f"{n}x{x_shape[0]}->{w.shape[1]}"
    common = dict(workload=wl.name, family="linear", shape=shape, layers=layer_names,
                  flops=2.0 * layer.macs(x_shape) * n)
    return [
        Op(op="forward", ours=fwd, torch={"-": t_fwd}, check=lambda: [(fwd(), t_fwd().numpy())], tol=1e-5,
           bytes=_nbytes(x, w, b, dy), **common),
        Op(op="backward input", ours=bwd_in, torch={"-": t_in}, check=lambda: [(bwd_in(), t_in().numpy())],
           tol=1e-5, bytes=_nbytes(x, w, dy), **common),
        Op(op="backward weight", ours=bwd_w, torch={"-": t_w}, check=lambda: [(bwd_w(), t_w().T.numpy())],
           tol=1e-5, bytes=_nbytes(x, w, dy), **common),
    ]


def _loss_ops(torch, wl, rng):
    from kernels import loss as loss_k
    n, k, ls = wl.batch, wl.classes, wl.label_smoothing
    logits = rng.standard_normal((n, k), dtype=np.float32) * 3
    labels = rng.integers(0, k, n)
    _, probs = loss_k.softmax_cross_entropy_forward(logits, labels, label_smoothing=ls)
    tl = torch.from_numpy(logits).requires_grad_(True)
    tlab = torch.from_numpy(labels)
    tloss = torch.nn.functional.cross_entropy(tl, tlab, label_smoothing=ls)
    fwd = lambda: loss_k.softmax_cross_entropy_forward(logits, labels, label_smoothing=ls)  # noqa: E731
    bwd = lambda: loss_k.softmax_cross_entropy_backward(probs, labels, label_smoothing=ls)  # noqa: E731

    def t_fwd():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(tl, tlab, label_smoothing=ls)

    def t_bwd():
        return torch.autograd.grad(tloss, tl, retain_graph=True)[0]

    shape = f"{n}x{k} ls{ls:g}"
    common = dict(workload=wl.name, family="softmax cross-entropy", shape=shape, layers=("loss",), flops=None,
                  bytes=_nbytes(logits, probs))
    return [
        Op(op="forward", ours=fwd, torch={"-": t_fwd}, check=lambda: [(np.array(fwd()[0]), t_fwd().numpy())],
           tol=1e-5, **common),
        Op(op="backward (autograd for torch)", ours=bwd, torch={"-": t_bwd},
           check=lambda: [(bwd(), t_bwd().numpy())], tol=1e-5, **common),
    ]


def build_ops(torch, wl, *, seed=0):
    """Every distinct (kernel, shape) of a workload's training step as Ops, in layer order.

    Args:
        torch: the torch module.
        wl: a Workload.
        seed: seeds the random inputs.

    Returns:
        list of Op.
    """
    import models
    model = models.mobilenet_v1(alpha=wl.alpha, resolution=wl.resolution, classes=wl.classes,
                                in_channels=wl.in_channels, dropout=wl.dropout)
    rng = np.random.default_rng(seed)
    groups = {}  # (kind, geometry key) -> (layer, input shape, [layer names]) in first-seen order
    for layer, shape_in, shape_out in model.layer_shapes():
        if layer.kind in ("conv", "depthwise", "pointwise"):
            key = (layer.kind, shape_in, shape_out, getattr(layer, "stride", None))
        elif layer.kind == "activation":
            key = (layer.kind, type(layer).__name__, shape_in)
        elif layer.kind in ("batchnorm", "pool", "dropout", "linear"):
            key = (layer.kind, shape_in)
        else:
            continue
        groups.setdefault(key, (layer, shape_in, []))[2].append(layer.name)
    ops = []
    for (kind, *_), (layer, shape_in, names) in groups.items():
        names = tuple(names)
        if kind in ("conv", "depthwise", "pointwise"):
            ops += _conv_ops(torch, wl, kind, layer, shape_in, names, rng)
        elif kind == "batchnorm" and hasattr(layer, "act_kind"):  # BatchNormAct: BN and activation fused
            ops += _batchnorm_act_ops(torch, wl, layer, shape_in, names, rng)
        elif kind == "batchnorm":
            ops += _batchnorm_ops(torch, wl, layer, shape_in, names, rng)
        elif kind == "activation":
            ops += _relu_ops(torch, wl, shape_in, names, rng)
        elif kind == "pool":
            ops += _pool_ops(torch, wl, shape_in, names, rng)
        elif kind == "dropout":
            ops += _dropout_ops(torch, wl, layer, shape_in, names, rng)
        elif kind == "linear":
            ops += _linear_ops(torch, wl, layer, shape_in, names, rng)
    return ops + _loss_ops(torch, wl, rng)


def validate(op):
    """Largest relative max error of our result against the reference over the op's checks."""
    pairs = op.check()
    pairs = pairs if isinstance(pairs, list) else [pairs]
    return max(h.rel_error(ours, ref) for ours, ref in pairs)


class Result(NamedTuple):
    op: Op
    error: float
    ok: bool
    ours: float
    torch: dict
    gemm: Optional[float]
    fastest_ratio: float  # PyTorch's fastest sample (either layout) over ours

    @property
    def torch_best(self):
        layout = min(self.torch, key=self.torch.get)
        return self.torch[layout], layout


def run_op(op, *, repeats, warmup):
    """Validate, then time ours, PyTorch's layouts and the GEMM interleaved; returns a Result."""
    error = validate(op)
    fns = {"ours": op.ours, **{f"torch {lay}": fn for lay, fn in op.torch.items()}}
    if op.gemm is not None:
        fns["gemm"] = op.gemm
    med, fastest = h.time_interleaved(fns, repeats=repeats, warmup=warmup, best=True)
    torch_fastest = min(v for k, v in fastest.items() if k.startswith("torch"))
    return Result(op, error, error <= op.tol, med["ours"],
                  {k.split(" ", 1)[1]: v for k, v in med.items() if k.startswith("torch")}, med.get("gemm"),
                  torch_fastest / fastest["ours"])


def _rate(op, seconds):
    if op.flops is not None:
        return f"{op.flops / seconds / 1e9:.1f} GFLOP/s"
    return f"{op.bytes / seconds / 1e9:.1f} GB/s"


def result_row(r):
    t, layout = r.torch_best
    gemm = "-" if r.gemm is None else h.fmt_ms(r.gemm)
    return [r.op.family, r.op.op, r.op.shape, len(r.op.layers), f"{r.error:.1e}" + ("" if r.ok else " FAIL"),
            h.fmt_ms(r.ours), _rate(r.op, r.ours), h.fmt_ms(t), layout, _rate(r.op, t), h.fmt_ratio(t / r.ours),
            h.fmt_ratio(r.fastest_ratio), gemm, "-" if r.gemm is None else h.fmt_ratio(r.gemm / r.ours)]


RESULT_HEADERS = ["kernel", "op", "shape (NHWC)", "layers", "rel. err", "ours ms", "ours rate", "torch ms",
                  "torch layout", "torch rate", "torch/ours", "fastest torch/ours", "GEMM ms", "GEMM/ours"]


def summaries(results):
    """Markdown sections: the depthwise and pointwise targets per shape, and per-family totals of one step."""
    out = []
    by_shape = {}
    for r in results:
        by_shape.setdefault((r.op.workload, r.op.family, r.op.shape), []).append(r)
    dw_rows, pw_rows = [], []
    for (wl, fam, shape), rs in by_shape.items():
        ours = sum(r.ours for r in rs)
        torch_t = sum(r.torch_best[0] for r in rs)
        if fam == "depthwise":
            ratio = torch_t / ours
            dw_rows.append([wl, shape, len(rs[0].op.layers), h.fmt_ms(ours), h.fmt_ms(torch_t), h.fmt_ratio(ratio),
                            h.verdict(ratio, 2.0)])
        if fam == "pointwise":
            gemm = sum(r.gemm for r in rs)
            ratio = gemm / ours
            pw_rows.append([wl, shape, len(rs[0].op.layers), h.fmt_ms(ours), h.fmt_ms(gemm), h.fmt_ratio(ratio),
                            h.fmt_ms(torch_t), h.fmt_ratio(torch_t / ours), h.verdict(ratio, 1 / 1.1)])
    if dw_rows:
        out.append("## Depthwise forward + backward (input + weight) against PyTorch (target >= 2x every shape)\n\n"
                   + h.markdown_table(["workload", "shape (NHWC)", "layers", "ours ms", "torch ms", "torch/ours",
                                       "target"], dw_rows))
    if pw_rows:
        out.append("## Pointwise forward + backward against the bare NumPy GEMMs (target: within 10%, "
                   "GEMM/ours >= 0.91)\n\n"
                   + h.markdown_table(["workload", "shape (NHWC->K)", "layers", "ours ms", "GEMM ms", "GEMM/ours",
                                       "torch ms", "torch/ours", "target"], pw_rows))
    fam_rows = []
    totals = {}
    for r in results:
        key = (r.op.workload, r.op.family)
        o, t = totals.get(key, (0.0, 0.0))
        count = len(r.op.layers)
        if r.op.family.startswith("batchnorm") and r.op.op == "forward eval":
            continue  # a training step runs the training forward only
        totals[key] = (o + count * r.ours, t + count * r.torch_best[0])
    for wl in dict.fromkeys(k[0] for k in totals):
        all_o = sum(v[0] for k, v in totals.items() if k[0] == wl)
        all_t = sum(v[1] for k, v in totals.items() if k[0] == wl)
        for (w, fam), (o, t) in totals.items():
            if w == wl:
                fam_rows.append([wl, fam, h.fmt_ms(o), f"{100 * o / all_o:.0f}%", h.fmt_ms(t),
                                 f"{100 * t / all_t:.0f}%", h.fmt_ratio(t / o)])
        fam_rows.append([wl, "**all kernels of one training step**", h.fmt_ms(all_o), "100%", h.fmt_ms(all_t),
                         "100%", h.fmt_ratio(all_t / all_o)])
    if fam_rows:
        out.append("## Kernel time of one training step by family (each shape's time x the layers with it; "
                   "BN's eval forward left out)\n\n"
                   "Isolated kernels on warm inputs: the sum is not the step time (no Python between layers, "
                   "caches warm), but the split shows which family dominates and where PyTorch is ahead.\n\n"
                   + h.markdown_table(["workload", "family", "ours ms", "share", "torch ms", "share",
                                       "torch/ours"], fam_rows))
    return out


def jit_warmup_seconds():
    """Time of the first call of the main kernels at a tiny shape: a cache load (or a compile if the cache is
    cold). Reported on its own line, never mixed into the timings."""
    from kernels import activation, batchnorm, conv, depthwise, dropout, loss, pool
    x = np.ones((2, 5, 5, 3), np.float32)
    t = time.perf_counter()
    conv.conv2d_backward_input(conv.conv2d_forward(x, np.ones((3, 3, 3, 4), np.float32), stride=2,
                                                   padding="same"),
                               np.ones((3, 3, 3, 4), np.float32), x.shape, stride=2, padding="same")
    conv.conv2d_backward_weight(np.ones((2, 3, 3, 4), np.float32), x, (3, 3, 3, 4), stride=2, padding="same")
    w = np.ones((3, 3, 3, 1), np.float32)
    y = depthwise.depthwise_forward(x, w, padding="same")
    depthwise.depthwise_backward_input(y, w, x.shape, padding="same")
    depthwise.depthwise_backward_weight(y, x, w.shape, padding="same")
    c = np.ones(3, np.float32)
    _, x_hat, inv_std = batchnorm.batchnorm_forward_train(x + np.arange(3, dtype=np.float32), c, c, c.copy(),
                                                          c.copy())
    batchnorm.batchnorm_forward_eval(x, c, c, c, c)
    batchnorm.batchnorm_backward(x, x_hat, inv_std, c)
    activation.relu_backward(x, activation.relu_forward(x))
    pool.global_avgpool_backward(pool.global_avgpool_forward(x), x.shape)
    dropout.dropout_backward(x, dropout.dropout_forward(x, rate=0.5, rng=np.random.default_rng(0))[1])
    _, probs = loss.softmax_cross_entropy_forward(np.ones((2, 3), np.float32), np.array([0, 1]))
    loss.softmax_cross_entropy_backward(probs, np.array([0, 1]))
    return time.perf_counter() - t


def main(argv=None):
    args = h.parser(MODULE, "Per-kernel speed against PyTorch and NumPy's BLAS.", DEFAULT_OUT,
                    DEFAULT_REPEATS).parse_args(argv)
    import torch
    h.set_threads(torch)
    repeats = args.repeats or (3 if args.quick else DEFAULT_REPEATS)
    warmup = 1 if args.quick else 2
    workloads = WORKLOADS[1:] if args.quick else WORKLOADS
    jit = jit_warmup_seconds()
    header = h.machine_header(torch)
    header.append(f"Both engines {h.THREADS} threads; medians of {repeats} interleaved repeats after {warmup} "
                  f"warm-up calls (a sample repeats a call until it lasts >= 2 ms)")
    for line in header:
        print(line)
    jit_line = f"JIT: first calls of the kernels at a tiny shape (cache load, or compile when cold): {jit:.2f} s"
    print(jit_line, flush=True)
    results = []
    start = time.perf_counter()
    cpu = h.CpuShare()
    for wl in workloads:
        ops = [op for op in build_ops(torch, wl) if h.selected(op.label, args.case)]
        if not ops:
            continue
        print(f"\n== {wl.name}: {len(ops)} rows ==")
        print(" | ".join(RESULT_HEADERS))
        for op in ops:
            r = run_op(op, repeats=repeats, warmup=warmup)
            results.append(r)
            print(" | ".join(map(str, result_row(r))), flush=True)
    if not results:
        print(f"no rows match --case {' '.join(args.case)}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    cpu_line = cpu.line()
    print(cpu_line)
    failed = [r for r in results if not r.ok]
    sections = summaries(results)
    for s in sections:
        print("\n" + s)
    tables = []
    for wl in dict.fromkeys(r.op.workload for r in results):
        rows = [result_row(r) for r in results if r.op.workload == wl]
        tables.append(f"## All kernels: {wl}\n\n" + h.markdown_table(RESULT_HEADERS, rows))
    notes = ("Columns: *rel. err* = max |ours - reference| / max |reference| against PyTorch at that shape "
             "(dropout against NumPy's x * mask), checked before timing; *layers* = how many layers of the model "
             "have that shape; rates are GFLOP/s from the analytic mult-adds (FLOPs = 2 x MACs, backward = forward "
             "count) or GB/s of compulsory traffic for memory-bound ops; *torch/ours* > 1 means ours is faster; "
             "*fastest torch/ours* = the same ratio of each side's fastest sample (what each does when the shared "
             "machine leaves it alone; medians are the figures of record); "
             "*GEMM/ours* = bare NumPy matmul time over ours (1.00 = BLAS speed). PyTorch's best of NCHW and "
             "channels_last is shown ('-' where layout does not apply).")
    h.write_results(args.out, "Kernel benchmarks: tinyconv against PyTorch CPU", MODULE,
                    header + [jit_line, f"Timed section: {elapsed:.0f} s", cpu_line],
                    [notes, *sections, *tables])
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    if failed:
        print(f"{len(failed)} row(s) failed validation: {', '.join(r.op.label for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
