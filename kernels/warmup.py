"""A first call of every public kernel on tiny inputs: what makes Numba compile each jitted function (or load it
from the on-disk cache), without a model or data.

    calls(dtype)              [(name, zero-argument call)], one entry per public kernel function
    run(names, dtype)         run those entries twice, so that both builds of each size-dispatched kernel
                              (:class:`kernels._jit.SizedKernel`) are compiled: tiny inputs pick the serial
                              build, and the second pass forces the parallel rule

``tinyconv.precompile`` runs these on every core ahead of use; ``bench.model`` times them in one process (the
cold compile). Each entry makes its own inputs from NumPy alone (no other kernel's output), with the dtypes and
layouts the kernels' real callers pass, so any subset can run in any process and compiles what training uses.
The heaviest entries come first, for a pool of processes that takes them in order.
"""
import numpy as np

from kernels import _jit


def calls(dtype=np.float32):
    """(name, zero-argument call) for every public kernel function, on tiny ``dtype`` inputs (float32 or float64).

    Some names appear with several shapes in one entry: a 6x6 map takes the stride-1 3x3 depthwise kernel, a 2x2
    map and the stride-2 input gradient the generic loops, a 16x16x256 map the stride-2 3x3 kernels and the
    blocked weight gradient, 2 output columns the per-column weight accumulators.
    """
    from kernels import activation as a, batchnorm as bn, conv, depthwise as dw, dropout as dr, linear as li
    from kernels import loss, optim as op, pointwise as pw, pool
    f = np.dtype(dtype).type
    if f not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(f)
    x2 = x[:, :2, :2]  # (2, 2, 2, 3)
    w3, wd, wp = np.ones((3, 3, 3, 4), f), np.ones((3, 3, 3, 1), f), np.ones((3, 4), f)
    c = np.ones(3, f)
    y2 = np.ones((2, 3, 3, 4), f)
    yd = np.ones((2, 6, 6, 3), f)
    y4 = np.ones((2, 6, 6, 4), f)
    xw, ww = np.ones((1, 16, 16, 256), f), np.ones((3, 3, 256, 1), f)
    argmax = np.zeros((2, 3, 3, 3), np.int32)  # what maxpool_forward returns beside y
    logits, labels = np.ones((2, 3), f), np.array([0, 2])
    probs = np.full((2, 3), 1 / 3, f)
    v = np.ones((2, 3), f)
    return [
        # a wider map with many channels takes the stride-2 3x3 kernels (forward, blocked weight gradient from 8
        # output columns) and, on 2 output columns, the per-column weight accumulators
        ("depthwise 3x3 paths", lambda: [dw.depthwise_forward(xw, ww, stride=1, padding="same"),
                                         dw.depthwise_forward(xw, ww, stride=2, padding="same"),
                                         dw.depthwise_backward_input(xw, ww, xw.shape, padding="same"),
                                         dw.depthwise_backward_weight(xw, xw, ww.shape, padding="same"),
                                         dw.depthwise_backward_weight(xw[:, :8, :8], xw, ww.shape, stride=2,
                                                                      padding="same"),
                                         dw.depthwise_backward_weight(xw[:, :2, :2], xw[:, :4, :4], ww.shape,
                                                                      stride=2, padding="same")]),
        ("depthwise_backward", lambda: [dw.depthwise_backward(yd, x, wd, padding="same"),
                                        dw.depthwise_backward(xw, xw, ww, padding="same")]),
        # stride 1 takes the blocked 3x3 weight gradient; stride 2 on 3 output columns the row-tiled loops
        ("depthwise_backward_weight", lambda: [dw.depthwise_backward_weight(yd, x, wd.shape, padding="same"),
                                               dw.depthwise_backward_weight(y2[..., :3], x, wd.shape, stride=2,
                                                                            padding="same")]),
        ("depthwise_forward", lambda: [dw.depthwise_forward(x, wd, padding="same"),
                                       dw.depthwise_forward(x2, wd, padding="same"),
                                       dw.depthwise_forward(x, wd, padding="same", bias=c, act="relu", in_bias=c,
                                                            in_act="relu")]),
        ("depthwise_backward_input", lambda: [dw.depthwise_backward_input(yd, wd, x.shape, padding="same"),
                                              dw.depthwise_backward_input(y2[..., :3], wd, x.shape, stride=2,
                                                                          padding="same")]),
        ("input_pass_is_free", lambda: dw.input_pass_is_free(3, 1, "same", x.shape[1:])),
        ("batchnorm_forward_train", lambda: bn.batchnorm_forward_train(x, c, c, c.copy(), c.copy())),
        ("batchnorm_backward", lambda: bn.batchnorm_backward(x, x, c, c)),
        ("batchnorm_act_forward_train", lambda: bn.batchnorm_act_forward_train(x, c, c, c.copy(), c.copy())),
        ("batchnorm_act_backward", lambda: bn.batchnorm_act_backward(x, x, c, c, c, c)),
        ("batchnorm_forward_eval", lambda: bn.batchnorm_forward_eval(x, c, c, c, c)),
        ("batchnorm_act_forward_eval", lambda: bn.batchnorm_act_forward_eval(x, c, c, c, c)),
        ("bias_act_forward", lambda: [bn.bias_act_forward(x, c), _in_place(bn.bias_act_forward, x.copy(), c)]),
        ("batchnorm_stats_train", lambda: bn.batchnorm_stats_train(x, c.copy(), c.copy())),
        ("scale_act_forward", lambda: bn.scale_act_forward(x, c, c, c, act="relu")),
        ("conv2d_forward", lambda: [conv.conv2d_forward(x, w3, stride=2, padding="same"),
                                    _direct(conv, lambda: conv.conv2d_forward(x, w3, stride=2, padding="same"))]),
        ("conv2d_backward_input", lambda: conv.conv2d_backward_input(y2, w3, x.shape, stride=2, padding="same")),
        ("conv2d_backward_weight", lambda: conv.conv2d_backward_weight(y2, x, w3.shape, stride=2,
                                                                       padding="same")),
        ("conv2d_backward_bias", lambda: conv.conv2d_backward_bias(y2)),
        ("im2col", lambda: conv.im2col(x, w3.shape, stride=2, padding="same")),
        ("maxpool_forward", lambda: pool.maxpool_forward(x, kernel_size=2)),
        ("maxpool_backward", lambda: pool.maxpool_backward(np.ones((2, 3, 3, 3), f), argmax, x.shape)),
        ("avgpool_forward", lambda: pool.avgpool_forward(x, kernel_size=2)),
        ("avgpool_backward", lambda: pool.avgpool_backward(np.ones((2, 3, 3, 3), f), x.shape, kernel_size=2)),
        ("global_avgpool_forward", lambda: pool.global_avgpool_forward(x)),
        ("global_avgpool_backward", lambda: pool.global_avgpool_backward(v, x.shape)),
        ("pointwise_forward", lambda: pw.pointwise_forward(x, wp)),
        ("pointwise_backward_input", lambda: pw.pointwise_backward_input(y4, wp)),
        ("pointwise_backward_weight", lambda: pw.pointwise_backward_weight(y4, x)),
        ("pointwise_backward_bias", lambda: pw.pointwise_backward_bias(y4)),
        ("sgd_update", lambda: op.sgd_update(wp.copy(), wp, np.zeros_like(wp), lr=0.1, momentum=0.9,
                                             weight_decay=0.0, nesterov=True)),
        ("dropout_forward", lambda: dr.dropout_forward(x, rate=0.5, rng=np.random.default_rng(0))),
        ("dropout_backward", lambda: dr.dropout_backward(x, np.full(x.shape, 2, f))),
        ("relu_forward", lambda: a.relu_forward(x)),
        ("relu_backward", lambda: a.relu_backward(x, x)),
        ("relu6_forward", lambda: a.relu6_forward(x)),
        ("relu6_backward", lambda: a.relu6_backward(x, x)),
        ("linear_forward", lambda: li.linear_forward(v, np.ones((3, 4), f), np.ones(4, f))),
        ("linear_backward_input", lambda: li.linear_backward_input(np.ones((2, 4), f), np.ones((3, 4), f))),
        ("linear_backward_weight", lambda: li.linear_backward_weight(np.ones((2, 4), f), v)),
        ("linear_backward_bias", lambda: li.linear_backward_bias(np.ones((2, 4), f))),
        ("softmax_cross_entropy_forward", lambda: loss.softmax_cross_entropy_forward(logits, labels)),
        ("softmax_cross_entropy_backward", lambda: loss.softmax_cross_entropy_backward(probs, labels)),
    ]


def _direct(conv, call):
    """``call()`` with the conv forward's direct loop taken at any size, so that a tiny batch compiles the path of a
    large one (``kernels.conv._use_direct``)."""
    saved = conv._DIRECT_MIN_BYTES
    conv._DIRECT_MIN_BYTES = 0
    try:
        return call()
    finally:
        conv._DIRECT_MIN_BYTES = saved


def _in_place(fn, x, *args):
    """``fn(x, *args, out=x)``: the in-place call, a signature of its own."""
    return fn(x, *args, out=x)


def names():
    """The entries' names, in :func:`calls`' order (heaviest first)."""
    return [name for name, _ in calls()]


def check_names(wanted, known):
    """Raise ValueError naming the entries of ``wanted`` that are not in ``known`` (the entries' names)."""
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"no warm-up entry named {unknown}; the entries are {list(known)}")


def run(names=None, dtype=np.float32):
    """Run the entries named in ``names`` (default: all) twice: once as they are, which on tiny inputs picks the
    serial build of each size-dispatched kernel, then with the parallel rule forced (``_jit.PARALLEL_MIN_WORK``
    = 0), which picks the parallel build that real batches use. Returns {name: seconds of both calls}.

    With one Numba thread the parallel builds are never picked, so are not compiled: call with two or more.
    """
    import time
    entries = calls(dtype)
    if names is not None:
        check_names(names, [name for name, _ in entries])
        entries = [(name, call) for name, call in entries if name in set(names)]
    times = {}
    for name, call in entries:
        t = time.perf_counter()
        call()
        times[name] = time.perf_counter() - t
    previous, _jit.PARALLEL_MIN_WORK = _jit.PARALLEL_MIN_WORK, 0
    try:
        for name, call in entries:
            t = time.perf_counter()
            call()
            times[name] += time.perf_counter() - t
    finally:
        _jit.PARALLEL_MIN_WORK = previous
    return times
