"""The backward pass on split cores: input gradients here, parameter gradients on a worker thread.

Each layer's ``backward_split`` must give what its ``backward`` gives, the split pass of a whole network what the
data-parallel one gives, and the thread counts must come back whatever happens (tinyconv.threads.CoreSplit).
"""
import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import models
import tinyconv.sequential as sequential
from kernels import _jit
from tinyconv import (BatchNormAct, Conv2D, DepthwiseConv2D, Linear, PointwiseConv2D, ReLU, Sequential,
                      SoftmaxCrossEntropy)
from tinyconv import threads
from tinyconv.optim import SGD


def blas_threads():
    return [c.num_threads for c in threads._blas()]


@pytest.fixture
def force_split(monkeypatch):
    """Split whatever the machine's thread count (on one core the two threads take turns)."""
    monkeypatch.setattr(sequential, "can_split", lambda: True)


def _layer_cases(dtype):
    rng = np.random.default_rng(0)
    return [
        (Conv2D(3, 8, 3, stride=2, padding="same", use_bias=True, rng=rng, dtype=dtype), (2, 9, 9, 3)),  # keeps cols
        (Conv2D(4, 3, 3, stride=1, padding="valid", rng=rng, dtype=dtype), (2, 7, 6, 4)),  # rebuilds them
        (DepthwiseConv2D(5, 3, stride=1, padding="same", use_bias=True, rng=rng, dtype=dtype), (2, 8, 8, 5)),
        (DepthwiseConv2D(5, 3, stride=2, padding="same", rng=rng, dtype=dtype), (2, 9, 9, 5)),
        (PointwiseConv2D(6, 4, use_bias=True, rng=rng, dtype=dtype), (2, 3, 5, 6)),
        (Linear(7, 3, rng=rng, dtype=dtype), (4, 7)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(6))
def test_each_layers_split_gives_the_bits_of_its_backward(dtype, case):
    layer, shape = _layer_cases(dtype)[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal((shape[0], *layer.output_shape(shape[1:]))).astype(dtype)
    layer.forward(x, training=True)
    dx = layer.backward(dy)
    grads = {k: g.copy() for k, g in layer.grads.items()}
    layer.zero_grad()
    layer.forward(x, training=True)
    dx_split, job = layer.backward_split(dy)
    assert all(not g.any() for g in layer.grads.values()), "parameter gradients belong to the job"
    job()
    np.testing.assert_array_equal(dx_split, dx)
    for k in grads:
        np.testing.assert_array_equal(layer.grads[k], grads[k], err_msg=k)


def test_depthwise_split_applies_the_deferred_batch_norm_in_its_weight_gradient():
    """With a batch norm's pass deferred into it, the job recomputes the normalized rows exactly as backward does."""
    rng = np.random.default_rng(3)
    bn = BatchNormAct(6, "relu6")
    bn.params["gamma"][:] = rng.uniform(0.5, 1.5, 6)
    bn.params["beta"][:] = rng.normal(0, 0.3, 6)
    dw = DepthwiseConv2D(6, 3, stride=1, padding="same", rng=rng)
    x = rng.standard_normal((2, 8, 8, 6)).astype(np.float32)
    dy = rng.standard_normal((2, 8, 8, 6)).astype(np.float32)
    results = []
    for split in (False, True):
        dw.zero_grad()
        dw.forward(x, training=True, in_pass=bn.forward_deferred(x))
        if split:
            dx, job = dw.backward_split(dy)
            job()
        else:
            dx = dw.backward(dy)
        results.append((dx, dw.grads["depthwise_kernel"].copy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_layers_without_a_weight_gradient_of_their_own_have_no_job():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3))
    dy = rng.standard_normal((2, 4, 4, 3))
    for layer in (ReLU(), BatchNormAct(3, dtype=np.float64)):
        layer.forward(x, training=True)
        dx, job = layer.backward_split(dy)
        assert job is None and dx.shape == x.shape


def _three_steps(model, x, labels):
    opt = SGD(model.named_parameters(), lr=0.05, momentum=0.9)
    loss, logits = SoftmaxCrossEntropy(), []
    for _ in range(3):
        model.zero_grad()
        logits.append(model.forward(x, training=True))
        loss.forward(logits[-1], labels)
        dx = model.backward(loss.backward(), need_dx=True)
        opt.step()
    return logits, dx, {n: (p.copy(), g.copy()) for n, p, g in model.named_parameters()}, dict(model.named_buffers())


def _spy_on_splits(monkeypatch, calls):
    """Record the name of every layer whose backward_split runs."""
    for cls in (Conv2D, DepthwiseConv2D, PointwiseConv2D, Linear):
        original = cls.backward_split

        def spy(self, dy, _original=original):
            calls.append(self.name)
            return _original(self, dy)
        monkeypatch.setattr(cls, "backward_split", spy)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_backward_trains_like_the_data_parallel_one(monkeypatch, dtype):
    """Three SGD steps of a MobileNet: logits, input gradient, parameters, gradients and running statistics are
    the same bits, the split pass ran on every layer with parameter gradients, and the thread counts came back.
    The parallel threshold is lowered so that the data-parallel pass runs its kernels on every thread, and the
    batch-norm sums in per-thread chunks, which the split pass must reproduce on one core. BLAS runs on one
    thread in both passes: OpenBLAS rounds some products differently on one thread and on two, which is its
    business, not this pass's (the classifier's weight gradient of a Fashion-MNIST step differs by ~1e-7)."""
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", 1 << 10)
    monkeypatch.setattr(sequential, "can_split", lambda: True)
    blas_one = threadpool_limits(limits=1, user_api="blas")
    try:
        _compare_passes(monkeypatch, dtype)
    finally:
        blas_one.restore_original_limits()


def _compare_passes(monkeypatch, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 32, 32, 1)).astype(dtype)
    labels = rng.integers(0, 10, 4)
    before = numba.get_num_threads(), blas_threads()
    calls = []
    _spy_on_splits(monkeypatch, calls)
    runs = {}
    for split in (False, True):
        model = models.mobilenet_v1(alpha=0.25, resolution=32, classes=10, in_channels=1, dropout=0.0, seed=3,
                                    dtype=dtype)
        model.split_backward = split
        runs[split] = _three_steps(model, x, labels)
        assert (numba.get_num_threads(), blas_threads()) == before
    assert calls == 3 * [layer.name for layer in reversed(model.layers)
                         if isinstance(layer, (Conv2D, DepthwiseConv2D, PointwiseConv2D, Linear))]
    assert len(calls) == 3 * 28  # conv1, 13 depthwise, 13 pointwise, the classifier (dx wanted: conv1 splits too)
    (la, dxa, pa, ba), (lb, dxb, pb, bb) = runs[False], runs[True]
    for a, b in zip(la, lb):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(dxb, dxa)
    for name, (p, g) in pa.items():
        np.testing.assert_array_equal(pb[name][0], p, err_msg=name)
        np.testing.assert_array_equal(pb[name][1], g, err_msg=name)
    for name, v in ba.items():
        np.testing.assert_array_equal(bb[name], v, err_msg=name)


def test_hooks_large_activations_and_the_switch_keep_the_data_parallel_backward(force_split, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 1)).astype(np.float32)
    calls = []
    _spy_on_splits(monkeypatch, calls)
    model = models.mobilenet_v1(alpha=0.25, resolution=32, classes=10, in_channels=1, dropout=0.0, seed=3)

    def run():
        calls.clear()
        model.zero_grad()
        model.forward(x, training=True)
        model.backward(np.full((2, 10), 0.05, np.float32))
        return len(calls)

    largest = 2 * max(int(np.prod(out)) for _, _, out in model.layer_shapes())

    assert run() == 27  # no dx wanted: conv1 runs its whole backward, its weight gradient being all there is
    remove = model.add_hook(lambda phase, layer, event: None)
    assert run() == 0, "hooks time each layer's whole backward"
    remove()
    model.split_backward = False
    assert run() == 0
    model.split_backward = True
    monkeypatch.setattr(sequential, "SPLIT_MAX_ELEMENTS", largest - 1)
    assert run() == 0
    monkeypatch.setattr(sequential, "SPLIT_MAX_ELEMENTS", largest)
    assert run() == 27
    monkeypatch.setattr(sequential, "can_split", lambda: False)
    assert run() == 0


def test_core_split_waits_for_every_job_restores_threads_and_raises_the_first_error():
    before = numba.get_num_threads(), blas_threads()
    done = threading.Event()

    def fail():
        raise ValueError("job failed")

    def slow():
        threading.Event().wait(0.05)
        done.set()

    cores = threads.CoreSplit()
    cores.split()
    assert numba.get_num_threads() == 1 and set(blas_threads()) == {1}
    cores.submit(fail)
    cores.submit(slow)
    with pytest.raises(ValueError, match="job failed"):
        cores.join()
    assert done.is_set(), "join returns only once every job has run"
    assert (numba.get_num_threads(), blas_threads()) == before
    cores.join()  # nothing queued: a no-op


def test_core_split_context_restores_threads_when_the_caller_fails():
    before = numba.get_num_threads(), blas_threads()
    ran = threading.Event()
    with pytest.raises(KeyError):
        with threads.CoreSplit() as cores:
            cores.split()
            cores.submit(ran.set)
            raise KeyError("caller")
    assert ran.is_set()
    assert (numba.get_num_threads(), blas_threads()) == before


def test_backward_without_forward_fails_clearly_on_split_cores_too(force_split):
    model = Sequential([PointwiseConv2D(3, 2, name="pw"), ReLU(name="act")], input_shape=(4, 4, 3))
    before = numba.get_num_threads(), blas_threads()
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        model.backward(np.ones((1, 4, 4, 2)))
    assert (numba.get_num_threads(), blas_threads()) == before


def _on_worker(worker, fn):
    """fn() run on the worker thread: (its result or None, the exceptions it raised)."""
    result, errors = [], []
    worker.submit(lambda: result.append(fn()), errors)
    worker.wait()
    return (result[0] if result else None), errors


def test_worker_thread_runs_numba_on_one_thread_and_is_remade_after_a_fork(monkeypatch):
    worker = threads._grad_worker()
    assert threads._grad_worker() is worker
    assert _on_worker(worker, numba.get_num_threads) == (1, [])
    monkeypatch.setattr(threads, "_worker", worker)  # restored afterwards, with the pid
    monkeypatch.setattr(threads, "_worker_pid", -1)  # as in a forked child, where the parent's thread is gone
    child = threads._grad_worker()
    assert child is not worker
    assert _on_worker(child, numba.get_num_threads) == (1, [])
    result, errors = _on_worker(child, lambda: {}["from the job"])
    assert result is None and [type(e) for e in errors] == [KeyError]
    assert _on_worker(child, lambda: 7) == (7, []), "the worker keeps running after a job fails"
