"""Batch norm kernels against the loop oracle, finite differences and PyTorch; bad input raises."""
import numba
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradcheck import assert_close, check_directional, check_grad
from kernels.batchnorm import batchnorm_backward, batchnorm_forward_eval, batchnorm_forward_train
from oracles_misc import (LAYOUTS, batchnorm_backward_oracle, batchnorm_eval_oracle,  # noqa: F401
                          batchnorm_train_oracle, import_torch, nhwc_cases, numba_threads, one_numba_thread,
                          with_layout)

MOMENTA = st.sampled_from([0.99, 0.9, 0.5, 0.0, 1.0])
EPSILONS = st.sampled_from([1e-3, 1e-5])


def make_case(shape, seed, flat, dtype=np.float64):
    """x with a per-channel offset and scale (so the mean matters), BN parameters and an upstream gradient."""
    rng = np.random.default_rng(seed)
    if flat:
        shape = (shape[0] * shape[1], shape[3])  # (N, C) input, as after a flatten
    c_size = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, c_size) + rng.uniform(-5, 5, c_size)
    params = [rng.standard_normal(c_size), rng.standard_normal(c_size),  # gamma, beta
              rng.standard_normal(c_size), rng.uniform(0.5, 2.0, c_size)]  # running mean, var
    dy = rng.standard_normal(shape)
    return x.astype(dtype), [p.astype(dtype) for p in params], dy.astype(dtype)


@given(case=nhwc_cases(), flat=st.booleans(), momentum=MOMENTA, eps=EPSILONS)
def test_train_float64_matches_oracle_and_finite_differences(case, flat, momentum, eps):
    shape, seed, layout = case
    x, (gamma, beta, running_mean, running_var), dy = make_case(shape, seed, flat)
    xv = with_layout(x, layout)
    rm, rv = running_mean.copy(), running_var.copy()
    y, x_hat, inv_std = batchnorm_forward_train(xv, gamma, beta, rm, rv, momentum=momentum, eps=eps)
    y_o, x_hat_o, inv_std_o, rm_o, rv_o = batchnorm_train_oracle(x, gamma, beta, running_mean, running_var,
                                                                  momentum, eps)
    assert y.dtype == x_hat.dtype == inv_std.dtype == np.float64
    assert_close(y, y_o, rtol=1e-10, name="y")
    assert_close(x_hat, x_hat_o, rtol=1e-10, name="x_hat")
    assert_close(inv_std, inv_std_o, rtol=1e-10, name="inv_std")
    assert_close(rm, rm_o, rtol=1e-10, name="running_mean")
    assert_close(rv, rv_o, rtol=1e-10, name="running_var")

    dx, dgamma, dbeta = batchnorm_backward(with_layout(dy, layout), x_hat, inv_std, gamma)
    dx_o, dgamma_o, dbeta_o = batchnorm_backward_oracle(dy, x, gamma, eps)
    assert_close(dx, dx_o, rtol=1e-8, name="dx")
    assert_close(dgamma, dgamma_o, rtol=1e-9, name="dgamma")
    assert_close(dbeta, dbeta_o, rtol=1e-9, name="dbeta")

    def f():
        return batchnorm_forward_train(xv, gamma, beta, running_mean.copy(), running_var.copy(),
                                       momentum=momentum, eps=eps)[0]

    rng = np.random.default_rng(seed + 1)
    # With m = 2 values per channel batch norm saturates: a small gap between them makes the map strongly curved
    # (a step of 1e-5 is too coarse), a large mean against that gap makes a step of 1e-7 drown in rounding (seen:
    # 1.9402e-5 against 1.9389e-5 exact). One of the two steps resolves each case; a wrong dx fails both.
    try:
        check_directional(f, xv, dy, dx, np.random.default_rng(seed + 2), eps=1e-5, rtol=1e-5, name="dx")
    except AssertionError:
        check_directional(f, xv, dy, dx, np.random.default_rng(seed + 2), eps=1e-7, rtol=1e-5, name="dx")
    check_directional(f, gamma, dy, dgamma, rng, name="dgamma")
    check_directional(f, beta, dy, dbeta, rng, name="dbeta")
    if x.size <= 48 and layout == "contiguous":  # full central differences need a contiguous x
        check_grad(f, xv, dy, dx, rtol=1e-5, name="dx (full)")


@settings(max_examples=40)
@given(case=nhwc_cases(max_batch=2, max_channels=3, max_size=3), eps=EPSILONS)
def test_oracle_backward_matches_finite_differences(case, eps):
    shape, seed, _ = case
    x, (gamma, beta, running_mean, running_var), dy = make_case(shape, seed, flat=False)

    def f():
        return batchnorm_train_oracle(x, gamma, beta, running_mean, running_var, 0.9, eps)[0]

    dx, dgamma, dbeta = batchnorm_backward_oracle(dy, x, gamma, eps)
    check_grad(f, x, dy, dx, rtol=1e-5, name="oracle dx")
    check_grad(f, gamma, dy, dgamma, rtol=1e-5, name="oracle dgamma")
    check_grad(f, beta, dy, dbeta, rtol=1e-5, name="oracle dbeta")


@given(case=nhwc_cases(), flat=st.booleans())
def test_train_float32_matches_float64_oracle(case, flat):
    shape, seed, layout = case
    x, params, dy = make_case(shape, seed, flat, dtype=np.float32)
    gamma, beta, running_mean, running_var = params
    rm, rv = running_mean.copy(), running_var.copy()
    y, x_hat, inv_std = batchnorm_forward_train(with_layout(x, layout), gamma, beta, rm, rv, momentum=0.9)
    assert y.dtype == x_hat.dtype == inv_std.dtype == rm.dtype == np.float32
    y_o, x_hat_o, inv_std_o, rm_o, rv_o = batchnorm_train_oracle(x, gamma, beta, running_mean, running_var,
                                                                  0.9, 1e-3)
    assert_close(y, y_o, rtol=1e-4, atol_floor=1e-5, name="y")
    assert_close(x_hat, x_hat_o, rtol=1e-4, atol_floor=1e-5, name="x_hat")
    assert_close(inv_std, inv_std_o, rtol=1e-5, name="inv_std")
    assert_close(rm, rm_o, rtol=1e-5, atol_floor=1e-6, name="running_mean")
    assert_close(rv, rv_o, rtol=1e-5, atol_floor=1e-6, name="running_var")
    dx, dgamma, dbeta = batchnorm_backward(with_layout(dy, layout), x_hat, inv_std, gamma)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float32
    dx_o, dgamma_o, dbeta_o = batchnorm_backward_oracle(dy, x, gamma, 1e-3)
    assert_close(dx, dx_o, rtol=1e-4, atol_floor=1e-5, name="dx")
    assert_close(dgamma, dgamma_o, rtol=1e-4, atol_floor=1e-5, name="dgamma")
    assert_close(dbeta, dbeta_o, rtol=1e-4, atol_floor=1e-5, name="dbeta")


@given(case=nhwc_cases(), flat=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]), eps=EPSILONS)
def test_eval_matches_oracle_and_uses_running_stats(case, flat, dtype, eps):
    shape, seed, layout = case
    x, (gamma, beta, running_mean, running_var), _ = make_case(shape, seed, flat, dtype=dtype)
    y = batchnorm_forward_eval(with_layout(x, layout), gamma, beta, running_mean, running_var, eps=eps)
    assert y.dtype == dtype
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    assert_close(y, batchnorm_eval_oracle(x, gamma, beta, running_mean, running_var, eps), rtol=rtol, name="y")


def test_single_value_per_channel_has_zero_variance():
    """m = N * H * W = 1: variance 0, x_hat 0, y = beta, dx 0; the running variance decays toward 0."""
    x, (gamma, beta, running_mean, running_var), dy = make_case((1, 1, 1, 5), 3, flat=False)
    rm, rv = running_mean.copy(), running_var.copy()
    y, x_hat, inv_std = batchnorm_forward_train(x, gamma, beta, rm, rv, momentum=0.9, eps=1e-3)
    np.testing.assert_array_equal(x_hat, 0.0)
    np.testing.assert_allclose(y.reshape(-1), beta)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(1e-3))
    np.testing.assert_allclose(rm, 0.9 * running_mean + 0.1 * x.reshape(-1))
    np.testing.assert_allclose(rv, 0.9 * running_var)
    dx, dgamma, dbeta = batchnorm_backward(dy, x_hat, inv_std, gamma)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dgamma, 0.0)
    np.testing.assert_allclose(dbeta, dy.reshape(-1))


def test_float32_variance_is_stable_with_large_mean():
    """A mean 1e4 times the spread: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((64, 32, 32, 4))).astype(np.float32)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    _, _, inv_std = batchnorm_forward_train(x, ones, zeros, zeros.copy(), ones.copy(), eps=1e-3)
    var = x.astype(np.float64).reshape(-1, 4).var(axis=0)
    assert_close(inv_std, 1 / np.sqrt(var + 1e-3), rtol=1e-6, name="inv_std")


def test_checker_rejects_a_wrong_backward():
    """Meta-test: dropping the path through the batch mean must fail the directional check."""
    x, (gamma, beta, running_mean, running_var), dy = make_case((2, 3, 3, 4), 7, flat=False)
    y, x_hat, inv_std = batchnorm_forward_train(x, gamma, beta, running_mean.copy(), running_var.copy())
    dx, dgamma, _ = batchnorm_backward(dy, x_hat, inv_std, gamma)
    wrong = dx + (gamma * inv_std) * dy.reshape(-1, 4).mean(axis=0)  # forgets the -mean(dy) term

    def f():
        return batchnorm_forward_train(x, gamma, beta, running_mean.copy(), running_var.copy())[0]

    check_directional(f, x, dy, dx, np.random.default_rng(0))
    with pytest.raises(AssertionError):
        check_directional(f, x, dy, wrong, np.random.default_rng(0))


@given(case=nhwc_cases(), flat=st.booleans(), momentum=MOMENTA, eps=EPSILONS)
def test_matches_torch_batch_norm(case, flat, momentum, eps):
    torch = import_torch()
    shape, seed, layout = case
    x, (gamma, beta, running_mean, running_var), dy = make_case(shape, seed, flat)
    assume(x.size // x.shape[-1] > 1)  # PyTorch refuses training-mode BN with one value per channel
    rm, rv = running_mean.copy(), running_var.copy()
    y, x_hat, inv_std = batchnorm_forward_train(with_layout(x, layout), gamma, beta, rm, rv,
                                                momentum=momentum, eps=eps)
    dx, dgamma, dbeta = batchnorm_backward(dy, x_hat, inv_std, gamma)

    to_nchw = (0, 3, 1, 2) if x.ndim == 4 else (0, 1)
    xt = torch.tensor(x.transpose(to_nchw), requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.tensor(running_mean), torch.tensor(running_var)
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, gt, bt, training=True, momentum=1 - momentum, eps=eps)
    grads = torch.autograd.grad(yt, (xt, gt, bt), torch.tensor(dy.transpose(to_nchw)))
    back = (0, 2, 3, 1) if x.ndim == 4 else (0, 1)
    assert_close(y, yt.detach().numpy().transpose(back), rtol=1e-9, name="y")
    assert_close(rm, rmt.numpy(), rtol=1e-9, name="running_mean")
    assert_close(rv, rvt.numpy(), rtol=1e-9, name="running_var")
    assert_close(dx, grads[0].numpy().transpose(back), rtol=1e-8, name="dx")
    assert_close(dgamma, grads[1].numpy(), rtol=1e-9, name="dgamma")
    assert_close(dbeta, grads[2].numpy(), rtol=1e-9, name="dbeta")

    y_eval = batchnorm_forward_eval(x, gamma, beta, rm, rv, eps=eps)
    yt_eval = torch.nn.functional.batch_norm(torch.tensor(x.transpose(to_nchw)), rmt, rvt, gt, bt,
                                             training=False, eps=eps)
    assert_close(y_eval, yt_eval.detach().numpy().transpose(back), rtol=1e-9, name="y (eval)")


@pytest.mark.parametrize("flat", [False, True])
def test_parallel_chunks_match_float64_reference(flat):
    """Two threads, float32: each thread merges two statistics blocks (1365 rows of 24 channels fit the 128 KiB
    block), then the threads' results are merged; rows are split between threads."""
    with numba_threads(2):
        x, (gamma, beta, running_mean, running_var), dy = make_case((16, 17, 13, 24), 11, flat, dtype=np.float32)
        rm, rv = running_mean.copy(), running_var.copy()
        y, x_hat, inv_std = batchnorm_forward_train(x, gamma, beta, rm, rv, momentum=0.9)
        dx, dgamma, dbeta = batchnorm_backward(dy, x_hat, inv_std, gamma)
        x64, dy64 = x.astype(np.float64).reshape(-1, 24), dy.astype(np.float64).reshape(-1, 24)
        mean, var = x64.mean(axis=0), x64.var(axis=0)
        x_hat64 = (x64 - mean) / np.sqrt(var + 1e-3)
        assert_close(y.reshape(-1, 24), x_hat64 * gamma + beta, rtol=1e-5, name="y")
        assert_close(rm, 0.9 * running_mean + 0.1 * mean, rtol=1e-6, name="running_mean")
        assert_close(rv, 0.9 * running_var + 0.1 * x64.var(axis=0, ddof=1), rtol=1e-6, name="running_var")
        dx64 = gamma / np.sqrt(var + 1e-3) * (dy64 - dy64.mean(0) - x_hat64 * (dy64 * x_hat64).mean(0))
        assert_close(dx.reshape(-1, 24), dx64, rtol=1e-4, atol_floor=1e-6, name="dx")
        assert_close(dbeta, dy64.sum(0), rtol=1e-5, name="dbeta")
        assert_close(dgamma, (dy64 * x_hat64).sum(0), rtol=1e-5, name="dgamma")


def _args():
    x, (gamma, beta, running_mean, running_var), dy = make_case((2, 3, 3, 4), 0, flat=False)
    return dict(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, dy=dy)


def _train(a, **kw):
    return batchnorm_forward_train(a["x"], a["gamma"], a["beta"], a["running_mean"], a["running_var"], **kw)


def _readonly(v):
    v = v.copy()
    v.flags.writeable = False
    return v


BAD_TRAIN = {
    "int x": (TypeError, "x", lambda a: dict(a, x=a["x"].astype(np.int32))),
    "list x": (TypeError, "x", lambda a: dict(a, x=a["x"].tolist())),
    "3-D x": (ValueError, "x", lambda a: dict(a, x=a["x"][0])),
    "gamma length": (ValueError, "gamma", lambda a: dict(a, gamma=a["gamma"][:3])),
    "beta rank": (ValueError, "beta", lambda a: dict(a, beta=a["beta"][None])),
    "running_var length": (ValueError, "running_var", lambda a: dict(a, running_var=np.ones(5))),
    "mixed dtypes": (TypeError, "gamma", lambda a: dict(a, gamma=a["gamma"].astype(np.float32))),
    "read-only running_mean": (ValueError, "running_mean", lambda a: dict(a, running_mean=_readonly(
        a["running_mean"]))),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN), ids=list(BAD_TRAIN))
def test_train_rejects_bad_input(case):
    error, name, mutate = BAD_TRAIN[case]
    with pytest.raises(error, match=name):
        _train(mutate(_args()))


@pytest.mark.parametrize("kw, name", [(dict(momentum=1.5), "momentum"), (dict(momentum="0.9"), "momentum"),
                                      (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps")])
def test_train_rejects_bad_hyperparameters(kw, name):
    with pytest.raises((TypeError, ValueError), match=name):
        _train(_args(), **kw)


def test_eval_rejects_channel_mismatch():
    a = _args()
    with pytest.raises(ValueError, match="running_mean"):
        batchnorm_forward_eval(a["x"], a["gamma"], a["beta"], np.zeros(3), a["running_var"])


@pytest.mark.parametrize("case", ["x_hat shape", "inv_std length", "gamma dtype", "dy rank"])
def test_backward_rejects_bad_input(case):
    a = _args()
    y, x_hat, inv_std = _train(a)
    args = dict(dy=a["dy"], x_hat=x_hat, inv_std=inv_std, gamma=a["gamma"])
    name = case.split()[0]
    if case == "x_hat shape":
        args["x_hat"] = x_hat[:, :2]
    elif case == "inv_std length":
        args["inv_std"] = inv_std[:2]
    elif case == "gamma dtype":
        args["gamma"] = a["gamma"].astype(np.float32)
    else:
        args["dy"] = a["dy"][0]
    with pytest.raises((TypeError, ValueError), match=name):
        batchnorm_backward(**args)


def test_layouts_are_exercised():
    """with_layout really produces non-contiguous views (otherwise the property tests would test nothing)."""
    x = np.arange(24.0).reshape(2, 3, 4)
    for layout in LAYOUTS[1:]:
        v = with_layout(x, layout)
        assert not v.flags.c_contiguous and np.array_equal(v, x)


@pytest.mark.parametrize("shape", [(8, 16, 16, 256), (32, 16, 16, 256)], ids=["2^19", "2^21"])
def test_training_forward_gives_the_same_bits_serial_or_parallel(shape):
    """The training forward's passes go parallel only from 4x the general threshold (2^21 values by default), but
    its statistics are summed in the same chunks either way: one thread and two give the same bits, at 2^19 values
    (serial on two threads now) and at 2^21 (parallel), and so does the deferred statistics-only forward."""
    from kernels import _jit
    from kernels.batchnorm import batchnorm_act_forward_train, batchnorm_stats_train
    assert _jit.PARALLEL_MIN_WORK == 1 << 19
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    gamma, beta = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32), rng.normal(size=shape[-1]).astype(np.float32)
    results = []
    for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
        numba.set_num_threads(threads)
        try:
            rm, rv = np.zeros(shape[-1], np.float32), np.ones(shape[-1], np.float32)
            y, mean, inv_std = batchnorm_act_forward_train(x, gamma, beta, rm, rv, act="relu6", momentum=0.9)
            rm2, rv2 = np.zeros(shape[-1], np.float32), np.ones(shape[-1], np.float32)
            mean2, inv_std2 = batchnorm_stats_train(x, rm2, rv2, momentum=0.9)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        results.append((y, mean, inv_std, rm, rv, mean2, inv_std2, rm2, rv2))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
