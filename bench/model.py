"""End-to-end MobileNet v1 speed and memory against PyTorch, where the time goes, and what the JIT costs.

    .venv/bin/python -m bench.model                  # everything, writes bench/results/model.md
    .venv/bin/python -m bench.model --quick          # small cases, 3 repeats, no cold compile: a smoke run
    .venv/bin/python -m bench.model --case train     # only the rows whose label contains 'train'

Sections:
    speed      images/s of a training step (forward, softmax cross-entropy, backward, SGD with momentum 0.9) and
               of inference, ours against ``bench.torch_mobilenet`` holding the very same weights (copied by
               name), PyTorch in NCHW and channels_last (best taken), repeats interleaved, medians. Each engine
               runs in a persistent worker process of its own (``bench._harness.Worker``: tinyconv's never
               imports torch, torch's never runs a Numba kernel); the parent sets the case up in both, collects
               their outputs and times one step at a time in each, round-robin. Each case is validated first at
               its own shape: inference logits, and for training the loss and every parameter gradient against a
               float64 run of our engine (dropout off for that one check, since the engines draw different masks).
               Then, in the tinyconv worker: the case's GEMM floor (its 1x1, input-layer and classifier
               products as bare NumPy GEMMs), which bounds the ratio any engine on this BLAS reaches.
    memory     peak resident memory of each engine in a subprocess of its own (VmHWM): one step on 2 images first
               (one-time set-up: JIT-cached kernels loaded, BLAS and thread buffers), its resident cost reported
               apart; then the high-water mark is reset and the peak of 3 full-batch steps above the resident
               size at the reset is what a training step needs.
    profile    (tinyconv worker) per layer type, time from ``Sequential.add_hook`` around every layer's forward and
               backward (medians over steps) against its share of mult-adds: the paper's Table 2, in time. With
               hooks the backward pass is never split across the cores (``Sequential``), so on the Fashion-MNIST
               workload the profiled step runs the data-parallel backward and takes longer than the timed step.
    blocks     every depthwise-separable block (depthwise + pointwise conv layers only) timed against a standard
               3x3 ``Conv2D`` with the same input, output channels and stride, next to the mult-add ratio
               1/N + 1/D_K^2: where the savings in arithmetic turn into savings in time.
    JIT        cold compile, with ``NUMBA_CACHE_DIR`` pointed at an empty directory: a subprocess making every
               first call of ``kernels.warmup`` in float32 (every public kernel, serial and parallel builds), and
               ``python -m tinyconv.precompile``, the same calls on a pool of one process per core; warm start: a
               subprocess with the cache populated, timed from before its launch to the end of its first
               training step (``tinyconv.train``'s default workload).
"""
if __name__ == "__main__":
    from bench._harness import reexec_for_benchmark
    reexec_for_benchmark("bench.model")

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional

import numpy as np

from bench import _harness as h

MODULE = "bench.model"
# Inference is also timed with batch norm folded into the convolutions, on both sides (tinyconv.fold and
# PyTorch's fuse_conv_bn_eval, channels_last): each engine's best inference path is what the ratio compares.
FOLDED = "folded"
_OURS = {"plain": "ours", FOLDED: "ours folded"}
DEFAULT_OUT = "bench/results/model.md"
DEFAULT_REPEATS = 5
LR, MOMENTUM = 0.01, 0.9


class Case(NamedTuple):
    """One end-to-end measurement: a MobileNet configuration, a batch, training or inference, and its target."""
    mode: str  # 'train' or 'infer'
    alpha: float
    resolution: int
    batch: int
    in_channels: int
    classes: int
    dropout: float
    target: Optional[float]  # required torch-time / our-time ratio

    @property
    def name(self):
        return f"{self.mode} {self.alpha:g}-{self.resolution}-b{self.batch}" + \
            (" fmnist" if self.in_channels == 1 else "")


CASES = (
    Case("train", 1.0, 128, 32, 3, 1000, 1e-3, 1.5),
    Case("train", 0.5, 128, 32, 3, 1000, 1e-3, 1.5),
    Case("train", 0.5, 32, 128, 1, 10, 0.2, 1.5),
    Case("infer", 1.0, 128, 32, 3, 1000, 1e-3, 1.5),
    Case("infer", 0.5, 128, 32, 3, 1000, 1e-3, None),
    Case("infer", 1.0, 224, 1, 3, 1000, 1e-3, 1.0),
)
QUICK_CASES = (CASES[2], CASES[5])
SETUP_IMAGES = 2  # the memory benchmark's set-up step: one-time costs paid on a batch this small
WARM_START_CASE = CASES[2]  # tinyconv.train's default: MobileNet 0.5, 32x32x1, batch 128


def case_by_name(name):
    for c in CASES:
        if c.name == name:
            return c
    raise ValueError(f"unknown case {name!r}; expected one of {[c.name for c in CASES]}")


def build_ours(case, seed=0):
    import models
    return models.mobilenet_v1(alpha=case.alpha, resolution=case.resolution, classes=case.classes,
                               in_channels=case.in_channels, dropout=case.dropout, seed=seed)


def batch(case, seed=0):
    """A random NHWC float32 batch and labels for ``case``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.batch, case.resolution, case.resolution, case.in_channels), dtype=np.float32)
    return x, rng.integers(0, case.classes, case.batch)


def ours_step(model, case, x, y):
    """A zero-argument callable running one training step (or one inference forward) of our engine."""
    if case.mode == "infer":
        model.eval()
        return lambda: model.forward(x, training=False)
    from tinyconv import SoftmaxCrossEntropy
    from tinyconv.optim import SGD
    model.train()
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(model.named_parameters(), lr=LR, momentum=MOMENTUM, nesterov=False)

    def step():
        model.zero_grad()
        loss_fn.forward(model.forward(x, training=True), y)
        model.backward(loss_fn.backward())
        opt.step()
    return step


def torch_step(torch, tmodel, case, xt, yt):
    """The same for a torch model: ``inference_mode`` forward, or zero_grad/forward/loss/backward/SGD step."""
    if case.mode == "infer":
        tmodel.eval()

        def infer():
            with torch.inference_mode():
                return tmodel(xt)
        return infer
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(tmodel(xt), yt).backward()
        opt.step()
    return step


def torch_inputs(torch, x, y):
    """Our NHWC batch as PyTorch inputs: {'NCHW': contiguous, 'channels_last': same values, NHWC memory}."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    return {"NCHW": t.contiguous(), "channels_last": t.contiguous(memory_format=torch.channels_last)}, \
        torch.from_numpy(y)


# --- in the workers: each holds its engine's model of the current case -----------------------------------------

_STATE = {}


def _dropout_off(layers):
    """Set every dropout rate to 0; returns a function restoring them (the two engines draw different masks)."""
    saved = [(layer, layer.rate) for layer in layers if layer.kind == "dropout"]
    for layer, _ in saved:
        layer.rate = 0.0

    def restore():
        for layer, rate in saved:
            layer.rate = rate
    return restore


def weights_of(model):
    """A tinyconv model's parameters and batch-norm buffers as plain, picklable data for
    ``bench.torch_mobilenet.copy_weights``: [(layer name, kind, {param key: array}, {buffer key: array})]."""
    return [(layer.name, layer.kind, {k: np.array(v) for k, v in layer.params.items()},
             {k: np.array(v) for k, v in (getattr(layer, "buffers", None) or {}).items()})
            for layer in model.layers if layer.params]


def ours_setup(case):
    """tinyconv worker: build the case's model and batch; returns the weights, for the torch worker to copy."""
    h.clear_registered()
    _STATE.clear()
    from tinyconv.fold import fold_batchnorm
    model = build_ours(case)
    x, y = batch(case)
    _STATE.update(case=case, model=model, x=x, y=y)
    if case.mode == "infer":
        _STATE["folded"] = fold_batchnorm(model)
    return weights_of(model)


def ours_outputs():
    """tinyconv worker: what validation compares. Inference: {'logits'}. Training: one step with dropout off, in
    float32 and in float64 (the same network and weights): {'loss', 'grads', 'grads64'}, gradients by
    (layer name, parameter key)."""
    from tinyconv import SoftmaxCrossEntropy
    case, model, x, y = (_STATE[k] for k in ("case", "model", "x", "y"))
    if case.mode == "infer":
        model.eval()
        return {"logits": {"plain": model.forward(x, training=False),
                           "folded": _STATE["folded"].forward(x, training=False)}}
    model64 = build_ours(case).astype(np.float64)
    restores = [_dropout_off(m.layers) for m in (model, model64)]
    try:
        losses = []
        for m, xm in ((model, x), (model64, x.astype(np.float64))):
            m.train()
            m.zero_grad()
            loss_fn = SoftmaxCrossEntropy()
            losses.append(loss_fn.forward(m.forward(xm, training=True), y))
            m.backward(loss_fn.backward())
        grads = [{(layer.name, k): np.array(g) for layer in m.layers for k, g in layer.grads.items()}
                 for m in (model, model64)]
    finally:
        for restore in restores:
            restore()
        model.zero_grad()
    return {"loss": float(losses[0]), "grads": grads[0], "grads64": grads[1]}


def ours_arm():
    """tinyconv worker: register the step (or inference forward) as 'ours' for the parent to time, for inference
    the forward of the batch-norm-folded model as 'ours folded', and the case's bare GEMMs as 'gemm floor'."""
    h.register("ours", ours_step(_STATE["model"], _STATE["case"], _STATE["x"], _STATE["y"]))
    if _STATE["case"].mode == "infer":
        h.register("ours folded", ours_step(_STATE["folded"], _STATE["case"], _STATE["x"], _STATE["y"]))
    h.register(GEMM_FLOOR, gemm_floor(_STATE["model"], _STATE["case"]))


GEMM_FLOOR = "gemm floor"


def gemm_products(model, case):
    """The matrix products one step of ``case`` cannot do without, as (M, K, N, what) for an (M, K) @ (K, N):
    each convolution's im2col GEMM, each 1x1 conv's and the classifier's, forward; for training also each one's
    weight gradient and, except for the first layer (whose input gradient nobody needs), its input gradient."""
    from kernels.pointwise import swaps_weight_product
    from tinyconv.layers import Conv2D, Linear, PointwiseConv2D
    products = []
    layers = model.layer_shapes((case.resolution, case.resolution, case.in_channels))
    for i, (layer, _, out) in enumerate(layers):
        if isinstance(layer, Conv2D):
            m, k, n = case.batch * out[0] * out[1], layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels, \
                layer.out_channels
        elif isinstance(layer, PointwiseConv2D):
            m, k, n = case.batch * out[0] * out[1], layer.in_channels, layer.out_channels
        elif isinstance(layer, Linear):
            m, k, n = case.batch, layer.in_features, layer.out_features
        else:
            continue
        products.append((m, k, n, f"{layer.name} forward"))
        if case.mode == "train":
            # in the order the engine multiplies: a thin 1x1 conv's weight gradient as (dy.T @ x), K x C
            swapped = isinstance(layer, PointwiseConv2D) and swaps_weight_product(k)
            products.append((n, m, k, f"{layer.name} weight gradient") if swapped else
                            (k, m, n, f"{layer.name} weight gradient"))
            if i > 0:
                products.append((m, n, k, f"{layer.name} input gradient"))
    return products


def gemm_floor(model, case):
    """A zero-argument callable running :func:`gemm_products` as bare NumPy GEMMs into preallocated outputs, on
    this worker's BLAS and threads: no engine whose 1x1 convs run on that BLAS can take a step in less time, so
    PyTorch's time over this one bounds the ratio any such engine can reach.

    The products share three buffers of the largest size (an activation, a gradient, a result), so more of their
    operands sit in cache than in a real step: the floor is, if anything, low, and the bound high.
    """
    products = gemm_products(model, case)
    size = max(max(m * k, k * n, m * n) for m, k, n, _ in products)
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(size, dtype=np.float32) for _ in range(2))
    out = np.empty(size, np.float32)
    # A weight gradient is x.T @ dy (or dy.T @ x, see gemm_products), an input gradient dy @ w.T: the transposed
    # views BLAS takes without a copy.
    calls = []
    for m, k, n, what in products:
        lhs = a[:m * k].reshape(k, m).T if what.endswith("weight gradient") else a[:m * k].reshape(m, k)
        rhs = b[:n * k].reshape(n, k).T if what.endswith("input gradient") else b[:k * n].reshape(k, n)
        calls.append((lhs, rhs, out[:m * n].reshape(m, n)))

    def run():
        for lhs, rhs, res in calls:
            np.matmul(lhs, rhs, out=res)
    return run


def ours_profile(steps):
    """tinyconv worker: the hook profile of the case's training step, as a markdown table."""
    model, case = _STATE["model"], _STATE["case"]
    times, step_time = profile(model, case, _STATE["x"], _STATE["y"], steps)
    return profile_table(model, case, times, step_time)


def ours_blocks(repeats, warmup):
    """tinyconv worker: the separable-versus-standard block table of the case's model."""
    return blocks(_STATE["model"], _STATE["case"], repeats, warmup)


def torch_setup(case, weights):
    """torch worker: the case's model in both layouts holding ``weights`` (from :func:`ours_setup`), and the
    same batch."""
    import torch
    from bench.torch_mobilenet import copy_weights, fold_batchnorm, mobilenet_v1 as torch_mobilenet
    h.clear_registered()
    _STATE.clear()
    x, y = batch(case)
    xts, yt = torch_inputs(torch, x, y)
    tmodels = {}
    for lay in xts:
        tm = torch_mobilenet(alpha=case.alpha, resolution=case.resolution, classes=case.classes,
                             in_channels=case.in_channels, dropout=case.dropout)
        copy_weights(tm, weights)
        tmodels[lay] = tm if lay == "NCHW" else tm.to(memory_format=torch.channels_last)
    if case.mode == "infer":
        tmodels[FOLDED] = fold_batchnorm(tmodels["channels_last"]).to(memory_format=torch.channels_last)
        xts[FOLDED] = xts["channels_last"]
    _STATE.update(case=case, tmodels=tmodels, xts=xts, yt=yt, params=[(n, list(p)) for n, _, p, _ in weights])


def torch_outputs():
    """torch worker: inference {'logits': {layout: logits}}; training (NCHW, dropout off) {'loss', 'grads'} with
    the gradients in tinyconv's layout by (layer name, parameter key)."""
    import torch
    from bench.torch_mobilenet import TORCH_PARAM, torch_gradient_like_tinyconv
    case, tmodels, xts, yt = (_STATE[k] for k in ("case", "tmodels", "xts", "yt"))
    if case.mode == "infer":
        logits = {}
        for lay, tm in tmodels.items():
            tm.eval()
            with torch.inference_mode():
                logits[lay] = tm(xts[lay]).numpy()
        return {"logits": logits}
    tm = tmodels["NCHW"]
    drops = [(m, m.p) for m in tm.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in drops:
        m.p = 0.0
    try:
        tm.train()
        tm.zero_grad(set_to_none=True)
        tloss = torch.nn.functional.cross_entropy(tm(xts["NCHW"]), yt)
        tloss.backward()
        modules = dict(tm.named_children())
        grads = {(name, k): torch_gradient_like_tinyconv(modules[name], TORCH_PARAM[k]).copy()
                 for name, keys in _STATE["params"] for k in keys}
    finally:
        for m, p in drops:
            m.p = p
        tm.zero_grad(set_to_none=True)
    return {"loss": float(tloss.detach()), "grads": grads}


def torch_arm():
    """torch worker: register 'torch NCHW' and 'torch channels_last' for the parent to time."""
    import torch
    case = _STATE["case"]
    for lay, tm in _STATE["tmodels"].items():
        h.register(f"torch {lay}", torch_step(torch, tm, case, _STATE["xts"][lay], _STATE["yt"]))


# --- in the parent ----------------------------------------------------------------------------------------------

def validate(case, ours, theirs):
    """Compare the engines' outputs at the case's shape; returns (description, worst relative error, passed).

    Inference: our logits against each PyTorch layout's. Training: one step with dropout off on both sides, in
    float32, and in float64 through our engine (the same network and weights), which the two float32 gradients are
    measured against: BN over small spatial maps makes float32 gradients of this network drift ~1% from exact, in
    both engines, so their mutual difference alone says little. Passes if PyTorch agrees with the float64 run (so
    it is a valid reference) and ours is within a factor of 2 of PyTorch's error or under 5e-2: a ReLU whose input
    sits at 0 can take either branch in float32, which moves that layer's gradients by a few percent in either
    engine; a wrong backward is off by O(1).
    """
    if case.mode == "infer":  # every pair of our models (plain, folded) and PyTorch's (layouts, folded)
        err = max(h.rel_error(o, t) for o in ours["logits"].values() for t in theirs["logits"].values())
        return f"logits rel. err {err:.1e}", err, err <= 1e-3
    if set(ours["grads"]) != set(theirs["grads"]):
        only_ours, only_torch = set(ours["grads"]) - set(theirs["grads"]), set(theirs["grads"]) - set(ours["grads"])
        raise RuntimeError(f"gradients differ in names: ours only {sorted(only_ours)}, torch only {sorted(only_torch)}")
    ours_err = torch_err = 0.0
    for key, ref in ours["grads64"].items():
        scale = max(float(np.linalg.norm(ref)), 1e-30)
        ours_err = max(ours_err, float(np.linalg.norm(ours["grads"][key] - ref)) / scale)
        torch_err = max(torch_err, float(np.linalg.norm(theirs["grads"][key] - ref)) / scale)
    tl = theirs["loss"]
    loss_err = abs(ours["loss"] - tl) / abs(tl)
    ok = loss_err <= 1e-4 and torch_err <= 5e-2 and ours_err <= max(2 * torch_err, 5e-2)
    return (f"loss rel. err {loss_err:.1e}; worst gradient rel. err vs float64: ours {ours_err:.1e}, "
            f"torch {torch_err:.1e}"), ours_err, ok


SETTLE = 0.01  # seconds between two samples: the previous engine's idle threads stop spinning


def speed(workers, case, repeats, warmup):
    """Set the case up in both workers (PyTorch's model gets our weights), validate, then time ours and both
    torch layouts interleaved, each sample inside its own worker. Returns a dict of results."""
    tc, tw = workers
    tw.call(torch_setup, case, tc.call(ours_setup, case))
    check, err, ok = validate(case, tc.call(ours_outputs), tw.call(torch_outputs))
    tc.call(ours_arm)
    tw.call(torch_arm)
    variants = ("plain", FOLDED) if case.mode == "infer" else ("plain",)
    layouts = ("NCHW", "channels_last") + ((FOLDED,) if case.mode == "infer" else ())
    fns = {**{_OURS[v]: h.Remote(tc, _OURS[v]) for v in variants},
           **{f"torch {lay}": h.Remote(tw, f"torch {lay}") for lay in layouts}}
    med, fastest = h.time_interleaved(fns, repeats=repeats, warmup=warmup, min_sample=0.0, settle=SETTLE,
                                      best=True)
    torch_fastest = min(v for k, v in fastest.items() if k.startswith("torch"))
    ours_fastest = min(fastest[_OURS[v]] for v in variants)
    torch_times = {k.split(" ", 1)[1]: v for k, v in med.items() if k.startswith("torch")}
    ours_times = {v: med[_OURS[v]] for v in variants}
    best = min(torch_times, key=torch_times.get)
    ours_best = min(ours_times, key=ours_times.get)
    # Timed on its own afterwards: interleaved, it would sit in our worker's turn either just before our step
    # (which then no longer runs first after the worker resumes, as it does here and in every earlier record) or
    # first, taking that slower first call itself. Alone, with the same pause between samples, it never takes it.
    floor = h.time_interleaved({GEMM_FLOOR: h.Remote(tc, GEMM_FLOOR)}, repeats=repeats, warmup=warmup,
                               min_sample=0.0, settle=SETTLE)[GEMM_FLOOR]
    return dict(case=case, check=check, error=err, ok=ok, ours=ours_times[ours_best], ours_times=ours_times,
                ours_best=ours_best, torch=torch_times, best=best, ratio=torch_times[best] / ours_times[ours_best],
                fastest_ratio=torch_fastest / ours_fastest, ours_fastest=ours_fastest, floor=floor,
                ceiling=torch_times[best] / floor)


def _torch_label(layout):
    return "channels_last, folded" if layout == FOLDED else layout


def speed_row(r):
    c = r["case"]
    t = r["torch"][r["best"]]

    def ms(times, key):
        return h.fmt_ms(times[key]) if key in times else "-"
    return [c.name, r["check"] + ("" if r["ok"] else " FAIL"), ms(r["ours_times"], "plain"),
            ms(r["ours_times"], FOLDED), f"{c.batch / r['ours']:.1f}", ms(r["torch"], "NCHW"),
            ms(r["torch"], "channels_last"), ms(r["torch"], FOLDED), f"{c.batch / t:.1f}", h.fmt_ratio(r["ratio"]),
            h.fmt_ratio(r["fastest_ratio"]), h.fmt_ms(r["floor"]), h.fmt_ms(r["ours"] - r["floor"]),
            h.fmt_ratio(r["ceiling"]), "-" if c.target is None else h.fmt_ms(t / c.target - r["floor"]),
            "-" if c.target is None else f">= {c.target:g}x", h.verdict(r["ratio"], c.target)]


SPEED_HEADERS = ["case", "validation", "ours ms", "ours folded ms", "ours img/s", "torch NCHW ms", "torch CL ms",
                 "torch CL folded ms", "torch img/s", "torch/ours", "fastest torch/ours", "GEMM floor ms",
                 "ours beyond the GEMMs ms", "torch/floor (ceiling)", "left beside the GEMMs at the target ms",
                 "target", ""]


# --- per-layer profile from hooks -------------------------------------------------------------------------------

def profile(model, case, x, y, steps):
    """Time per (phase, layer) of the median of ``steps`` training steps (by step time), from hooks, and its time."""
    step = ours_step(model, case, x, y)
    step()
    per_step = []
    current = {}
    started = {}

    def hook(phase, layer, event):
        now = time.perf_counter()
        if event == "start":
            started[(phase, layer.name)] = now
        else:
            key = (phase, layer.name)
            current[key] = current.get(key, 0.0) + now - started[key]

    remove = model.add_hook(hook)
    totals = []
    try:
        for _ in range(steps):
            current.clear()
            t = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t)
            per_step.append(dict(current))
    finally:
        remove()
    mid = sorted(range(steps), key=totals.__getitem__)[steps // 2]  # the median step, decomposed consistently
    return per_step[mid], totals[mid]


def profile_table(model, case, times, step_time):
    """The paper's Table 2 in time: per layer type, forward and backward ms, share of the step, share of MACs."""
    from tinyconv import counting
    layer_counts = counting.count_layers(model)
    macs = {}
    for lc in layer_counts:
        macs[lc.type] = macs.get(lc.type, 0) + lc.macs
    total_macs = sum(macs.values())
    types = {}
    for layer in model.layers:
        t = types.setdefault(layer.type_label, [0.0, 0.0, 0])
        t[0] += times.get(("forward", layer.name), 0.0)
        t[1] += times.get(("backward", layer.name), 0.0)
        t[2] += 1
    in_layers = sum(f + b for f, b, _ in types.values())
    rows = []
    for label, (f, b, n) in sorted(types.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        m = macs.get(label, 0) * case.batch
        rate = f"{2 * m / f / 1e9:.0f} / {4 * m / b / 1e9:.0f}" if m and f > 0 and b > 0 else "-"
        rows.append([label, n, h.fmt_ms(f), h.fmt_ms(b), h.fmt_ms(f + b), f"{100 * (f + b) / step_time:.1f}%",
                     f"{100 * macs.get(label, 0) / total_macs:.1f}%", rate])
    outside = step_time - in_layers
    rows.append(["(outside layers: loss, zero_grad, SGD step, hooks)", "-", "-", "-", h.fmt_ms(outside),
                 f"{100 * outside / step_time:.1f}%", "0.0%", "-"])
    rows.append(["**training step**", len(model.layers), "-", "-", h.fmt_ms(step_time), "100%", "100%",
                 f"{6 * total_macs * case.batch / step_time / 1e9:.0f} (whole step)"])
    return h.markdown_table(["layer type", "layers", "fwd ms", "bwd ms", "total ms", "share of time",
                             "share of mult-adds", "GFLOP/s fwd / bwd"], rows)


# --- separable blocks against standard convs --------------------------------------------------------------------

def blocks(model, case, repeats, warmup):
    """Each distinct separable block: measured time ratio to a standard 3x3 conv, next to 1/N + 1/D_K^2."""
    from tinyconv import Conv2D, counting
    shapes = {layer.name: s_in for layer, s_in, _ in model.layer_shapes()}
    layers = {layer.name: layer for layer in model.layers}
    rng = np.random.default_rng(1)
    groups = {}
    for b in counting.separable_blocks(model):
        key = (shapes[b.depthwise], b.n, b.stride)
        groups.setdefault(key, []).append(b)
    rows = []
    for (s_in, n_out, stride), bs in groups.items():
        b = bs[0]
        dw, pw = layers[b.depthwise], layers[b.pointwise]
        std = Conv2D(b.m, n_out, b.d_k, stride=stride, padding="same", rng=rng)
        x = rng.standard_normal((case.batch, *s_in), dtype=np.float32)
        dy = rng.standard_normal((case.batch, *b.d_f, n_out), dtype=np.float32)

        def sep_fwd():
            return pw.forward(dw.forward(x, True), True)

        def sep_train():
            sep_fwd()
            dw.backward(pw.backward(dy))

        def std_fwd():
            return std.forward(x, True)

        def std_train():
            std_fwd()
            std.backward(dy)

        med = h.time_interleaved({"sep fwd": sep_fwd, "std fwd": std_fwd, "sep train": sep_train,
                                  "std train": std_train}, repeats=repeats, warmup=warmup, min_sample=0.0)
        dw.zero_grad()
        pw.zero_grad()
        theory = float(b.identity)
        fwd_ratio = med["sep fwd"] / med["std fwd"]
        train_ratio = med["sep train"] / med["std train"]
        sep_flops = 2.0 * b.separable_macs * case.batch
        std_flops = 2.0 * b.standard_macs * case.batch
        names = [x.depthwise.replace("conv_dw_", "") for x in bs]
        rows.append([", ".join(names), f"{s_in[0]}x{s_in[1]}x{b.m}->{n_out} s{stride[0]}",
                     f"{theory:.4f}", f"{fwd_ratio:.3f}", f"{train_ratio:.3f}",
                     f"{1 / theory:.1f}x", f"{1 / fwd_ratio:.1f}x / {1 / train_ratio:.1f}x",
                     f"{sep_flops / med['sep fwd'] / 1e9:.0f}", f"{std_flops / med['std fwd'] / 1e9:.0f}",
                     h.fmt_ms(med["sep fwd"]), h.fmt_ms(med["std fwd"]), h.fmt_ms(med["sep train"]),
                     h.fmt_ms(med["std train"])])
    return h.markdown_table(
        ["block", "input -> N, stride", "MACs ratio 1/N+1/9", "time ratio fwd", "time ratio fwd+bwd",
         "MACs saving", "time saving fwd / fwd+bwd", "sep GFLOP/s fwd", "std GFLOP/s fwd", "sep fwd ms",
         "std fwd ms", "sep fwd+bwd ms", "std fwd+bwd ms"], rows)


# --- subprocesses: memory, cold compile, warm start ------------------------------------------------------------

def _child(args):
    return [sys.executable, "-m", MODULE, *args]


def _run_child(args, env=None, timeout=600):
    res = subprocess.run(_child(args), capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_mib(field):
    """A memory line of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_mib():
    """This process's peak resident memory. ``ru_maxrss`` would do, except that Linux carries it over ``execve``
    from the forking parent (a child would report the benchmark's own size); VmHWM belongs to this image alone."""
    hwm = _status_mib("VmHWM")
    return min(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory_child(engine, case_name, layout):
    """In a fresh process: build one engine's model and batch, run one step on 2 images (one-time set-up), then
    3 steps on the full batch; print the resident sizes and peaks (MiB) as JSON."""
    case = case_by_name(case_name)
    x, y = batch(case)
    small = SETUP_IMAGES
    if engine == "ours":
        from tinyconv.fold import fold_batchnorm
        h.set_threads()
        model = build_ours(case)
        if layout == FOLDED:  # for ours, 'layout' names the variant
            model = fold_batchnorm(model)
        make_step = functools.partial(ours_step, model, case)
        setup, step = make_step(x[:small].copy(), y[:small].copy()), make_step(x, y)
    else:
        import torch
        from bench.torch_mobilenet import fold_batchnorm, mobilenet_v1 as torch_mobilenet
        h.set_threads(torch)
        tm = torch_mobilenet(alpha=case.alpha, resolution=case.resolution, classes=case.classes,
                             in_channels=case.in_channels, dropout=case.dropout)
        if layout != "NCHW":
            tm = tm.to(memory_format=torch.channels_last)
        if layout == FOLDED:
            tm = fold_batchnorm(tm).to(memory_format=torch.channels_last)
            layout = "channels_last"  # its input
        xts, yt = torch_inputs(torch, x, y)
        xs, ys = torch_inputs(torch, x[:small].copy(), y[:small].copy())
        setup, step = torch_step(torch, tm, case, xs[layout], ys), torch_step(torch, tm, case, xts[layout], yt)
    before = _status_mib("VmRSS")
    setup()  # one-time costs: our kernels loaded from the JIT cache, BLAS and thread buffers, PyTorch's first call
    set_up = _status_mib("VmRSS")
    setup_peak = _peak_mib()
    _reset_peak()
    for _ in range(3):
        step()
    steps_peak = _peak_mib()
    print(json.dumps(dict(before=before, set_up=set_up, peak=max(setup_peak, steps_peak), steps_peak=steps_peak)))


def _reset_peak():
    """Reset this process's VmHWM to its current resident size (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory(case, layout, variant="plain"):
    """(ours, torch) dicts {before, peak} in MiB, each engine measured in its own subprocess: torch in ``layout``,
    ours as ``variant`` ('plain' or folded)."""
    return tuple(_run_child(["--child", "memory", engine, case.name, how])
                 for engine, how in (("ours", variant), ("torch", layout)))


def _kernel_modules():
    import importlib
    import pkgutil
    import kernels
    return [importlib.import_module(f"kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)
            if not m.name.startswith("_") and m.name not in ("geometry", "warmup")]


def cold_child():
    """Every first call of :mod:`kernels.warmup` in float32, in this one process, with an empty cache: the serial
    and the parallel build of each size-dispatched kernel; print per-call seconds as JSON."""
    import numba
    from kernels import warmup
    from kernels._jit import SizedKernel
    start = time.perf_counter()
    times = warmup.run(dtype=np.float32)
    total = time.perf_counter() - start
    public, dispatchers, compiled = set(), 0, 0
    for mod in _kernel_modules():
        for attr, obj in vars(mod).items():
            if isinstance(obj, SizedKernel):  # serial and parallel builds; small inputs use only the serial one
                dispatchers += 2
                compiled += bool(obj.serial.signatures) + bool(obj.parallel.signatures)
            elif isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == mod.__name__:
                if obj.targetoptions.get("inline") == "always":
                    continue  # compiled inside its callers only, never on its own
                dispatchers += 1
                compiled += bool(obj.signatures)
            elif callable(obj) and not attr.startswith("_") and getattr(obj, "__module__", "") == mod.__name__ \
                    and not isinstance(obj, type):
                public.add(attr)
    print(json.dumps(dict(total=total, times=times, dispatchers=dispatchers, compiled=compiled,
                          missed=sorted(public - set(times)))))


def cold_compile():
    """Run :func:`cold_child` with NUMBA_CACHE_DIR in an empty temporary directory."""
    with tempfile.TemporaryDirectory(prefix="tinyconv-numba-cold-") as cache:
        return _run_child(["--child", "cold"], env={**os.environ, "NUMBA_CACHE_DIR": cache})


def cold_precompile():
    """Seconds from launch to exit of ``python -m tinyconv.precompile`` (one process per core, float32) with
    NUMBA_CACHE_DIR in an empty temporary directory, and its own report line."""
    with tempfile.TemporaryDirectory(prefix="tinyconv-numba-cold-") as cache:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "tinyconv.precompile"], capture_output=True, text=True,
                             env={**os.environ, "NUMBA_CACHE_DIR": cache}, timeout=600)
        wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"python -m tinyconv.precompile failed:\n{res.stderr[-3000:]}")
    return wall, res.stdout.strip().splitlines()[-1]


def warm_child():
    """Report seconds since the parent's launch time at each milestone up to the end of the second step."""
    t0 = float(os.environ["BENCH_T0"])
    marks = {"interpreter + numpy": time.time() - t0}
    import models  # noqa: F401  (imports tinyconv and numba)
    from tinyconv.threads import set_threads
    set_threads(h.THREADS)
    marks["imports (tinyconv, numba)"] = time.time() - t0
    case = WARM_START_CASE
    step = ours_step(build_ours(case), case, *batch(case))
    marks["model built"] = time.time() - t0
    step()
    marks["first training step done"] = time.time() - t0
    t = time.time()
    step()
    marks["(a second step takes)"] = time.time() - t
    print(json.dumps(marks))


def warm_start():
    """Time from launching a process to the end of its first training step, kernels cached on disk."""
    _run_child(["--child", "warm"], env={**os.environ, "BENCH_T0": str(time.time())})  # make sure the cache is hot
    return _run_child(["--child", "warm"], env={**os.environ, "BENCH_T0": str(time.time())})


# --- main --------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = h.parser(MODULE, "End-to-end MobileNet speed, memory, profile and JIT against PyTorch.", DEFAULT_OUT,
                 DEFAULT_REPEATS)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        {"memory": memory_child, "cold": cold_child, "warm": warm_child}[kind](*rest)
        return 0
    repeats = args.repeats or (3 if args.quick else DEFAULT_REPEATS)
    warmup = 1 if args.quick else 2
    cases = [c for c in (QUICK_CASES if args.quick else CASES) if h.selected(c.name, args.case)]
    if not cases:
        print(f"no case matches --case {' '.join(args.case)}; cases: {[c.name for c in CASES]}", file=sys.stderr)
        return 2
    steps = 3 if args.quick else 5
    sections, headline, results, profiles = [], [], [], []
    blocks_table = None
    load_at_start = os.getloadavg()
    print(f"Load average at start: {', '.join(f'{v:.1f}' for v in load_at_start)}; starting the workers", flush=True)
    with h.Worker("tinyconv") as tc, h.Worker("torch") as tw:
        start = time.perf_counter()
        cpu = h.CpuShare([tc.pid, tw.pid])
        print("\n" + " | ".join(SPEED_HEADERS))
        for case in cases:
            r = speed((tc, tw), case, repeats, warmup)
            results.append(r)
            print(" | ".join(speed_row(r)), flush=True)
            if case.mode == "train":  # the worker still holds this case's model: profile it, and its blocks
                table = tc.call(ours_profile, steps)
                profiles.append((case, table))
                print(f"\nprofile {case.name}\n{table}", flush=True)
                if blocks_table is None:
                    blocks_table = (case, tc.call(ours_blocks, 3, 1))
                    print(f"\nblocks\n{blocks_table[1]}", flush=True)
            if case.target is not None:
                folded = " (folded)" if r["ours_best"] == FOLDED else ""
                headline.append([f"{case.name} img/s", f"{case.batch / r['ours']:.1f}{folded}",
                                 f"{case.batch / r['torch'][r['best']]:.1f} ({_torch_label(r['best'])})",
                                 f"{h.fmt_ratio(r['ratio'])} (fastest {h.fmt_ratio(r['fastest_ratio'])})",
                                 h.fmt_ratio(r["ceiling"]), f">= {case.target:g}x",
                                 h.verdict(r["ratio"], case.target)])
        header = h.machine_header([tc, tw], load_at_start)
    header.append(f"Each engine {h.THREADS} threads in its own worker process; medians of {repeats} interleaved "
                  f"repeats (ours, torch NCHW, torch channels_last, and for inference both engines with batch "
                  f"norm folded: one step each in turn, {SETTLE * 1e3:g} ms "
                  f"apart, the other engine's worker paused meanwhile) after {warmup} warm-up steps; float32; "
                  f"SGD lr {LR} momentum {MOMENTUM}")
    print("\n" + "\n".join(header), flush=True)
    sections.append("## Speed: images/s, ours against PyTorch on identical weights\n\n"
                    "*torch/ours* > 1 means ours is faster (ratio of PyTorch's best layout's median time to our "
                    "best); inference runs each engine as built and with batch norm folded into the convolutions "
                    "(*folded*: ours `tinyconv.fold.fold_batchnorm`, whose depthwise kernels also add the bias and "
                    "apply the ReLU on each output row; PyTorch `torch.nn.utils.fusion.fuse_conv_bn_eval`, "
                    "channels_last, its ReLU a pass of its own), and the ratio takes each engine's best; "
                    "*fastest torch/ours*: the same for each side's fastest sample, what each engine does when "
                    "the shared machine leaves it alone (the medians are the figures of record); "
                    "validation at each case's shape before timing. Each engine runs in its own persistent "
                    "process (tinyconv's never imports torch); PyTorch's model holds our weights, copied over the "
                    "pipe.\n\n"
                    "*GEMM floor*: the matrix products the step cannot do without (the input layer's im2col GEMM, "
                    "every 1x1 conv's and the classifier's; for training also each one's weight gradient and, "
                    "but for the first layer, its input gradient) as bare NumPy GEMMs into preallocated outputs, "
                    "timed in the tinyconv worker after the steps, as many samples as they had, with the same "
                    "pause between samples but never the first call after the worker resumes, which this VM "
                    "runs slower and every step sample above makes. No engine whose 1x1 convs run on "
                    "this BLAS steps faster, so *torch/floor* is the highest ratio such an engine could reach "
                    "if everything else (batch norm, depthwise, activations, the optimizer, Python) took no time; "
                    "*left beside the GEMMs at the target* is PyTorch's time over the target minus the floor: "
                    "the time everything else may take for the target to be met, against *ours beyond the "
                    "GEMMs*. The products share three buffers, so more operands sit in cache than in a real "
                    "step: the floor is if anything low, and the ceiling high.\n\n"
                    + h.markdown_table(SPEED_HEADERS, [speed_row(r) for r in results]))

    mem_rows = []
    for r in results:
        ours_m, torch_m = memory(r["case"], r["best"], r["ours_best"])
        ours_setup, torch_setup = ours_m["set_up"] - ours_m["before"], torch_m["set_up"] - torch_m["before"]
        ours_step_m = ours_m["steps_peak"] - ours_m["set_up"]
        torch_step_m = torch_m["steps_peak"] - torch_m["set_up"]
        mem_rows.append([r["case"].name, f"{ours_m['peak']:.0f}", f"{ours_setup:.0f}", f"{ours_step_m:.0f}",
                         f"{torch_m['peak']:.0f} ({_torch_label(r['best'])})", f"{torch_setup:.0f}",
                         f"{torch_step_m:.0f}",
                         h.fmt_ratio(torch_step_m / ours_step_m if min(ours_step_m, torch_step_m) >= 1 else None)])
        print(f"memory {r['case'].name}: ours peak {ours_m['peak']:.0f} MiB (set-up +{ours_setup:.0f}, "
              f"steps +{ours_step_m:.0f}), torch {torch_m['peak']:.0f} MiB (+{torch_setup:.0f}, "
              f"+{torch_step_m:.0f})", flush=True)
        if r["case"].mode == "train":
            headline.append([f"{r['case'].name} peak memory of the steps (MiB)", f"{ours_step_m:.0f}",
                             f"{torch_step_m:.0f}", h.fmt_ratio(torch_step_m / ours_step_m), "-",
                             "ours <= torch", "met" if ours_step_m <= torch_step_m else "MISSED"])
    sections.append("## Peak memory (MiB), each engine alone in a fresh process\n\n"
                    "Method: the kernel's resident high-water mark (VmHWM in /proc/self/status, the figure "
                    "`ru_maxrss` reports, but without the forking parent's size that `ru_maxrss` inherits across "
                    "`execve`). Each process first runs one step on a batch of "
                    f"{SETUP_IMAGES} images: one-time set-up (our kernels loaded from the JIT cache, BLAS and "
                    "thread buffers; PyTorch's first-call initialization), shown as *set-up*, the resident size "
                    "it adds. The high-water mark is then reset (`/proc/self/clear_refs`) and 3 steps on the full "
                    "batch run: *steps* is their peak minus the resident size at the reset, the memory a "
                    "training step of this batch needs (activations kept for the backward, gradients, "
                    "temporaries, the optimizer's state on its first step). *peak* is the process's peak over "
                    "both (the torch process also has tinyconv and numba imported, as it builds from the same "
                    "table). With the benchmark's malloc settings freed memory stays mapped, so a peak is the "
                    "allocator's high-water mark.\n\n"
                    + h.markdown_table(["case", "ours peak", "ours set-up", "ours steps", "torch peak",
                                        "torch set-up", "torch steps", "torch/ours (steps)"], mem_rows))

    for case, table in profiles:
        sections.append(f"## Where the time goes: {case.name} (hooks; the median of {steps} steps; with hooks "
                        f"the backward pass runs data-parallel, never split)\n\n{table}")
    if blocks_table is not None:
        case, table = blocks_table
        sections.append(f"## Depthwise-separable blocks against standard 3x3 convs: {case.name}\n\n"
                        "Conv layers only (BN and ReLU excluded on both sides, as in the mult-add count); time "
                        "ratio = separable / standard, to compare with the mult-add ratio 1/N + 1/D_K^2. Identical "
                        "blocks are measured once. Both sides are ours, in the tinyconv worker.\n\n" + table)

    jit_lines = []
    if args.quick:
        jit_lines.append("Cold compile: skipped (--quick)")
    else:
        cold = cold_compile()
        slowest = sorted(cold["times"].items(), key=lambda kv: -kv[1])[:5]
        jit_lines.append(f"Cold compile in one process (empty NUMBA_CACHE_DIR, the {len(cold['times'])} float32 "
                         f"first calls of kernels.warmup, {cold['compiled']}/{cold['dispatchers']} jitted "
                         f"functions compiled): {cold['total']:.1f} s; slowest: "
                         + ", ".join(f"{n} {s:.1f} s" for n, s in slowest)
                         + (f"; not exercised: {', '.join(cold['missed'])}" if cold["missed"] else ""))
        pre_wall, pre_line = cold_precompile()
        jit_lines.append(f"Cold compile with `python -m tinyconv.precompile` (empty NUMBA_CACHE_DIR, the same first "
                         f"calls on a pool of {os.cpu_count()} processes, what `scripts/setup` runs), launch to "
                         f"exit: {pre_wall:.1f} s; its report: {pre_line}")
        headline.append(["cold compile of every kernel (s): `python -m tinyconv.precompile`; in one process",
                         f"{pre_wall:.1f}; {cold['total']:.1f}", "-", "-", "-", "< 45 s",
                         "met" if pre_wall < 45 else "MISSED"])
    warm = warm_start()
    first = warm["first training step done"]
    jit_lines.append(f"Warm start ({WARM_START_CASE.name}, cache populated): process launch to first training "
                     f"step done {first:.2f} s (" + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()) + ")")
    headline.append(["warm start to first training step (s)", f"{first:.2f}", "-", "-", "-", "< 2 s",
                     "met" if first < 2 else "MISSED"])
    for line in jit_lines:
        print(line, flush=True)
    sections.append("## JIT\n\n" + "\n\n".join(jit_lines))

    elapsed = time.perf_counter() - start
    cpu_line = cpu.line()
    print(cpu_line)
    head = h.markdown_table(["target", "ours", "torch", "torch/ours (medians)", "ceiling (torch / GEMM floor)",
                             "target", ""], headline)
    print("\n" + head)
    h.write_results(args.out, "Model benchmarks: MobileNet v1, tinyconv against PyTorch CPU", MODULE,
                    header + [f"Total run time {elapsed:.0f} s", cpu_line],
                    ["## Headline (ratios in this one run; medians)\n\n" + head, *sections])
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    from bench.model import main as _main  # the module by its name: its classes pickle to the workers
    sys.exit(_main())
