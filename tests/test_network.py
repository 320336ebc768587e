"""Whole-network tests of the layer graph: end-to-end float64 gradients, state files, modes and bad input."""
import numpy as np
import pytest

import tinyconv.sequential as sequential
from gradcheck import check_directional, check_grad
from tinyconv import (BatchNorm, Conv2D, DepthwiseConv2D, Dropout, Flatten, GlobalAvgPool2D, Linear, MaxPool2D,
                      PointwiseConv2D, ReLU, ReLU6, Sequential, SoftmaxCrossEntropy, StateError)


def small_net(seed=0, dtype=np.float64, act=ReLU, pool="global"):
    """conv-BN-ReLU-depthwise-BN-ReLU-pointwise-pool-FC, as the issue asks, with a bias on the first conv."""
    rng = np.random.default_rng(seed)
    tail = [GlobalAvgPool2D(name="pool")] if pool == "global" else [
        MaxPool2D(2, name="pool"), Flatten(name="flatten")]
    fc_in = 6 if pool == "global" else 2 * 2 * 6
    layers = [
        Conv2D(3, 4, 3, stride=2, padding="same", use_bias=True, name="conv1", rng=rng, dtype=dtype),
        BatchNorm(4, name="conv1_bn", dtype=dtype),
        act(name="conv1_act"),
        DepthwiseConv2D(4, 3, stride=1, padding="same", name="conv_dw_1", rng=rng, dtype=dtype),
        BatchNorm(4, name="conv_dw_1_bn", dtype=dtype),
        act(name="conv_dw_1_act"),
        PointwiseConv2D(4, 6, name="conv_pw_1", rng=rng, dtype=dtype),
        *tail,
        Linear(fc_in, 5, name="fc", rng=rng, dtype=dtype),
    ]
    return Sequential(layers, input_shape=(8, 8, 3), name="small")


def loss_and_grads(model, x, labels, loss):
    model.zero_grad()
    logits = model.forward(x, training=True)
    value = loss.forward(logits, labels)
    dx = model.backward(loss.backward(), need_dx=True)
    return value, dx


@pytest.mark.parametrize("split", [False, True], ids=["data-parallel", "split-cores"])
@pytest.mark.parametrize("act,pool", [(ReLU, "global"), (ReLU6, "max")])
def test_whole_network_gradient_float64(act, pool, split, monkeypatch):
    """Both backward passes: kernels on every thread, or weight gradients on a worker thread (forced here
    whatever the machine's thread count)."""
    monkeypatch.setattr(sequential, "can_split", lambda: True)
    rng = np.random.default_rng(1)
    model = small_net(dtype=np.float64, act=act, pool=pool)
    model.split_backward = split
    for layer in model.layers:  # non-trivial BN affine parameters and bias so their gradients are exercised
        for k, p in layer.params.items():
            if k in ("gamma", "beta", "bias"):
                p[...] = rng.uniform(0.5, 1.5, p.shape) if k == "gamma" else rng.normal(0, 0.3, p.shape)
    x = rng.standard_normal((3, 8, 8, 3))
    labels = np.array([0, 3, 4])
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    _, dx = loss_and_grads(model, x, labels, loss)

    def f():
        return np.array(SoftmaxCrossEntropy(label_smoothing=0.1).forward(model.forward(x, training=True), labels))

    one = np.array(1.0)
    for name, p, g in model.named_parameters():
        analytic = g.copy()
        if p.size <= 64:
            check_grad(f, p, one, analytic, rtol=1e-5, atol_floor=1e-9, name=name)
        else:
            check_directional(f, p, one, analytic, rng, n_dirs=4, rtol=1e-6, name=name)
    check_directional(f, x, one, dx, rng, n_dirs=4, rtol=1e-6, name="input")


def test_backward_skips_input_gradient_by_default():
    model = small_net()
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    loss = SoftmaxCrossEntropy()
    loss.forward(model.forward(x, training=True), np.array([1, 2]))
    assert model.backward(loss.backward()) is None
    # conv1/bias is left out: batch norm right after it removes the mean, so its true gradient is zero
    assert all(np.any(g != 0) for name, _, g in model.named_parameters() if name != "conv1/bias")


def test_gradients_accumulate_until_zeroed():
    model = small_net()
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    labels = np.array([1, 2])
    loss = SoftmaxCrossEntropy()
    loss_and_grads(model, x, labels, loss)
    once = {n: g.copy() for n, _, g in model.named_parameters()}
    loss.forward(model.forward(x, training=True), labels)
    model.backward(loss.backward())
    for n, _, g in model.named_parameters():
        np.testing.assert_allclose(g, 2 * once[n], rtol=1e-12, atol=1e-15)
    model.zero_grad()
    assert all(not g.any() for _, _, g in model.named_parameters())


def test_train_and_eval_modes_differ_only_where_they_should():
    model = small_net(dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
    before = {n: b.copy() for n, b in model.named_buffers()}
    y_eval = model.eval().forward(x)
    assert all(np.array_equal(before[n], b) for n, b in model.named_buffers()), "eval must not touch BN buffers"
    model.train().forward(x)
    assert any(not np.array_equal(before[n], b) for n, b in model.named_buffers()), "train must update them"
    np.testing.assert_array_equal(model.eval().forward(x), model.eval().forward(x))
    assert y_eval.shape == (4, 5)


def test_dropout_is_identity_in_eval_and_seeded_in_training():
    x = np.random.default_rng(0).standard_normal((4, 10))
    a, b = Dropout(0.5, seed=3), Dropout(0.5, seed=3)
    np.testing.assert_array_equal(a.forward(x, training=False), x)
    np.testing.assert_array_equal(a.forward(x, training=True), b.forward(x, training=True))


def test_output_shape_matches_forward():
    model = small_net(dtype=np.float32)
    x = np.zeros((2, 8, 8, 3), np.float32)
    assert model.forward(x).shape[1:] == model.output_shape()
    shapes = [out for _, _, out in model.layer_shapes()]
    assert shapes[0] == (4, 4, 4) and shapes[-1] == (5,)


def test_save_load_roundtrip(tmp_path):
    a, b = small_net(seed=0, dtype=np.float32), small_net(seed=1, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    a.train().forward(x)  # move the BN buffers away from their initial values
    a.save(tmp_path / "m.npz")
    b.load(tmp_path / "m.npz")
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.eval().forward(x), b.eval().forward(x))
    assert not list(tmp_path.glob("*.tmp")), "atomic save must leave no temporary file"


def test_load_names_missing_and_unexpected(tmp_path):
    model = small_net(dtype=np.float32)
    state = model.state_dict()
    del state["conv1/bias"]
    state["conv9/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(StateError, match=r"missing \['conv1/bias'\].*unexpected \['conv9/kernel'\]"):
        model.load_state_dict(state)


def test_load_names_wrong_shapes_and_bad_files(tmp_path):
    model = small_net(dtype=np.float32)
    state = model.state_dict()
    state["fc/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(StateError, match=r"fc/kernel: saved \(2, 2\)"):
        model.load_state_dict(state)
    with pytest.raises(FileNotFoundError, match="no saved state"):
        model.load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(StateError, match="not a readable"):
        model.load(tmp_path / "junk.npz")


def test_load_rejects_nan_state():
    model = small_net(dtype=np.float32)
    state = model.state_dict()
    state["fc/bias"][0] = np.nan
    with pytest.raises(StateError, match="fc/bias contains NaN"):
        model.load_state_dict(state)


def test_hooks_see_every_layer_in_order():
    model = small_net(dtype=np.float32)
    events = []
    remove = model.add_hook(lambda phase, layer, event: events.append((phase, layer.name, event)))
    loss = SoftmaxCrossEntropy()
    loss.forward(model.forward(np.ones((1, 8, 8, 3), np.float32), training=True), np.array([0]))
    model.backward(loss.backward())
    names = [layer.name for layer in model.layers]
    assert [n for p, n, e in events if p == "forward" and e == "start"] == names
    assert [n for p, n, e in events if p == "backward" and e == "end"] == names[::-1]
    remove()
    events.clear()
    model.forward(np.ones((1, 8, 8, 3), np.float32))
    assert not events


# --- bad input ----------------------------------------------------------------------------------------------


def test_model_rejects_wrong_input_shape_dtype_and_nan():
    model = small_net(dtype=np.float32)
    with pytest.raises(ValueError, match=r"expects input \(N, 8, 8, 3\), got shape \(2, 8, 8, 4\)"):
        model.forward(np.zeros((2, 8, 8, 4), np.float32))
    with pytest.raises(TypeError, match="float32 or float64, got int64"):
        model.forward(np.zeros((2, 8, 8, 3), np.int64))
    x = np.zeros((2, 8, 8, 3), np.float32)
    x[1, 2, 3, 0] = np.inf
    with pytest.raises(ValueError, match="model input contains 1 NaN or Inf"):
        model.forward(x)
    with pytest.raises(TypeError, match="numpy array"):
        model.forward([[1.0]])


@pytest.mark.parametrize("out_channels, keeps", [(14, True), (13, False)])
def test_conv_layer_keeps_im2col_rows_only_when_cheap_with_the_same_bits(out_channels, keeps):
    """Conv2D keeps the forward's im2col rows for the weight gradient when a row (27 values here) is at most twice
    an output pixel; either way its output and gradients are bitwise the kernels' own."""
    from kernels import conv as conv_k

    rng = np.random.default_rng(0)
    layer = Conv2D(3, out_channels, 3, stride=2, padding="same", rng=rng, dtype=np.float32)
    x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
    w = layer.params["kernel"]
    y = layer.forward(x, training=True)
    assert (layer._cache[1] is not None) == keeps
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy, need_dx=True)
    kw = dict(stride=2, padding="same")
    np.testing.assert_array_equal(y, conv_k.conv2d_forward(x, w, **kw))
    np.testing.assert_array_equal(layer.grads["kernel"], conv_k.conv2d_backward_weight(dy, x, w.shape, **kw))
    np.testing.assert_array_equal(dx, conv_k.conv2d_backward_input(dy, w, x.shape, **kw))
    layer.forward(x, training=False)
    assert layer._cache is None


def test_layer_rejects_wrong_channels_and_rank():
    conv = Conv2D(3, 4, 3, name="c")
    with pytest.raises(ValueError, match=r"layer 'c': input must have 3 channels"):
        conv.forward(np.zeros((1, 5, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"layer 'c': input must be 4-D"):
        conv.forward(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(TypeError, match=r"layer 'c': input dtype float64 differs"):
        conv.forward(np.zeros((1, 5, 5, 3), np.float64))
    fc = Linear(4, 2, name="fc")
    with pytest.raises(ValueError, match=r"layer 'fc': input must have 4 channels"):
        fc.forward(np.zeros((1, 3), np.float32))


def test_impossible_geometry_fails_at_construction():
    with pytest.raises(ValueError, match="kernel height 5 is larger than the padded input height 4"):
        Sequential([Conv2D(1, 1, 5, padding="valid")], input_shape=(4, 4, 1))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        DepthwiseConv2D(3, 3, stride=0)
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        Conv2D(3, 3, 3, padding="full")
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        PointwiseConv2D(0, 3)
    with pytest.raises(ValueError, match="dropout rate must be in"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="unique"):
        Sequential([ReLU(name="a"), ReLU(name="a")])


def test_backward_without_forward_is_a_clear_error():
    layer = ReLU(name="r")
    layer.forward(np.ones((1, 2), np.float32), training=False)
    with pytest.raises(RuntimeError, match="layer 'r': backward called without"):
        layer.backward(np.ones((1, 2), np.float32))


def test_fused_bn_matches_the_unfused_layers_and_leaves_the_callers_gradient():
    """The caller's dy reaches the fused BN layer as a view (through Flatten); it must come back untouched."""
    from tinyconv import BatchNormAct
    rng = np.random.default_rng(0)
    model = Sequential([Conv2D(3, 4, 3, name="conv", rng=rng, dtype=np.float64),
                        BatchNormAct(4, name="bn", dtype=np.float64), Flatten(name="flatten")],
                       input_shape=(5, 5, 3))
    x = rng.standard_normal((2, 5, 5, 3))
    dy = rng.standard_normal((2, 100))
    kept = dy.copy()
    model.forward(x, training=True)
    dx = model.backward(dy, need_dx=True)
    np.testing.assert_array_equal(dy, kept)
    reference = Sequential([Conv2D(3, 4, 3, name="conv", rng=np.random.default_rng(0), dtype=np.float64),
                            BatchNorm(4, name="bn", dtype=np.float64), ReLU(name="relu"), Flatten(name="flatten")],
                           input_shape=(5, 5, 3))
    reference.forward(x, training=True)
    np.testing.assert_allclose(dx, reference.backward(dy, need_dx=True), rtol=1e-10, atol=1e-14)
    for (name, _, g), (_, _, g_ref) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-14, err_msg=name)



def test_saved_state_gets_ordinary_file_permissions(tmp_path):
    import os
    model = small_net(dtype=np.float32)
    model.save(tmp_path / "m.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_parameters_and_gradients_lie_end_to_end_and_zero_grad_clears_them_all():
    """Sequential lays every parameter (and every gradient) end to end in one flat array, leaving views in the
    layers: values unchanged, zero_grad one fill. A gradient array a user swaps in is still zeroed (the layer's
    own zero_grad then runs); astype lays the new arrays out again."""
    reference = small_net()
    model = small_net()
    for (name, p, g), (_, q, _) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_array_equal(p, q, err_msg=name)
        assert p.base is model._packed.params and g.base is model._packed.grads, name
    offset = 0
    for name, p, g in model.named_parameters():
        assert np.shares_memory(p, model._packed.params[offset:offset + p.size]), name
        offset += p.size
    assert offset == model._packed.params.size == model.param_count()
    model.zero_grad()
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3))
    loss = SoftmaxCrossEntropy()
    loss_and_grads(model, x, np.array([0, 3]), loss)
    assert np.abs(model._packed.grads).max() > 0
    model.zero_grad()
    assert not model._packed.grads.any()
    fc = model.layers[-1]
    fc.grads["kernel"] = np.ones_like(fc.grads["kernel"])  # no longer a view of the flat array
    model.zero_grad()
    assert not fc.grads["kernel"].any()
    model.astype(np.float32)
    assert model._packed.params.dtype == np.float32
    assert all(p.base is model._packed.params for _, p, _ in model.named_parameters())


def test_zero_grad_clears_a_deep_copy_whose_views_were_copied_apart():
    """copy.deepcopy (and pickle) copy each view of the flat arrays on its own: the copy's zero_grad must still
    zero the arrays its layers hold, and its optimizer then updates them one by one."""
    import copy
    from tinyconv.optim import SGD
    model = copy.deepcopy(small_net())
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3))
    loss_and_grads(model, x, np.array([1, 4]), SoftmaxCrossEntropy())
    assert any(np.abs(g).max() > 0 for _, _, g in model.named_parameters())
    model.zero_grad()
    for name, _, g in model.named_parameters():
        assert not g.any(), name
    assert SGD(model.named_parameters(), lr=0.1, momentum=0.9)._flat is None


def test_a_second_model_over_the_same_layers_leaves_them_with_the_first():
    """Packing never moves arrays that already are views (another model's): an optimizer built on the first model
    keeps updating the arrays its layers use."""
    from tinyconv.optim import SGD
    first = small_net()
    opt = SGD(first.named_parameters(), lr=0.1, momentum=0.9)
    second = Sequential(list(first.layers), input_shape=(8, 8, 3), name="again")
    assert second._packed is None
    for (_, p, _), (_, q, _) in zip(first.named_parameters(), second.named_parameters()):
        assert p is q
    assert opt._flat is not None
    before = [p.copy() for _, p, _ in second.named_parameters()]
    for _, _, g in first.named_parameters():
        g.fill(1.0)
    opt.step()
    for (name, p, _), old in zip(second.named_parameters(), before):
        assert not np.array_equal(p, old), f"{name}: the step did not reach the array the layer holds"
