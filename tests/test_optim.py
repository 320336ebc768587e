"""Optimizers against PyTorch's (SGD, AdamW) and a written-out TF 1 RMSProp; schedules; state round trips."""
import math

import numpy as np
import pytest

from tinyconv.optim import SGD, Adam, LRSchedule, RMSProp, decays, make_optimizer


def _params(seed=0, dtype=np.float64):
    """A kernel (decayed) and a bias (never decayed) with gradients."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 3, 2, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    return [("conv/kernel", w, np.zeros_like(w)), ("conv/bias", b, np.zeros_like(b))]


def _grads(params, rng):
    for _, p, g in params:
        g[...] = rng.standard_normal(p.shape)


def _run(opt, params, steps=5, seed=1, lrs=None):
    rng = np.random.default_rng(seed)
    for t in range(steps):
        _grads(params, rng)
        if lrs is not None:
            opt.lr = lrs[t]
        opt.step()
    return {n: p.copy() for n, p, _ in params}




def _torch_run(make, params, steps=5, seed=1, lrs=None):
    torch = pytest.importorskip("torch")
    tensors = {n: torch.tensor(p.copy(), requires_grad=True) for n, p, _ in params}
    decay = [t for n, t in tensors.items() if t.ndim >= 2]
    no_decay = [t for n, t in tensors.items() if t.ndim < 2]
    opt = make(torch, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    rng = np.random.default_rng(seed)
    for t in range(steps):
        for n, p, _ in params:
            tensors[n].grad = torch.tensor(rng.standard_normal(p.shape))
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_torch(nesterov):
    lrs = [0.1, 0.05, 0.2, 0.01, 0.1]
    params = _params()
    expected = _torch_run(lambda torch, groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=nesterov,
                                                                weight_decay=5e-4 * 100), params, lrs=lrs)
    got = _run(SGD(params, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4 * 100), params, lrs=lrs)
    for n in got:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-12, atol=1e-12, err_msg=n)


def test_adam_matches_torch_adamw():
    lrs = [1e-2, 5e-3, 2e-2, 1e-3, 1e-2]
    params = _params()
    expected = _torch_run(lambda torch, groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.5), params,
                          lrs=lrs)
    got = _run(Adam(params, lr=1e-2, weight_decay=0.5), params, lrs=lrs)
    for n in got:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-10, atol=1e-12, err_msg=n)


def test_rmsprop_matches_tf1_formula():
    params = _params()
    ref = {n: p.copy() for n, p, _ in params}
    ms = {n: np.ones_like(p) for n, p, _ in params}
    mom = {n: np.zeros_like(p) for n, p, _ in params}
    rng = np.random.default_rng(1)
    for _ in range(5):
        for n, p, _ in params:
            g = rng.standard_normal(p.shape) + (0.01 * ref[n] if p.ndim >= 2 else 0.0)
            ms[n] = 0.9 * ms[n] + 0.1 * g * g
            mom[n] = 0.9 * mom[n] + 0.045 * g / np.sqrt(ms[n] + 1.0)
            ref[n] = ref[n] - mom[n]
    got = _run(RMSProp(params, lr=0.045, weight_decay=0.01), params)
    for n in got:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-12, err_msg=n)


def test_weight_decay_skips_bn_and_bias():
    assert decays(np.zeros((3, 3, 1, 2))) and decays(np.zeros((4, 5)))
    assert not decays(np.zeros(5))
    for kind in ("sgd", "rmsprop", "adam"):
        params = _params()
        b0 = params[1][1].copy()
        opt = make_optimizer(kind, params, lr=0.1, weight_decay=1.0)
        opt.step()  # zero gradients: only decay could move a parameter
        np.testing.assert_array_equal(params[1][1], b0)
        assert not np.array_equal(params[0][1], _params()[0][1]), kind


def test_float32_stays_float32_and_state_round_trips():
    a, b = _params(dtype=np.float32), _params(dtype=np.float32)
    opt_a = SGD(a, lr=0.1, weight_decay=1e-3)
    _run(opt_a, a, steps=3)
    assert all(p.dtype == np.float32 for _, p, _ in a)
    for (_, pa, _), (_, pb, _) in zip(a, b):
        pb[...] = pa
    opt_b = SGD(b, lr=0.1, weight_decay=1e-3)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.steps == 3
    _run(opt_a, a, steps=2, seed=7)
    _run(opt_b, b, steps=2, seed=7)
    for (_, pa, _), (_, pb, _) in zip(a, b):
        np.testing.assert_array_equal(pa, pb)


def test_load_state_rejects_mismatch():
    opt = Adam(_params(), lr=1e-3)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "conv/bias/m"})
    with pytest.raises(ValueError, match="wrong shapes"):
        opt.load_state_dict({**state, "conv/bias/m": np.zeros(5)})
    with pytest.raises(ValueError, match="NaN"):
        opt.load_state_dict({**state, "conv/bias/v": np.full(4, np.nan)})


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr=-1), dict(lr=float("nan")), dict(lr=0.1, momentum=1.0),
                                 dict(lr=0.1, weight_decay=-1)])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError):
        SGD(_params(), **bad)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lamb", _params(), lr=0.1)


def test_schedules():
    cos = LRSchedule("cosine", lr=0.1, total_steps=110, warmup_steps=10)
    assert [cos(s) for s in range(3)] == pytest.approx([0.01, 0.02, 0.03])
    assert cos(9) == pytest.approx(0.1) and cos(10) == pytest.approx(0.1)
    assert cos(60) == pytest.approx(0.05)
    assert cos(110) == pytest.approx(0.0, abs=1e-12)
    lrs = [cos(s) for s in range(10, 110)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    step = LRSchedule("step", lr=1.0, total_steps=100)
    assert (step(49), step(50), step(75)) == pytest.approx((1.0, 0.1, 0.01))
    assert LRSchedule("constant", lr=0.3, total_steps=5, warmup_steps=2)(3) == 0.3
    with pytest.raises(ValueError, match="schedule must be one of"):
        LRSchedule("linear", lr=0.1, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule("cosine", lr=0.1, total_steps=10, warmup_steps=11)
    assert math.isfinite(LRSchedule("cosine", lr=0.1, total_steps=1, warmup_steps=1)(0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_kernel_is_bitwise_the_numpy_formula(dtype, nesterov):
    """Contiguous parameters go through kernels.optim.sgd_update, others through the NumPy formula: after several
    steps with a changing lr, both give the same bits (same operations, same order, same rounding)."""
    rng = np.random.default_rng(1)
    values = [rng.standard_normal((3, 3, 4, 8)), rng.standard_normal((6, 5)), rng.standard_normal(8)]
    grads = [rng.standard_normal(v.shape).astype(dtype) for v in values]
    fast = [v.astype(dtype) for v in values]
    slow = [np.asfortranarray(v.astype(dtype)) if v.ndim > 1 else v.astype(dtype)[::-1].copy()[::-1] for v in values]
    slow_grads = [np.asfortranarray(g) if g.ndim > 1 else g[::-1].copy()[::-1] for g in grads]
    assert all(s.ndim == 1 or not s.flags.c_contiguous for s in slow)
    opts = [SGD([(f"p{i}", p, g) for i, (p, g) in enumerate(zip(ps, gs))], lr=0.1, momentum=0.9, nesterov=nesterov,
                weight_decay=5e-4) for ps, gs in ((fast, grads), (slow, slow_grads))]
    for step in range(4):
        for opt in opts:
            opt.lr = 0.1 / (step + 1)
            opt.step()
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_sgd_kernel_rejects_mismatched_arrays():
    from kernels.optim import sgd_update
    p = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="share shape and dtype"):
        sgd_update(p, np.zeros((3, 2), np.float32), np.zeros_like(p), lr=0.1, momentum=0.9, weight_decay=0.0,
                   nesterov=True)
    with pytest.raises(ValueError, match="C-contiguous"):
        sgd_update(p, np.zeros((3, 2), np.float32).T, np.zeros_like(p), lr=0.1, momentum=0.9, weight_decay=0.0,
                   nesterov=True)


def _packed_and_plain(dtype):
    """The same small network twice: as Sequential packs it (parameters and gradients end to end), and with every
    array replaced by a copy of its own, so the optimizer takes one call per array."""
    from tinyconv import Sequential
    from tinyconv.layers import BatchNormAct, Conv2D, GlobalAvgPool2D, Linear

    def build():
        rng = np.random.default_rng(3)
        return Sequential([Conv2D(2, 4, 3, name="conv", rng=rng, dtype=dtype), BatchNormAct(4, name="bn", dtype=dtype),
                           GlobalAvgPool2D(name="pool"), Linear(4, 3, name="fc", rng=rng, dtype=dtype)],
                          input_shape=(5, 5, 2))
    packed, plain = build(), build()
    for layer in plain.layers:
        for k in layer.params:
            layer.params[k], layer.grads[k] = layer.params[k].copy(), layer.grads[k].copy()
    return packed, plain


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_one_call_over_a_packed_model_is_bitwise_one_call_per_array(dtype, nesterov):
    """A packed model's step is one kernel call over all its parameters, with each array's own weight decay (the
    kernel and the dense matrix decay, gamma, beta and the bias do not): the same bits as one call per array,
    parameters and momentum buffers, and the state saves and loads by name either way."""
    from kernels import optim as optim_k
    packed, plain = _packed_and_plain(dtype)
    opts = [SGD(m.named_parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
            for m in (packed, plain)]
    assert opts[0]._flat is not None and opts[1]._flat is None
    # small pieces, so that the decayed and undecayed arrays are cut into several each
    opts[0]._layout = optim_k.pieces([p.size for _, p, _ in opts[0].params],
                                     [opts[0]._decay[n] for n, _, _ in opts[0].params], dtype, piece=7)
    rng = np.random.default_rng(4)
    for step in range(4):
        grads = [rng.standard_normal(p.shape) for _, p, _ in opts[0].params]
        for opt in opts:
            for (_, _, g), value in zip(opt.params, grads):
                g[...] = value
            opt.lr = 0.1 / (step + 1)
            opt.step()
    for (name, a, _), (_, b, _) in zip(opts[0].params, opts[1].params):
        np.testing.assert_array_equal(a, b, err_msg=name)
    state = opts[0].state_dict()
    for key, value in opts[1].state_dict().items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    fresh = SGD(packed.named_parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    fresh.load_state_dict(opts[1].state_dict())
    assert fresh._flat is not None and fresh.steps == 4
    np.testing.assert_array_equal(fresh._flat_state["momentum"], opts[0]._flat_state["momentum"])


def test_pieces_cut_each_array_and_carry_its_decay():
    from kernels.optim import pieces
    starts, stops, wds = pieces([5, 0, 3], [0.5, 0.25, 0.0], np.float32, piece=2)
    assert starts.tolist() == [0, 2, 4, 5, 7] and stops.tolist() == [2, 4, 5, 7, 8]
    assert wds.dtype == np.float32 and wds.tolist() == [0.5, 0.5, 0.5, 0.0, 0.0]


def test_sgd_kernel_rejects_a_layout_that_does_not_fit():
    from kernels.optim import pieces, sgd_update
    p = np.zeros(6, np.float32)
    for layout, why in ((pieces([7], [0.0], np.float32), "past the end"),
                        (pieces([6], [0.0], np.float64), "wrong dtype"),
                        ((np.array([0]), np.array([6, 6]), np.zeros(1, np.float32)), "mismatched lengths"),
                        ((np.array([4]), np.array([2]), np.zeros(1, np.float32)), "backwards piece")):
        with pytest.raises(ValueError, match="layout does not fit"):
            sgd_update(p, p.copy(), p.copy(), lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True, layout=layout)
