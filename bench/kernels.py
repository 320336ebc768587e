"""Every kernel, forward and each backward, at MobileNet's shapes, next to PyTorch's CPU path (and NumPy's BLAS).

    .venv/bin/python -m bench.kernels                    # both workloads, writes bench/results/kernels.md
    .venv/bin/python -m bench.kernels --quick            # the small workload, 3 repeats: a smoke run
    .venv/bin/python -m bench.kernels --case depthwise   # only rows whose label contains 'depthwise'

Workloads (the shapes come from the model itself, ``Sequential.layer_shapes``, one row per distinct shape):
    mobilenet-1.0-128-b32   MobileNet 1.0, 128x128x3, batch 32 (the ImageNet-style case);
    fmnist-0.5-32-b128      MobileNet 0.5, 32x32x1, batch 128, 10 classes (``tinyconv.train``'s default).

Each engine lives in its own worker process (``bench._harness.Worker``; tinyconv's never imports torch), both
building the same rows from the same seed. For each row: validate our result against PyTorch's op run in float64
at that very shape (relative max error, float32 tolerances; PyTorch's own float32 error is shown beside it), then
time ours and PyTorch's in both layouts (NCHW and channels_last; the best is taken) with the repeats interleaved
across the two processes, and report medians. Conv-like rows turn time into GFLOP/s with the layers' analytic
mult-adds (``Layer.macs``; each backward does as many as the forward); memory-bound rows report GB/s of their
compulsory traffic (every input read once, every output written once). Pointwise rows are also timed as bare
NumPy GEMMs with preallocated outputs (in the tinyconv worker): the floor a 1x1 conv on BLAS can reach. PyTorch's
strided convs get an input already padded TensorFlow's way, so their pad copy is not timed (PyTorch at its best).
Both engines run on 2 threads.
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
# The network's first layer (models.mobilenet_v1 names it so): a training step never computes the gradient of the
# network's input, so the per-step totals leave that layer's input-gradient row out (the row itself is timed).
INPUT_LAYER = "conv1"


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


class OpInfo(NamedTuple):
    """What the parent knows of a row: labels, tolerance and counts (the same in both workers).

    Attributes:
        workload, family, op, shape: labels ('depthwise', 'backward weight', '32x64x64x32 s1').
        layers: names of the model's layers with this shape (the count weights per-step totals).
        tol: largest accepted relative max error of ours against the float64 reference.
        flops: analytic FLOPs (2 x mult-adds) of the call, or None for memory-bound ops.
        bytes: compulsory traffic of the call in bytes (inputs read once, outputs written once).
        gemm: whether the tinyconv worker also times bare NumPy GEMMs doing the same products (pointwise rows).
    """
    workload: str
    family: str
    op: str
    shape: str
    layers: tuple
    tol: float
    flops: Optional[float]
    bytes: float
    gemm: bool = False

    @property
    def label(self):
        return f"{self.workload} {self.family} {self.op} {self.shape}"


class Op(NamedTuple):
    """One row as one worker holds it: the info and that engine's side (the other side's fields are None).

    Attributes:
        info: OpInfo.
        ours: zero-argument callable running our kernel (tinyconv worker).
        ours_out: zero-argument callable returning the list of our results to validate.
        gemm: zero-argument callable running the bare NumPy GEMM(s) (tinyconv worker, pointwise rows).
        torch: dict layout -> zero-argument callable running PyTorch's equivalent (torch worker).
        torch_out: dict layout -> zero-argument callable returning PyTorch's results, in our layout and order.
        ref: zero-argument callable returning the float64 reference results (PyTorch's op in float64, NCHW, in
            the torch worker; NumPy's x * mask for dropout, in the tinyconv worker).
    """
    info: OpInfo
    ours: Optional[Callable] = None
    ours_out: Optional[Callable] = None
    gemm: Optional[Callable] = None
    torch: Optional[dict] = None
    torch_out: Optional[dict] = None
    ref: Optional[Callable] = None

    @property
    def label(self):
        return self.info.label


LAYOUTS = ("NCHW", "channels_last")
REF = "float64"  # the reference's key among the torch tensors: float64, NCHW


def _op(common, op, tol, nbytes, **side):
    return Op(OpInfo(op=op, tol=tol, bytes=nbytes, **common), **side)


def _nbytes(*arrays):
    return float(sum(a.size * a.itemsize for a in arrays))


def _nchw(torch, a):
    """NHWC numpy array -> {'NCHW': contiguous, 'channels_last': same values in NHWC memory, 'float64': NCHW
    float64 (the reference's input)} tensors."""
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW
    return {"NCHW": t.contiguous(), "channels_last": t.contiguous(memory_format=torch.channels_last),
            REF: t.double().contiguous()}


def _vec(torch, a):
    """A numpy array -> {layout: float32 tensor, 'float64': float64 tensor} (no layout for vectors)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return {"NCHW": t, "channels_last": t, REF: t.double()}


def _nhwc(t):
    """torch NCHW-shaped tensor (any memory format) -> NHWC numpy array."""
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def _outputs(fn):
    """{layout: callable -> list of arrays} for the timed layouts, and the float64 reference callable."""
    return {lay: (lambda lay=lay: fn(lay)) for lay in LAYOUTS}, (lambda: fn(REF))


def _conv_ops(torch, wl, family, layer, x_shape, layer_names, rng):
    """Forward, backward input and backward weight of a standard, depthwise or pointwise conv layer."""
    from kernels.geometry import conv_geometry
    n = wl.batch
    hh, ww, c = x_shape
    x = rng.standard_normal((n, hh, ww, c), dtype=np.float32)
    out_shape = layer.output_shape(x_shape)
    dy = rng.standard_normal((n, *out_shape), dtype=np.float32)
    macs = float(layer.macs(x_shape) * n)
    if family == "pointwise":
        w = layer.params["kernel"]  # (C, K)
        stride, padding, pads, kernel = (1, 1), None, None, (1, 1)
    else:
        stride, padding = layer.stride, layer.padding
        kernel = layer.kernel_size
        g = conv_geometry(hh, ww, kernel, stride, padding)
        pads = (g.pl, g.pr, g.pt, g.pb)
        w = layer.params["depthwise_kernel" if family == "depthwise" else "kernel"]
    shape = (f"{n}x{hh}x{ww}x{c}" + (f"->{out_shape[2]}" if family != "depthwise" else "")
             + (f" k{kernel[0]}" if family == "conv" else "") + (f" s{stride[0]}" if family != "pointwise" else ""))
    y_bytes = 4.0 * n * np.prod(out_shape)
    common = dict(workload=wl.name, family=family, shape=shape, layers=layer_names, flops=2 * macs,
                  gemm=family == "pointwise")
    specs = (("forward", 1e-4, _nbytes(x, w) + y_bytes), ("backward input", 1e-4, _nbytes(dy, w, x)),
             ("backward weight", 1e-3, _nbytes(dy, x, w)))
    if torch is None:
        from kernels import conv as conv_k
        from kernels import depthwise as dw_k
        from kernels import pointwise as pw_k
        if family == "pointwise":
            calls = (lambda: pw_k.pointwise_forward(x, w), lambda: pw_k.pointwise_backward_input(dy, w),
                     lambda: pw_k.pointwise_backward_weight(dy, x))
            x2d = x.reshape(-1, c)  # (NHW, C)
            dy2d = dy.reshape(-1, w.shape[1])  # (NHW, K)
            y_buf = np.empty((x2d.shape[0], w.shape[1]), np.float32)
            dx_buf = np.empty_like(x2d)
            # the weight gradient's product in the order the wrapper takes it (dy.T @ x for thin layers)
            swapped = pw_k.swaps_weight_product(c)
            dw_buf = np.empty((w.shape[1], c) if swapped else w.shape, np.float32)
            gemms = (lambda: np.matmul(x2d, w, out=y_buf), lambda: np.matmul(dy2d, w.T, out=dx_buf),
                     (lambda: np.matmul(dy2d.T, x2d, out=dw_buf)) if swapped else
                     (lambda: np.matmul(x2d.T, dy2d, out=dw_buf)))
        else:
            k = dw_k if family == "depthwise" else conv_k
            fwd_k, in_k, w_k = ((k.depthwise_forward, k.depthwise_backward_input, k.depthwise_backward_weight)
                                if family == "depthwise" else
                                (k.conv2d_forward, k.conv2d_backward_input, k.conv2d_backward_weight))
            calls = (lambda: fwd_k(x, w, stride=stride, padding=padding),
                     lambda: in_k(dy, w, x.shape, stride=stride, padding=padding),
                     lambda: w_k(dy, x, w.shape, stride=stride, padding=padding))
            gemms = (None, None, None)
        return [_op(common, name, tol, nb, ours=call, ours_out=lambda call=call: [call()], gemm=gm)
                for (name, tol, nb), call, gm in zip(specs, calls, gemms)]

    aten = torch.ops.aten
    if family == "pointwise":
        wt = torch.from_numpy(w.T.copy())[:, :, None, None]  # (K, C, 1, 1)
        groups = 1
    elif family == "depthwise":
        wt = torch.from_numpy(w[:, :, :, 0].transpose(2, 0, 1).copy())[:, None]  # (C, 1, KH, KW)
        groups = c
    else:
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())  # (K, C, KH, KW)
        groups = 1
    # PyTorch's input: symmetric padding goes inside the conv; TensorFlow's asymmetric 'same' is applied up front.
    if pads is None or (pads[0] == pads[1] and pads[2] == pads[3]):
        conv_pad = [0, 0] if pads is None else [pads[2], pads[0]]
        xs = _nchw(torch, x)
        crop = None
    else:
        conv_pad = [0, 0]
        xs = _nchw(torch, np.pad(x, ((0, 0), (pads[2], pads[3]), (pads[0], pads[1]), (0, 0))))
        crop = (pads[2], pads[0])
    dys = _nchw(torch, dy)
    wts = {"NCHW": wt.contiguous(), "channels_last": wt.contiguous(memory_format=torch.channels_last),
           REF: wt.double().contiguous()}

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

    timed = ({lay: t_fwd(lay) for lay in LAYOUTS}, {lay: t_bwd(lay, [True, False, False]) for lay in LAYOUTS},
             {lay: t_bwd(lay, [False, True, False]) for lay in LAYOUTS})
    outs = (_outputs(lambda lay: [_nhwc(t_fwd(lay)())]),
            _outputs(lambda lay: [torch_dx(t_bwd(lay, [True, False, False])())]),
            _outputs(lambda lay: [torch_dw(t_bwd(lay, [False, True, False])())]))
    return [_op(common, name, tol, nb, torch=t, torch_out=o, ref=r)
            for (name, tol, nb), t, (o, r) in zip(specs, timed, outs)]


def _bn_inputs(wl, x_shape, rng, relu):
    """Input, upstream gradient and parameters of a batch-norm row; for BN + ReLU no pre-activation lies within
    1e-4 of the kink (such elements are moved 2e-4 past it), so float32 and the float64 reference take the same
    ReLU branch everywhere: an element at the kink may go either way in float32, which changes its dx by O(1)."""
    n, c = wl.batch, x_shape[-1]
    x = (rng.standard_normal((n, *x_shape), dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c, dtype=np.float32)
    # Running statistics for the eval rows: fixed, never updated (the training rows update their own copies).
    eval_mean = (rng.standard_normal(c) * 0.5).astype(np.float32)
    eval_var = rng.uniform(0.5, 4.0, c).astype(np.float32)
    if relu:
        band = 1e-4
        x2 = x.reshape(-1, c)
        k = gamma / np.sqrt(x2.astype(np.float64).var(axis=0) + 1e-3)
        v = (x2 - x2.astype(np.float64).mean(axis=0)) * k + beta
        near = np.abs(v) < band
        x2 += np.where(near, 2 * band / k, 0.0).astype(np.float32)
    return x, dy, gamma, beta, eval_mean, eval_var


def _batchnorm_ops(torch, wl, layer, x_shape, layer_names, rng, *, relu=False):
    """Batch norm (training forward, eval forward, backward); with ``relu``, the fused ``BatchNormAct`` against
    PyTorch's two ops: native_batch_norm then relu, threshold_backward then native_batch_norm_backward (what
    autograd runs for BatchNorm2d + ReLU)."""
    if relu and layer.act_kind != "relu":
        raise ValueError(f"layer '{layer.name}': the benchmark compares BN + ReLU, got act {layer.act_kind!r}")
    x, dy, gamma, beta, eval_mean, eval_var = _bn_inputs(wl, x_shape, rng, relu)
    c = x_shape[-1]
    eps, mom = layer.eps, layer.momentum
    shape = f"{wl.batch}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="batchnorm+relu" if relu else "batchnorm", shape=shape,
                  layers=layer_names, flops=None)
    specs = (("forward train", 1e-4, (2 if relu else 3) * _nbytes(x)), ("forward eval", 1e-5, 2 * _nbytes(x)),
             ("backward", 1e-3, 3 * _nbytes(x)))
    if torch is None:
        from kernels import batchnorm as bn_k
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        if relu:
            _, mean, inv_std = bn_k.batchnorm_act_forward_train(x, gamma, beta, rm.copy(), rv.copy(),
                                                                momentum=mom, eps=eps)
            train = lambda: bn_k.batchnorm_act_forward_train(x, gamma, beta, rm, rv, momentum=mom, eps=eps)  # noqa
            evl = lambda: bn_k.batchnorm_act_forward_eval(x, gamma, beta, eval_mean, eval_var, eps=eps)  # noqa
            bwd = lambda: bn_k.batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta)  # noqa: E731
        else:
            _, x_hat, inv_std = bn_k.batchnorm_forward_train(x, gamma, beta, rm.copy(), rv.copy(), momentum=mom,
                                                             eps=eps)
            train = lambda: bn_k.batchnorm_forward_train(x, gamma, beta, rm, rv, momentum=mom, eps=eps)  # noqa
            evl = lambda: bn_k.batchnorm_forward_eval(x, gamma, beta, eval_mean, eval_var, eps=eps)  # noqa: E731
            bwd = lambda: bn_k.batchnorm_backward(dy, x_hat, inv_std, gamma)  # noqa: E731
        outs = (lambda: [train()[0]], lambda: [evl()], lambda: list(bwd()))  # backward: dx, dgamma, dbeta
        return [_op(common, name, tol, nb, ours=call, ours_out=out)
                for (name, tol, nb), call, out in zip(specs, (train, evl, bwd), outs)]

    aten = torch.ops.aten
    xs, dys = _nchw(torch, x), _nchw(torch, dy)
    tg, tb, erm, erv = (_vec(torch, a) for a in (gamma, beta, eval_mean, eval_var))
    rms = {lay: torch.zeros(c, dtype=tg[lay].dtype) for lay in (*LAYOUTS, REF)}
    rvs = {lay: torch.ones(c, dtype=tg[lay].dtype) for lay in (*LAYOUTS, REF)}
    act = torch.relu_ if relu else (lambda t: t)
    saved = {}
    for lay in (*LAYOUTS, REF):
        out, m_, s_ = torch.native_batch_norm(xs[lay], tg[lay], tb[lay], rms[lay].clone(), rvs[lay].clone(), True,
                                              1 - mom, eps)
        saved[lay] = (act(out), m_, s_)

    def t_train(lay):
        return lambda: act(torch.native_batch_norm(xs[lay], tg[lay], tb[lay], rms[lay], rvs[lay], True, 1 - mom,
                                                   eps)[0])

    def t_eval(lay):
        return lambda: act(torch.nn.functional.batch_norm(xs[lay], erm[lay], erv[lay], tg[lay], tb[lay], False,
                                                          0.0, eps))

    def t_bwd(lay):
        y, m_, s_ = saved[lay]
        if relu:
            return lambda: aten.native_batch_norm_backward(aten.threshold_backward(dys[lay], y, 0), xs[lay],
                                                           tg[lay], rms[lay], rvs[lay], m_, s_, True, eps,
                                                           [True, True, True])
        return lambda: aten.native_batch_norm_backward(dys[lay], xs[lay], tg[lay], rms[lay], rvs[lay], m_, s_,
                                                       True, eps, [True, True, True])

    def bwd_out(lay):
        dx, dgamma, dbeta = t_bwd(lay)()
        return [_nhwc(dx), dgamma.numpy(), dbeta.numpy()]

    timed = [{lay: f(lay) for lay in LAYOUTS} for f in (t_train, t_eval, t_bwd)]
    outs = (_outputs(lambda lay: [_nhwc(t_train(lay)())]), _outputs(lambda lay: [_nhwc(t_eval(lay)())]),
            _outputs(bwd_out))
    return [_op(common, name, tol, nb, torch=t, torch_out=o, ref=r)
            for (name, tol, nb), t, (o, r) in zip(specs, timed, outs)]


def _relu_ops(torch, wl, x_shape, layer_names, rng):
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    y = np.maximum(x, 0)
    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="relu", shape=shape, layers=layer_names, flops=None)
    specs = (("forward", 0.0, 2 * _nbytes(x)), ("backward", 0.0, 3 * _nbytes(x)))
    if torch is None:
        from kernels import activation as act_k
        calls = (lambda: act_k.relu_forward(x), lambda: act_k.relu_backward(dy, y))
        return [_op(common, name, tol, nb, ours=call, ours_out=lambda call=call: [call()])
                for (name, tol, nb), call in zip(specs, calls)]
    xs, dys, ys = _nchw(torch, x), _nchw(torch, dy), _nchw(torch, y)

    def t_fwd(lay):
        return lambda: torch.relu(xs[lay])

    def t_bwd(lay):
        return lambda: torch.ops.aten.threshold_backward(dys[lay], ys[lay], 0)

    return [_op(common, name, tol, nb, torch={lay: f(lay) for lay in LAYOUTS}, torch_out=o, ref=r)
            for (name, tol, nb), f in zip(specs, (t_fwd, t_bwd))
            for o, r in [_outputs(lambda lay, f=f: [_nhwc(f(lay)())])]]


def _pool_ops(torch, wl, x_shape, layer_names, rng):
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal((n, x_shape[-1]), dtype=np.float32)
    shape = f"{n}x{'x'.join(map(str, x_shape))}"
    common = dict(workload=wl.name, family="global avgpool", shape=shape, layers=layer_names, flops=None)
    specs = (("forward", 1e-5, _nbytes(x, dy)), ("backward", 1e-5, _nbytes(x, dy)))
    if torch is None:
        from kernels import pool as pool_k
        calls = (lambda: pool_k.global_avgpool_forward(x), lambda: pool_k.global_avgpool_backward(dy, x.shape))
        return [_op(common, name, tol, nb, ours=call, ours_out=lambda call=call: [call()])
                for (name, tol, nb), call in zip(specs, calls)]
    xs = _nchw(torch, x)
    tdy = {lay: t[:, :, None, None] for lay, t in _vec(torch, dy).items()}

    def t_fwd(lay):
        return lambda: torch.nn.functional.adaptive_avg_pool2d(xs[lay], 1)

    def t_bwd(lay):
        return lambda: torch.ops.aten._adaptive_avg_pool2d_backward(tdy[lay], xs[lay])

    fwd_out = _outputs(lambda lay: [t_fwd(lay)()[:, :, 0, 0].numpy()])
    bwd_out = _outputs(lambda lay: [_nhwc(t_bwd(lay)())])
    return [_op(common, name, tol, nb, torch={lay: f(lay) for lay in LAYOUTS}, torch_out=o, ref=r)
            for (name, tol, nb), f, (o, r) in zip(specs, (t_fwd, t_bwd), (fwd_out, bwd_out))]


def _dropout_ops(torch, wl, layer, x_shape, layer_names, rng):
    """Dropout: masks are random on both sides, so ours is checked against NumPy (y = x * mask) instead."""
    n = wl.batch
    rate = layer.rate
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    shape = f"{n}x{'x'.join(map(str, x_shape))} p{rate:g}"
    common = dict(workload=wl.name, family="dropout", shape=shape, layers=layer_names, flops=None)
    specs = (("forward", 1e-6, 3 * _nbytes(x)), ("backward", 1e-6, 3 * _nbytes(x)))
    if torch is None:
        from kernels import dropout as drop_k
        gen = np.random.default_rng(1)
        _, mask = drop_k.dropout_forward(x, rate=rate, rng=gen)
        fwd = lambda: drop_k.dropout_forward(x, rate=rate, rng=gen)  # noqa: E731
        bwd = lambda: drop_k.dropout_backward(dy, mask)  # noqa: E731
        last = {}

        def fwd_out():
            y, m = fwd()
            last["mask"] = m
            return [y]

        return [_op(common, "forward", *specs[0][1:], ours=fwd, ours_out=fwd_out,
                    ref=lambda: [x.astype(np.float64) * last["mask"]]),
                _op(common, "backward", *specs[1][1:], ours=bwd, ours_out=lambda: [bwd()],
                    ref=lambda: [dy.astype(np.float64) * mask])]
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tmask = torch.native_dropout(tx, rate, True)[1]
    return [_op(common, "forward", *specs[0][1:], torch={"-": lambda: torch.native_dropout(tx, rate, True)}),
            _op(common, "backward", *specs[1][1:],
                torch={"-": lambda: torch.ops.aten.native_dropout_backward(tdy, tmask, 1 / (1 - rate))})]


def _linear_ops(torch, wl, layer, x_shape, layer_names, rng):
    n = wl.batch
    x = rng.standard_normal((n, *x_shape), dtype=np.float32)
    w, b = layer.params["kernel"], layer.params["bias"]
    dy = rng.standard_normal((n, w.shape[1]), dtype=np.float32)
    shape = f"{n}x{x_shape[0]}->{w.shape[1]}"
    common = dict(workload=wl.name, family="linear", shape=shape, layers=layer_names,
                  flops=2.0 * layer.macs(x_shape) * n)
    specs = (("forward", 1e-5, _nbytes(x, w, b, dy)), ("backward input", 1e-5, _nbytes(x, w, dy)),
             ("backward weight", 1e-5, _nbytes(x, w, dy)))
    if torch is None:
        from kernels import linear as lin_k
        calls = (lambda: lin_k.linear_forward(x, w, b), lambda: lin_k.linear_backward_input(dy, w),
                 lambda: lin_k.linear_backward_weight(dy, x))
        return [_op(common, name, tol, nb, ours=call, ours_out=lambda call=call: [call()])
                for (name, tol, nb), call in zip(specs, calls)]
    tx, tw, tb, tdy = (_vec(torch, a) for a in (x, w.T.copy(), b, dy))
    fns = (lambda lay: torch.nn.functional.linear(tx[lay], tw[lay], tb[lay]),
           lambda lay: torch.mm(tdy[lay], tw[lay]),
           lambda lay: torch.mm(tdy[lay].T, tx[lay]).T)
    return [_op(common, name, tol, nb, torch={"-": lambda f=f: f("NCHW")},
                torch_out={"-": lambda f=f: [f("NCHW").numpy()]}, ref=lambda f=f: [f(REF).numpy()])
            for (name, tol, nb), f in zip(specs, fns)]


def _loss_ops(torch, wl, rng):
    n, k, ls = wl.batch, wl.classes, wl.label_smoothing
    logits = rng.standard_normal((n, k), dtype=np.float32) * 3
    labels = rng.integers(0, k, n)
    shape = f"{n}x{k} ls{ls:g}"
    common = dict(workload=wl.name, family="softmax cross-entropy", shape=shape, layers=("loss",), flops=None)
    nb = 2 * _nbytes(logits)  # logits read, probabilities written (and read back by the backward)
    if torch is None:
        from kernels import loss as loss_k
        _, probs = loss_k.softmax_cross_entropy_forward(logits, labels, label_smoothing=ls)
        fwd = lambda: loss_k.softmax_cross_entropy_forward(logits, labels, label_smoothing=ls)  # noqa: E731
        bwd = lambda: loss_k.softmax_cross_entropy_backward(probs, labels, label_smoothing=ls)  # noqa: E731
        return [_op(common, "forward", 1e-5, nb, ours=fwd, ours_out=lambda: [np.array(fwd()[0])]),
                _op(common, "backward (autograd for torch)", 1e-5, nb, ours=bwd, ours_out=lambda: [bwd()])]
    tl = {lay: t.clone().requires_grad_(True) for lay, t in _vec(torch, logits).items()}
    tlab = torch.from_numpy(labels)
    tloss = {lay: torch.nn.functional.cross_entropy(t, tlab, label_smoothing=ls) for lay, t in tl.items()}

    def t_fwd(lay):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(tl[lay], tlab, label_smoothing=ls)

    def t_bwd(lay):
        return torch.autograd.grad(tloss[lay], tl[lay], retain_graph=True)[0]

    return [_op(common, "forward", 1e-5, nb, torch={"-": lambda: t_fwd("NCHW")},
                torch_out={"-": lambda: [t_fwd("NCHW").numpy()]}, ref=lambda: [t_fwd(REF).numpy()]),
            _op(common, "backward (autograd for torch)", 1e-5, nb, torch={"-": lambda: t_bwd("NCHW")},
                torch_out={"-": lambda: [t_bwd("NCHW").numpy()]}, ref=lambda: [t_bwd(REF).numpy()])]


def build_ops(torch, wl, *, seed=0):
    """Every distinct (kernel, shape) of a workload's training step as Ops, in layer order, one engine's side.

    Both sides draw the same inputs from the same seed (NumPy only), so the tinyconv worker (``torch=None``) and
    the torch worker build the same rows on the same data.

    Args:
        torch: the torch module (PyTorch's side and the float64 references), or None (our side and the GEMMs).
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
    assert model.layers[0].name == INPUT_LAYER, model.layers[0].name
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
        elif kind == "batchnorm":  # BatchNormAct (BN and activation fused) or plain batch norm
            ops += _batchnorm_ops(torch, wl, layer, shape_in, names, rng, relu=hasattr(layer, "act_kind"))
        elif kind == "activation":
            ops += _relu_ops(torch, wl, shape_in, names, rng)
        elif kind == "pool":
            ops += _pool_ops(torch, wl, shape_in, names, rng)
        elif kind == "dropout":
            ops += _dropout_ops(torch, wl, layer, shape_in, names, rng)
        elif kind == "linear":
            ops += _linear_ops(torch, wl, layer, shape_in, names, rng)
    return ops + _loss_ops(torch, wl, rng)


# --- in a worker ----------------------------------------------------------------------------------------------

_OPS = []  # this worker's side of the current workload's rows


def worker_setup(wl, filters=(), seed=0):
    """In a worker: build this engine's side of the workload's rows matching ``filters``, register the timed
    callables ('<i> ours', '<i> gemm', '<i> torch <layout>'); returns their OpInfo list."""
    torch = None
    if h.imported("torch"):
        import torch
    h.clear_registered()
    _OPS[:] = [op for op in build_ops(torch, wl, seed=seed) if h.selected(op.label, filters)]
    for i, op in enumerate(_OPS):
        if op.ours is not None:
            h.register(f"{i} ours", op.ours)
        if op.gemm is not None:
            h.register(f"{i} gemm", op.gemm)
        for lay, fn in (op.torch or {}).items():
            h.register(f"{i} torch {lay}", fn)
    return [op.info for op in _OPS]


def worker_clear():
    """In a worker: drop the current rows and their inputs."""
    h.clear_registered()
    _OPS.clear()


def worker_outputs(i):
    """In a worker: row ``i``'s results to validate: {'ours': [...]} or {'torch': {layout: [...]}}, and 'ref'
    (float64) where this side holds the reference."""
    op = _OPS[i]
    out = {}
    if op.ours_out is not None:
        out["ours"] = op.ours_out()
    if op.torch_out is not None:
        out["torch"] = {lay: fn() for lay, fn in op.torch_out.items()}
    if op.ref is not None:
        out["ref"] = op.ref()
    return out


def worker_layouts(i):
    """In a worker: the PyTorch layouts row ``i`` times (none in the tinyconv worker)."""
    return list(_OPS[i].torch or ())


# --- in the parent ----------------------------------------------------------------------------------------------

def _max_error(results, ref):
    if len(results) != len(ref):
        raise ValueError(f"{len(results)} results against {len(ref)} references")
    return max(h.rel_error(a, r) for a, r in zip(results, ref))


def validate(outs):
    """(our error, PyTorch's worst layout's error or None) against the float64 reference, from the workers'
    :func:`worker_outputs`."""
    ours, theirs = outs
    ref = ours.get("ref", theirs.get("ref"))
    err = _max_error(ours["ours"], ref)
    torch_err = max((_max_error(o, ref) for o in theirs.get("torch", {}).values()), default=None)
    return err, torch_err


class Result(NamedTuple):
    op: OpInfo
    error: float
    torch_error: Optional[float]
    ok: bool
    ours: float
    torch: dict
    gemm: Optional[float]
    fastest_ratio: float  # PyTorch's fastest sample (either layout) over ours

    @property
    def torch_best(self):
        layout = min(self.torch, key=self.torch.get)
        return self.torch[layout], layout


SETTLE = 1e-3  # seconds between two samples: the previous engine's idle threads stop spinning

# A sample repeats the call until it lasts this long. Each sample starts right after the engine's worker is
# resumed, and on this shared VM the first call after a few ms idle runs far slower than the next ones (in one
# process: a 0.57 ms depthwise forward took 1.9-2.0 ms, a 0.23 ms array copy 0.66 ms, after a 5-20 ms sleep). With
# 2 ms samples that first call was half of each sample of a small kernel, and the same unchanged kernel measured
# 0.94 ms in one run and 2.9 ms in the next; 20 ms samples amortize it, for both engines alike, as a training
# step, which runs its kernels back to back, does.
MIN_SAMPLE = 20e-3


def run_op(workers, i, info, *, repeats, warmup):
    """Validate row ``i``, then time ours, PyTorch's layouts and the GEMM interleaved, each in its worker."""
    tc, tw = workers
    error, torch_error = validate((tc.call(worker_outputs, i), tw.call(worker_outputs, i)))
    fns = {"ours": h.Remote(tc, f"{i} ours"),
           **{f"torch {lay}": h.Remote(tw, f"{i} torch {lay}") for lay in tw.call(worker_layouts, i)}}
    if info.gemm:
        fns["gemm"] = h.Remote(tc, f"{i} gemm")
    med, fastest = h.time_interleaved(fns, repeats=repeats, warmup=warmup, min_sample=MIN_SAMPLE, settle=SETTLE,
                                      best=True)
    torch_fastest = min(v for k, v in fastest.items() if k.startswith("torch"))
    return Result(info, error, torch_error, error <= info.tol, med["ours"],
                  {k.split(" ", 1)[1]: v for k, v in med.items() if k.startswith("torch")}, med.get("gemm"),
                  torch_fastest / fastest["ours"])


def run_workload(workers, wl, filters=(), *, repeats, warmup, report=print):
    """Set the workload up in both workers and run every row; returns the Results."""
    tc, tw = workers
    infos = tc.call(worker_setup, wl, list(filters))
    if tw.call(worker_setup, wl, list(filters)) != infos:
        raise RuntimeError(f"the workers built different rows for {wl.name}")
    results = []
    if infos:
        report(f"\n== {wl.name}: {len(infos)} rows ==")
        report(" | ".join(RESULT_HEADERS))
    for i, info in enumerate(infos):
        r = run_op(workers, i, info, repeats=repeats, warmup=warmup)
        results.append(r)
        report(" | ".join(map(str, result_row(r))))
    for w in workers:
        w.call(worker_clear)  # free the inputs
    return results


def _rate(op, seconds):
    if op.flops is not None:
        return f"{op.flops / seconds / 1e9:.1f} GFLOP/s"
    return f"{op.bytes / seconds / 1e9:.1f} GB/s"


def result_row(r):
    t, layout = r.torch_best
    gemm = "-" if r.gemm is None else h.fmt_ms(r.gemm)
    return [r.op.family, r.op.op, r.op.shape, len(r.op.layers), f"{r.error:.1e}" + ("" if r.ok else " FAIL"),
            "-" if r.torch_error is None else f"{r.torch_error:.1e}", h.fmt_ms(r.ours), _rate(r.op, r.ours),
            h.fmt_ms(t), layout, _rate(r.op, t), h.fmt_ratio(t / r.ours),
            h.fmt_ratio(r.fastest_ratio), gemm, "-" if r.gemm is None else h.fmt_ratio(r.gemm / r.ours)]


RESULT_HEADERS = ["kernel", "op", "shape (NHWC)", "layers", "rel. err", "torch err", "ours ms", "ours rate",
                  "torch ms", "torch layout", "torch rate", "torch/ours", "fastest torch/ours", "GEMM ms", "GEMM/ours"]


def step_totals(results):
    """{(workload, family): (ours s, torch s)}: each row's time times the layers that run it in a training step."""
    totals = {}
    for r in results:
        key = (r.op.workload, r.op.family)
        o, t = totals.get(key, (0.0, 0.0))
        count = len(r.op.layers)
        if r.op.family.startswith("batchnorm") and r.op.op == "forward eval":
            continue  # a training step runs the training forward only
        if r.op.op == "backward input":  # nor does it compute the gradient of the network's input
            count = sum(name != INPUT_LAYER for name in r.op.layers)
        totals[key] = (o + count * r.ours, t + count * r.torch_best[0])
    return totals


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
    totals = step_totals(results)
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
                   "BN's eval forward and the input layer's input gradient, which no training step computes, "
                   "left out)\n\n"
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
    repeats = args.repeats or (3 if args.quick else DEFAULT_REPEATS)
    warmup = 1 if args.quick else 2
    workloads = WORKLOADS[1:] if args.quick else WORKLOADS
    with h.Worker("tinyconv") as tc, h.Worker("torch") as tw:
        jit = tc.call(jit_warmup_seconds)
        header = h.machine_header([tc, tw])
        header.append(f"Each engine {h.THREADS} threads in its own worker process; medians of {repeats} "
                      f"interleaved repeats (ours, torch NCHW, torch channels_last, GEMM: one sample each in turn, "
                      f"{SETTLE * 1e3:g} ms apart, the other engine's worker paused meanwhile) after {warmup} "
                      f"warm-up calls (a sample repeats a call until it lasts >= {MIN_SAMPLE * 1e3:g} ms)")
        for line in header:
            print(line)
        jit_line = (f"JIT: first calls of the kernels at a tiny shape in the tinyconv worker (cache load, or "
                    f"compile when cold): {jit:.2f} s")
        print(jit_line, flush=True)
        results = []
        start = time.perf_counter()
        cpu = h.CpuShare([tc.pid, tw.pid])
        for wl in workloads:
            results += run_workload((tc, tw), wl, args.case, repeats=repeats, warmup=warmup,
                                    report=lambda line: print(line, flush=True))
        elapsed = time.perf_counter() - start
        cpu_line = cpu.line()
    if not results:
        print(f"no rows match --case {' '.join(args.case)}", file=sys.stderr)
        return 2
    print(cpu_line)
    failed = [r for r in results if not r.ok]
    sections = summaries(results)
    for s in sections:
        print("\n" + s)
    tables = []
    for wl in dict.fromkeys(r.op.workload for r in results):
        rows = [result_row(r) for r in results if r.op.workload == wl]
        tables.append(f"## All kernels: {wl}\n\n" + h.markdown_table(RESULT_HEADERS, rows))
    notes = ("Columns: *rel. err* = max |ours - reference| / max |reference|, checked before timing, where the "
             "reference is PyTorch's op run in float64 (NCHW) on the same inputs at that shape (dropout: NumPy's "
             "x * mask in float64); *torch err* = the same for PyTorch's own float32 results (worst layout), for "
             "scale. Batch norm + ReLU inputs have no pre-activation within 1e-4 of the kink: PyTorch's channels_last "
             "batch norm accumulates its statistics in float32 (its mean is off by ~3e-6 at 131072 values per "
             "channel), which sent one element of 4 M at 2.4e-6 to the other ReLU branch and moved that dx by O(1) "
             "(the 0.18 'failures' of earlier runs, which compared ours with PyTorch's float32 output); *layers* "
             "= how many layers of the model have that shape; rates are GFLOP/s from the analytic mult-adds "
             "(FLOPs = 2 x MACs, backward = forward count) or GB/s of compulsory traffic for memory-bound ops; "
             "*torch/ours* > 1 means ours is faster; *fastest torch/ours* = the same ratio of each side's fastest "
             "sample (what each does when the shared machine leaves it alone; medians are the figures of record); "
             "*GEMM/ours* = bare NumPy matmul time (in the tinyconv worker) over ours (1.00 = BLAS speed). "
             "PyTorch's best of NCHW and channels_last is shown ('-' where layout does not apply). Each engine "
             "runs in its own process; the rows' inputs are drawn from the same seed in both.")
    h.write_results(args.out, "Kernel benchmarks: tinyconv against PyTorch CPU", MODULE,
                    header + [jit_line, f"Timed section: {elapsed:.0f} s", cpu_line],
                    [notes, *sections, *tables])
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    if failed:
        print(f"{len(failed)} row(s) failed validation: {', '.join(r.op.label for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from bench.kernels import main as _main  # the module by its name: its classes pickle to the workers
    sys.exit(_main())
