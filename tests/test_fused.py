"""Fused batch norm + activation: kernels against the composition of the separate oracles, finite differences,
float32, PyTorch and the unfused kernels; the BatchNormAct layer and the fused MobileNet against the unfused one."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import models
from gradcheck import assert_close, check_directional, check_grad
from kernels.batchnorm import (batchnorm_act_backward, batchnorm_act_forward_eval, batchnorm_act_forward_train,
                               batchnorm_backward, batchnorm_forward_train)
from kernels.activation import relu6_backward, relu6_forward, relu_backward, relu_forward
from oracles_misc import (batchnorm_backward_oracle, batchnorm_eval_oracle, batchnorm_train_oracle,  # noqa: F401
                          import_torch, nhwc_cases, numba_threads, one_numba_thread, relu6_backward_oracle,
                          relu6_oracle, relu_backward_oracle, relu_oracle, with_layout)
from tinyconv import BatchNorm, BatchNormAct, ReLU6, SoftmaxCrossEntropy
from tinyconv.counting import count
from tinyconv.summary import summary

ACTS = st.sampled_from([None, "relu", "relu6"])
KINKS = {None: (), "relu": (0.0,), "relu6": (0.0, 6.0)}
ORACLES = {None: (lambda v: v, lambda g, v: g), "relu": (relu_oracle, relu_backward_oracle),
           "relu6": (relu6_oracle, relu6_backward_oracle)}


def fused_oracle(x, gamma, beta, running_mean, running_var, momentum, eps, act, dy):
    """The separate oracles composed: BN train oracle, then the activation; backward in reverse order.

    Returns (y, new running mean, new running var, dx, dgamma, dbeta, pre-activation v)."""
    v, _, _, rm, rv = batchnorm_train_oracle(x, gamma, beta, running_mean, running_var, momentum, eps)
    act_fwd, act_bwd = ORACLES[act]
    g = act_bwd(dy, v)
    dx, dgamma, dbeta = batchnorm_backward_oracle(g, x, gamma, eps)
    return act_fwd(v), rm, rv, dx, dgamma, dbeta, v


def make_case(shape, seed, flat, act, dtype=np.float64, eps=1e-3):
    """x with per-channel offsets and scales, BN parameters with beta spread over (-1, 7) so every activation
    region is populated, an upstream gradient; x is nudged until every pre-activation is >= 1e-3 from a kink."""
    rng = np.random.default_rng(seed)
    if flat:
        shape = (shape[0] * shape[1], shape[3])
    c_size = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, c_size) + rng.uniform(-5, 5, c_size)
    gamma = rng.uniform(0.5, 3.0, c_size) * rng.choice([-1.0, 1.0], c_size)
    beta = rng.uniform(-1.0, 7.0, c_size)
    running_mean, running_var = rng.standard_normal(c_size), rng.uniform(0.5, 2.0, c_size)
    for _ in range(4):  # moving one value moves the statistics a little: repeat until nothing is near a kink
        mean, var = x.reshape(-1, c_size).mean(0), x.reshape(-1, c_size).var(0)
        v = (x - mean) / np.sqrt(var + eps) * gamma + beta
        near = np.zeros(shape, bool)
        for k in KINKS[act]:
            near |= np.abs(v - k) < 1e-3
        if not near.any():
            break
        x = x + near * 0.01 * np.sqrt(var + eps) / np.abs(gamma)
    dy = rng.standard_normal(shape)
    cast = [a.astype(dtype) for a in (x, gamma, beta, running_mean, running_var, dy)]
    return cast, not near.any()


def _train(x, gamma, beta, running_mean, running_var, act, momentum=0.9, eps=1e-3, **kw):
    rm, rv = running_mean.copy(), running_var.copy()
    y, mean, inv_std = batchnorm_act_forward_train(x, gamma, beta, rm, rv, act=act, momentum=momentum, eps=eps,
                                                   **kw)
    return y, mean, inv_std, rm, rv


@given(case=nhwc_cases(), flat=st.booleans(), act=ACTS, momentum=st.sampled_from([0.99, 0.5, 0.0]))
def test_float64_matches_composed_oracles_and_finite_differences(case, flat, act, momentum):
    shape, seed, layout = case
    (x, gamma, beta, running_mean, running_var, dy), clean = make_case(shape, seed, flat, act)
    assume(clean)
    xv, dyv = with_layout(x, layout), with_layout(dy, layout)
    y, mean, inv_std, rm, rv = _train(xv, gamma, beta, running_mean, running_var, act, momentum)
    y_o, rm_o, rv_o, dx_o, dgamma_o, dbeta_o, _ = fused_oracle(x, gamma, beta, running_mean, running_var,
                                                                momentum, 1e-3, act, dy)
    assert y.dtype == mean.dtype == inv_std.dtype == np.float64 and y.shape == x.shape
    assert_close(y, y_o, rtol=1e-10, name="y")
    assert_close(rm, rm_o, rtol=1e-10, name="running_mean")
    assert_close(rv, rv_o, rtol=1e-10, name="running_var")
    dx, dgamma, dbeta = batchnorm_act_backward(dyv, xv, mean, inv_std, gamma, beta, act=act)
    assert_close(dx, dx_o, rtol=1e-8, name="dx")
    assert_close(dgamma, dgamma_o, rtol=1e-9, name="dgamma")
    assert_close(dbeta, dbeta_o, rtol=1e-9, name="dbeta")

    def f():
        return _train(xv, gamma, beta, running_mean, running_var, act)[0]

    rng = np.random.default_rng(seed + 1)
    check_directional(f, xv, dy, dx, rng, eps=1e-7, rtol=1e-5, name="dx")
    check_directional(f, gamma, dy, dgamma, rng, rtol=1e-5, name="dgamma")
    check_directional(f, beta, dy, dbeta, rng, rtol=1e-5, name="dbeta")
    if x.size <= 48 and layout == "contiguous":
        check_grad(f, xv, dy, dx, rtol=1e-5, eps=1e-7, name="dx (full)")


@given(case=nhwc_cases(), flat=st.booleans(), act=ACTS)
def test_float32_matches_float64_oracle(case, flat, act):
    shape, seed, layout = case
    (x, gamma, beta, running_mean, running_var, dy), clean = make_case(shape, seed, flat, act, np.float32)
    assume(clean)
    y, mean, inv_std, rm, rv = _train(with_layout(x, layout), gamma, beta, running_mean, running_var, act)
    assert y.dtype == mean.dtype == inv_std.dtype == rm.dtype == np.float32
    y_o, rm_o, rv_o, dx_o, dgamma_o, dbeta_o, _ = fused_oracle(x, gamma, beta, running_mean, running_var, 0.9,
                                                                1e-3, act, dy)
    assert_close(y, y_o, rtol=1e-4, atol_floor=1e-5, name="y")
    assert_close(rm, rm_o, rtol=1e-5, atol_floor=1e-6, name="running_mean")
    assert_close(rv, rv_o, rtol=1e-5, atol_floor=1e-6, name="running_var")
    dx, dgamma, dbeta = batchnorm_act_backward(with_layout(dy, layout), x, mean, inv_std, gamma, beta, act=act)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float32
    assert_close(dx, dx_o, rtol=1e-4, atol_floor=1e-5, name="dx")
    assert_close(dgamma, dgamma_o, rtol=1e-4, atol_floor=1e-5, name="dgamma")
    assert_close(dbeta, dbeta_o, rtol=1e-4, atol_floor=1e-5, name="dbeta")


@given(case=nhwc_cases(), flat=st.booleans(), act=ACTS, dtype=st.sampled_from([np.float32, np.float64]))
def test_eval_matches_composed_oracles(case, flat, act, dtype):
    shape, seed, layout = case
    (x, gamma, beta, running_mean, running_var, _), _ = make_case(shape, seed, flat, act, dtype)
    y = batchnorm_act_forward_eval(with_layout(x, layout), gamma, beta, running_mean, running_var, act=act)
    expected = ORACLES[act][0](batchnorm_eval_oracle(x, gamma, beta, running_mean, running_var, 1e-3))
    assert y.dtype == dtype
    assert_close(y, expected, rtol=1e-10 if dtype == np.float64 else 1e-5, atol_floor=1e-6, name="y")


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_equals_the_unfused_kernels(act):
    """Same numbers as batch norm then the activation, through the unfused kernels (float32, several threads)."""
    with numba_threads(2):
        (x, gamma, beta, running_mean, running_var, dy), _ = make_case((8, 9, 7, 24), 4, False, act, np.float32)
        y, mean, inv_std, rm, rv = _train(x, gamma, beta, running_mean, running_var, act)
        rm2, rv2 = running_mean.copy(), running_var.copy()
        v, x_hat, inv_std2 = batchnorm_forward_train(x, gamma, beta, rm2, rv2, momentum=0.9)
        fwd, bwd = {None: (lambda a: a, lambda g, a: g), "relu": (relu_forward, relu_backward),
                    "relu6": (relu6_forward, relu6_backward)}[act]
        y2 = fwd(v)
        assert_close(y, y2, rtol=1e-5, atol_floor=1e-6, name="y")
        np.testing.assert_array_equal(rm, rm2)
        np.testing.assert_array_equal(rv, rv2)
        np.testing.assert_array_equal(inv_std, inv_std2)
        dx, dgamma, dbeta = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act=act)
        dx2, dgamma2, dbeta2 = batchnorm_backward(bwd(dy, y2), x_hat, inv_std2, gamma)
        assert_close(dx, dx2, rtol=1e-4, atol_floor=1e-6, name="dx")
        assert_close(dgamma, dgamma2, rtol=1e-4, atol_floor=1e-5, name="dgamma")
        assert_close(dbeta, dbeta2, rtol=1e-5, atol_floor=1e-6, name="dbeta")


def test_mask_comes_from_the_forward_and_kinks_get_no_gradient():
    """A value exactly at a kink after BN (x - mean = 0, beta at the kink) gets zero gradient (PyTorch's
    convention); NaN propagates forward."""
    x = np.array([[-1.0], [0.0], [1.0]])  # mean exactly 0: the middle value's pre-activation is exactly beta
    gamma = np.array([1.5])
    for act, beta in (("relu", 0.0), ("relu6", 6.0)):
        y, mean, inv_std, _, _ = _train(x, gamma, np.array([beta]), np.zeros(1), np.ones(1), act)
        assert y[1, 0] == beta
        _, _, dbeta = batchnorm_act_backward(np.ones((3, 1)), x, mean, inv_std, gamma, np.array([beta]), act=act)
        assert dbeta[0] == 1.0  # relu: only +1.5 k passes; relu6: only 6 - 1.5 k (6 + 1.5 k is clipped)
    y = batchnorm_act_forward_eval(np.array([[np.nan], [1.0]]), np.ones(1), np.zeros(1), np.zeros(1), np.ones(1))
    assert np.isnan(y[0, 0]) and y[1, 0] > 0


def test_nan_in_dy_is_not_hidden_by_the_mask():
    """A NaN upstream gradient at a clipped unit still reaches dbeta, dgamma and dx: the mask multiplies (0 * NaN
    is NaN) rather than selecting, so a broken gradient is never silently dropped."""
    x = np.array([[-1.0], [0.0], [1.0], [2.0]])
    gamma, beta = np.ones(1), np.zeros(1)
    _, mean, inv_std, _, _ = _train(x, gamma, beta, np.zeros(1), np.ones(1), "relu")
    dy = np.array([[np.nan], [1.0], [1.0], [1.0]])  # row 0 is clipped by the ReLU
    dx, dgamma, dbeta = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act="relu")
    assert np.isnan(dbeta[0]) and np.isnan(dgamma[0]) and np.isnan(dx).all()


@given(case=nhwc_cases(), act=st.sampled_from(["relu", "relu6"]))
def test_matches_torch(case, act):
    torch = import_torch()
    shape, seed, layout = case
    (x, gamma, beta, running_mean, running_var, dy), clean = make_case(shape, seed, False, act)
    assume(clean and x.size // x.shape[-1] > 1)
    y, mean, inv_std, rm, rv = _train(with_layout(x, layout), gamma, beta, running_mean, running_var, act)
    dx, dgamma, dbeta = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act=act)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    gt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    rmt, rvt = torch.tensor(running_mean), torch.tensor(running_var)
    vt = torch.nn.functional.batch_norm(xt, rmt, rvt, gt, bt, training=True, momentum=0.1, eps=1e-3)
    yt = torch.relu(vt) if act == "relu" else torch.nn.functional.relu6(vt)
    grads = torch.autograd.grad(yt, (xt, gt, bt), torch.tensor(dy.transpose(0, 3, 1, 2)))
    assert_close(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-9, name="y")
    assert_close(rm, rmt.numpy(), rtol=1e-9, name="running_mean")
    assert_close(rv, rvt.numpy(), rtol=1e-9, name="running_var")
    assert_close(dx, grads[0].numpy().transpose(0, 2, 3, 1), rtol=1e-8, name="dx")
    assert_close(dgamma, grads[1].numpy(), rtol=1e-9, name="dgamma")
    assert_close(dbeta, grads[2].numpy(), rtol=1e-9, name="dbeta")


def test_checker_rejects_a_wrong_backward():
    """Meta-test: ignoring the activation's mask must fail the directional check."""
    (x, gamma, beta, running_mean, running_var, dy), clean = make_case((2, 4, 4, 3), 5, False, "relu")
    assert clean
    y, mean, inv_std, _, _ = _train(x, gamma, beta, running_mean, running_var, "relu")
    dx, _, _ = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act="relu")
    wrong, _, _ = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act=None)

    def f():
        return _train(x, gamma, beta, running_mean, running_var, "relu")[0]

    check_directional(f, x, dy, dx, np.random.default_rng(0), eps=1e-7, rtol=1e-5)
    with pytest.raises(AssertionError):
        check_directional(f, x, dy, wrong, np.random.default_rng(0), eps=1e-7, rtol=1e-5)


def test_out_buffers_and_in_place_backward():
    (x, gamma, beta, running_mean, running_var, dy), _ = make_case((2, 5, 5, 4), 1, False, "relu6")
    y_ref, mean, inv_std, _, _ = _train(x, gamma, beta, running_mean, running_var, "relu6")
    out = np.empty_like(x)
    y, _, _, _, _ = _train(x, gamma, beta, running_mean, running_var, "relu6", out=out)
    assert y is out
    np.testing.assert_array_equal(y, y_ref)
    dx_ref, _, _ = batchnorm_act_backward(dy, x, mean, inv_std, gamma, beta, act="relu6")
    dy_copy = dy.copy()
    dx, _, _ = batchnorm_act_backward(dy_copy, x, mean, inv_std, gamma, beta, act="relu6", out=dy_copy)
    assert dx is dy_copy
    np.testing.assert_array_equal(dx, dx_ref)
    x_copy = x.copy()
    y_eval = batchnorm_act_forward_eval(x_copy, gamma, beta, running_mean, running_var, act="relu6", out=x_copy)
    assert y_eval is x_copy
    np.testing.assert_array_equal(y_eval, batchnorm_act_forward_eval(x, gamma, beta, running_mean, running_var,
                                                                     act="relu6"))


def _args():
    (x, gamma, beta, running_mean, running_var, dy), _ = make_case((2, 3, 3, 4), 0, False, "relu")
    return dict(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var), dy


@pytest.mark.parametrize("change, error, words", [
    (dict(act="gelu"), ValueError, "act"),
    (dict(out=np.empty((2, 3, 3, 5))), ValueError, "out"),
    (dict(out=np.empty((2, 3, 3, 4))[:, ::-1]), ValueError, "C-contiguous"),
    (dict(momentum=2.0), ValueError, "momentum"),
    (dict(eps=0.0), ValueError, "eps"),
])
def test_forward_rejects_bad_arguments(change, error, words):
    a, _ = _args()
    with pytest.raises(error, match=words):
        batchnorm_act_forward_train(**a, **change)


def test_forward_rejects_out_aliasing_x_before_touching_the_running_stats():
    a, _ = _args()
    before = a["running_mean"].copy()
    with pytest.raises(ValueError, match="overlap x"):
        batchnorm_act_forward_train(**a, out=a["x"])
    np.testing.assert_array_equal(a["running_mean"], before)


@pytest.mark.parametrize("case", ["x shape", "mean length", "beta dtype", "act", "out is x"])
def test_backward_rejects_bad_input(case):
    a, dy = _args()
    y, mean, inv_std = batchnorm_act_forward_train(**a)
    kw = dict(dy=dy, x=a["x"], mean=mean, inv_std=inv_std, gamma=a["gamma"], beta=a["beta"], act="relu")
    if case == "x shape":
        kw["x"] = a["x"][:, :2]
    elif case == "mean length":
        kw["mean"] = mean[:3]
    elif case == "beta dtype":
        kw["beta"] = a["beta"].astype(np.float32)
    elif case == "act":
        kw["act"] = "tanh"
    else:
        kw["out"] = kw["x"]
    with pytest.raises((TypeError, ValueError), match=case.split()[0] if case != "out is x" else "overlap x"):
        batchnorm_act_backward(**kw)


# --- the layer and the model ---------------------------------------------------------------------------------

def test_layer_owns_the_batch_norm_state_under_its_name_and_counts_as_two_layers():
    layer = BatchNormAct(6, "relu6", name="conv1_bn", act_name="conv1_relu", dtype=np.float64)
    assert set(layer.params) == {"gamma", "beta"} and set(layer.buffers) == {"moving_mean", "moving_variance"}
    assert layer.param_count() == 12 and layer.param_count(False) == 24
    bn, act = layer.parts()
    assert (bn.name, act.name, type(act)) == ("conv1_bn", "conv1_relu", ReLU6)
    assert bn.params["gamma"] is layer.params["gamma"]
    assert layer.extra_ops((4, 4, 6)) == {"bn": 96, "activation": 96}
    assert layer.type_label == "BatchNorm+ReLU6" and layer.kind == "batchnorm"
    layer.astype(np.float32)
    assert bn.params["gamma"].dtype == np.float32  # the parts keep sharing the arrays


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_mobilenet_equals_the_unfused_one(activation):
    """Same names, counts, summary, state; same forward, gradients and BN buffers after a float64 step."""
    kw = dict(alpha=0.25, resolution=32, classes=5, in_channels=1, dropout=0.0, activation=activation,
              dtype=np.float64)
    fused, plain = models.mobilenet_v1(**kw), models.mobilenet_v1(fuse=False, **kw)
    assert [n for n, _, _ in fused.named_parameters()] == [n for n, _, _ in plain.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in plain.named_buffers()]
    assert summary(fused) == summary(plain)
    assert count(fused).by_type == count(plain).by_type
    assert len(fused.layers) == len(plain.layers) - 27
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 1))
    labels = np.array([0, 1, 2, 4])
    results = []
    for model in (fused, plain):
        loss = SoftmaxCrossEntropy(0.1)
        value = loss.forward(model.forward(x, training=True), labels)
        dx = model.backward(loss.backward(), need_dx=True)
        results.append((value, dx, {n: g.copy() for n, _, g in model.named_parameters()},
                        dict(model.named_buffers()), model.forward(x, training=False)))
    (v1, dx1, g1, b1, e1), (v2, dx2, g2, b2, e2) = results
    assert_close(np.array(v1), np.array(v2), rtol=1e-12, name="loss")
    assert_close(dx1, dx2, rtol=1e-8, atol_floor=1e-12, name="dx")
    for n in g1:
        assert_close(g1[n], g2[n], rtol=1e-8, atol_floor=1e-12, name=n)
    for n in b1:
        assert_close(b1[n], b2[n], rtol=1e-12, name=n)
    assert_close(e1, e2, rtol=1e-10, name="eval logits")


def test_fused_state_loads_into_the_unfused_model(tmp_path):
    fused = models.mobilenet_v1(alpha=0.25, resolution=32, classes=3)
    fused.train().forward(np.ones((2, 32, 32, 3), np.float32))
    fused.save(tmp_path / "m.npz")
    plain = models.mobilenet_v1(alpha=0.25, resolution=32, classes=3, fuse=False, seed=1)
    plain.load(tmp_path / "m.npz")
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    assert_close(plain.eval().forward(x), fused.eval().forward(x), rtol=1e-5, name="logits")


def test_layer_input_errors_name_the_layer():
    layer = BatchNormAct(4, name="bn")
    with pytest.raises(ValueError, match="layer 'bn': input must have 4 channels"):
        layer.forward(np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="layer 'bn': input must be"):
        layer.forward(np.zeros((2, 2, 4), np.float32))
    with pytest.raises(RuntimeError, match="layer 'bn': backward called without"):
        layer.backward(np.zeros((1, 4), np.float32))
    assert isinstance(BatchNormAct(4).bn, BatchNorm)
    with pytest.raises(ValueError, match="activation must be one of"):
        BatchNormAct(4, "gelu")


# ---- bias + activation: what is left of batch norm once folded into the convolution before it ----

@given(case=nhwc_cases(), flat=st.booleans(), act=ACTS, dtype=st.sampled_from([np.float32, np.float64]),
       in_place=st.booleans())
def test_bias_act_matches_the_composed_oracles_in_place_or_not(case, flat, act, dtype, in_place):
    """act(x + bias) as the activation oracle computes it, to the bit, from any layout; in place (out=x, the
    one-array kernel) and into a new array give the same bits."""
    from kernels.batchnorm import bias_act_forward
    shape, seed, layout = case
    if flat:
        shape = (shape[0] * shape[1], shape[3])
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    bias = rng.standard_normal(shape[-1]).astype(dtype)
    want = ORACLES[act][0](x + bias)  # the same operations in x's dtype: exact equality expected
    if in_place:
        z = x.copy()
        got = bias_act_forward(z, bias, act=act, out=z)
        assert got is z
    else:
        got = bias_act_forward(with_layout(x, layout), bias, act=act)
    np.testing.assert_array_equal(got, want.astype(dtype))


def test_bias_act_on_a_parallel_map_and_nan():
    from kernels.batchnorm import bias_act_forward
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 32, 32, 64)) * 8).astype(np.float32)  # 1 M values: the parallel builds
    x[3, 4, 5, 6] = np.nan
    bias = rng.standard_normal(64).astype(np.float32)
    y = bias_act_forward(x, bias, act="relu6")
    z = x.copy()
    bias_act_forward(z, bias, act="relu6", out=z)
    np.testing.assert_array_equal(y, z)
    assert np.isnan(y[3, 4, 5, 6]) and np.isnan(y).sum() == 1
    np.testing.assert_array_equal(np.nan_to_num(y, nan=-1), np.nan_to_num(np.clip(x + bias, 0, 6), nan=-1))


@pytest.mark.parametrize("kw, err, match", [
    (dict(bias=np.zeros(3, np.float32)), ValueError, r"bias must have shape \(4,\)"),
    (dict(bias=np.zeros(4)), TypeError, "share one dtype"),
    (dict(act="gelu"), ValueError, "act must be one of"),
    (dict(out=np.zeros((2, 3, 3, 4), np.float64)), ValueError, "out must have shape"),
])
def test_bias_act_rejects_bad_arguments(kw, err, match):
    from kernels.batchnorm import bias_act_forward
    args = dict(bias=np.zeros(4, np.float32))
    args.update(kw)
    with pytest.raises(err, match=match):
        bias_act_forward(np.ones((2, 3, 3, 4), np.float32), **args)


def test_bias_act_rejects_an_out_that_overlaps_x_without_being_it():
    from kernels.batchnorm import bias_act_forward
    buf = np.zeros((2, 3, 3, 4), np.float32)
    with pytest.raises(ValueError, match="out must be x itself or not overlap it"):
        bias_act_forward(buf, np.zeros(4, np.float32), out=buf.reshape(2, 3, 3, 4)[...])
