"""tinyconv.fold: batch norm folded into the convolution before it, against the unfolded model."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import models
from gradcheck import assert_close
from kernels.conv import conv2d_forward
from tinyconv import (BatchNorm, BatchNormAct, Conv2D, DepthwiseConv2D, Dropout, GlobalAvgPool2D, Linear,
                      PointwiseConv2D, ReLU, ReLU6, Sequential)
from tinyconv.fold import FoldedConv, fold_batchnorm


def _randomize_batchnorms(model, seed=0):
    """Give every batch norm statistics and parameters far from the identity, so folding has work to do."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "gamma" in layer.params:
            c = layer.params["gamma"].size
            layer.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
            layer.params["beta"][...] = rng.normal(0.0, 0.5, c)
            layer.buffers["moving_mean"][...] = rng.normal(0.0, 0.5, c)
            layer.buffers["moving_variance"][...] = rng.uniform(0.2, 3.0, c)
    return model


@pytest.mark.parametrize("kw", [dict(alpha=0.25, resolution=32, in_channels=1, classes=10),
                                dict(alpha=0.5, resolution=40, classes=7, activation="relu6"),
                                dict(alpha=0.25, resolution=32, classes=5, classifier="conv", fuse=False)])
def test_folded_mobilenet_gives_the_same_logits(kw):
    """Every conv + batch norm (+ ReLU) pair folds (13 depthwise, 13 pointwise, the input conv), with the fused
    BatchNormAct layers or with separate BatchNorm and ReLU layers (fuse=False); the Keras-style conv classifier has
    no batch norm and stays. The logits agree to float32 rounding and the predicted classes are the same."""
    model = _randomize_batchnorms(models.mobilenet_v1(**kw, seed=1)).eval()
    folded = fold_batchnorm(model)
    x = np.random.default_rng(2).standard_normal((6, kw["resolution"], kw["resolution"],
                                                  kw.get("in_channels", 3))).astype(np.float32)
    want, got = model.forward(x), folded.forward(x)
    assert_close(got, want, rtol=2e-5, name="logits")
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    pairs = sum(isinstance(a, (Conv2D, DepthwiseConv2D, PointwiseConv2D)) and isinstance(b, BatchNorm | BatchNormAct)
                for a, b in zip(model.layers, model.layers[1:]))
    assert pairs == 27 and sum(isinstance(layer, FoldedConv) for layer in folded.layers) == pairs
    assert not any(isinstance(layer, (BatchNorm, BatchNormAct)) for layer in folded.layers)
    assert folded.macs() == model.macs() and folded.output_shape() == model.output_shape()
    assert folded.name == f"{model.name}_folded" and not folded.training


def _block_net(conv, follow, dtype):
    """A small network: a conv of some kind, the batch-norm pattern under test, then pooling and a classifier."""
    return Sequential([conv, *follow, GlobalAvgPool2D(name="pool"), Linear(conv.out_channels, 3, name="fc")],
                      input_shape=(9, 7, conv.in_channels), name="net").astype(dtype)


CONVS = {
    "conv": lambda rng, s, p: Conv2D(3, 5, 3, stride=s, padding=p, use_bias=True, name="c", rng=rng),
    "conv 1x3 no bias": lambda rng, s, p: Conv2D(3, 4, (1, 3), stride=s, padding=p, name="c", rng=rng),
    "depthwise": lambda rng, s, p: DepthwiseConv2D(3, 3, stride=s, padding=p, name="c", rng=rng),
    "depthwise M=2 bias": lambda rng, s, p: DepthwiseConv2D(3, 3, stride=s, padding=p, depth_multiplier=2,
                                                            use_bias=True, name="c", rng=rng),
    "depthwise 5x5": lambda rng, s, p: DepthwiseConv2D(3, 5, stride=s, padding=p, name="c", rng=rng),
    "pointwise": lambda rng, s, p: PointwiseConv2D(3, 6, use_bias=True, name="c", rng=rng),
}
FOLLOWS = {
    "bn+relu fused": (lambda c: [BatchNormAct(c, "relu", name="bn")], "relu"),
    "bn+relu6 fused": (lambda c: [BatchNormAct(c, "relu6", name="bn")], "relu6"),
    "bn, relu": (lambda c: [BatchNorm(c, name="bn"), ReLU(name="act")], "relu"),
    "bn, relu6": (lambda c: [BatchNorm(c, name="bn"), ReLU6(name="act")], "relu6"),
    "bn alone": (lambda c: [BatchNorm(c, name="bn")], None),
}


@given(conv=st.sampled_from(sorted(CONVS)), follow=st.sampled_from(sorted(FOLLOWS)), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from(["same", "valid", 1]), seed=st.integers(0, 2 ** 32 - 1))
def test_every_pattern_folds_exactly_in_float64(conv, follow, stride, padding, seed):
    """In float64 the folded network equals the unfolded one to rounding, for each conv kind, activation, stride
    and padding; the folded layer keeps the conv's name, parameter names and mult-adds."""
    rng = np.random.default_rng(seed)
    layer = CONVS[conv](rng, stride, padding)
    make_follow, act = FOLLOWS[follow]
    model = _randomize_batchnorms(_block_net(layer, make_follow(layer.out_channels), np.float64), seed).eval()
    folded = fold_batchnorm(model)
    x = rng.standard_normal((2, 9, 7, 3))
    assert_close(folded.forward(x), model.forward(x), rtol=1e-12, name="logits")
    f = folded.layers[0]
    assert isinstance(f, FoldedConv) and f.name == "c" and f.act == act and f.kind == layer.kind
    assert set(f.params) == {"depthwise_kernel" if layer.kind == "depthwise" else "kernel", "bias"}
    assert [lay.name for lay in folded.layers] == ["c", "pool", "fc"]
    assert f.macs((9, 7, 3)) == layer.macs((9, 7, 3))


def test_the_folded_model_is_a_snapshot_and_the_original_is_untouched():
    model = _randomize_batchnorms(models.mobilenet_v1(alpha=0.25, resolution=32, classes=4, seed=0)).eval()
    before = model.state_dict()
    folded = fold_batchnorm(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    y = folded.forward(x)
    for _, p, _ in model.named_parameters():
        p += 1.0  # training the original on does not reach the folded copy, and vice versa
    np.testing.assert_array_equal(folded.forward(x), y)
    folded_ids = {id(p) for _, p, _ in folded.named_parameters()}
    assert not folded_ids & {id(p) for _, p, _ in model.named_parameters()}


def test_folded_layers_refuse_training():
    folded = fold_batchnorm(models.mobilenet_v1(alpha=0.25, resolution=32, classes=4, seed=0))
    x = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(RuntimeError, match="folded into this convolution for inference; train the original"):
        folded.forward(x, training=True)
    with pytest.raises(RuntimeError, match="no backward pass"):
        folded.layers[0].backward(np.zeros((2, 16, 16, 8), np.float32))


def test_layers_without_a_batch_norm_after_a_conv_are_copied_unchanged():
    rng = np.random.default_rng(0)
    model = Sequential([BatchNorm(3, name="bn_in"), Conv2D(3, 4, 3, name="c", rng=rng), ReLU(name="r"),
                        Dropout(0.5, name="d"), GlobalAvgPool2D(name="p"), Linear(4, 2, name="fc", rng=rng)],
                       input_shape=(6, 6, 3))
    _randomize_batchnorms(model).eval()
    folded = fold_batchnorm(model)
    assert [type(lay).__name__ for lay in folded.layers] == [type(lay).__name__ for lay in model.layers]
    x = rng.standard_normal((3, 6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(folded.forward(x), model.forward(x))


def test_bad_arguments():
    with pytest.raises(TypeError, match="fold_batchnorm takes a Sequential"):
        fold_batchnorm([Conv2D(3, 4)])
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        FoldedConv(Conv2D(3, 4), ReLU())
    with pytest.raises(ValueError, match="has 5 channels, but convolution 'c' has 4 outputs"):
        FoldedConv(Conv2D(3, 4, name="c"), BatchNorm(5, name="bn"))
    with pytest.raises(ValueError, match="act must be None, 'relu' or 'relu6'"):
        FoldedConv(Conv2D(3, 4), BatchNorm(4), act="gelu")
    folded = fold_batchnorm(Sequential([Conv2D(3, 4, name="c"), BatchNormAct(4, name="bn")]))
    with pytest.raises(ValueError, match="layer 'c': input must have 3 channels"):
        folded.forward(np.zeros((1, 5, 5, 2), np.float32))


def test_a_conv_before_a_3x3_depthwise_hands_it_its_output_pass():
    """MobileNet at res 64: the input conv and the pointwise convs before 3x3 depthwise convs whose output is >= 4
    wide defer their bias and activation to the depthwise kernel's input copy; before the 2-wide outputs they do
    not. Deferring changes no logit bit; without an input shape nothing is deferred."""
    model = _randomize_batchnorms(models.mobilenet_v1(alpha=0.25, resolution=64, classes=4, seed=3)).eval()
    folded = fold_batchnorm(model)
    deferred = [a.name for a in folded.layers if isinstance(a, FoldedConv) and a.defer]
    # res 64: the outputs of dw 1-11 are 32, 16, 16, 8, 8, 4 x 6 wide; dw 12 (stride 2) and 13 are 2 wide
    assert deferred == ["conv1"] + [f"conv_pw_{i}" for i in range(1, 11)]
    for a, b in zip(folded.layers, folded.layers[1:]):
        handed = isinstance(a, FoldedConv) and a.defer
        assert (getattr(b, "in_bias", None) is not None) == handed
        assert not handed or (b.in_bias is a.params["bias"] and b.in_act == a.act == "relu")
    x = np.random.default_rng(4).standard_normal((3, 64, 64, 3)).astype(np.float32)
    y = folded.forward(x)
    assert_close(y, model.forward(x), rtol=2e-5, name="logits")
    no_shape = Sequential([layer for layer in model.layers], name="m").eval()
    undeferred = fold_batchnorm(no_shape)
    assert not any(getattr(a, "defer", False) for a in undeferred.layers)
    np.testing.assert_array_equal(undeferred.forward(x), y)
    first = folded.layers[0]  # its output is the bare convolution's now
    np.testing.assert_array_equal(first.forward(x), conv2d_forward(x, first.params["kernel"], stride=2,
                                                                   padding="same"))


def test_a_folded_model_counts_summarizes_casts_and_saves_like_any_model(tmp_path, capsys):
    """The folded layers keep the conv geometry the counters read (the separable-block table is the original's),
    cast to float64 with their deferred passes (the depthwise layer reads the bias of the layer before at call
    time), and save and load their state."""
    from tinyconv.counting import count
    model = _randomize_batchnorms(models.mobilenet_v1(alpha=0.25, resolution=64, classes=4, seed=5)).eval()
    folded = fold_batchnorm(model)
    want, got = count(model), count(folded)
    assert got.macs == want.macs and [b.ratio for b in got.blocks] == [b.ratio for b in want.blocks]
    folded.summary()
    assert "(folded)" in capsys.readouterr().out
    x = np.random.default_rng(6).standard_normal((2, 64, 64, 3))
    y32 = folded.forward(x.astype(np.float32))
    folded.astype(np.float64)  # its weights were rounded to float32 when folded: close, not 1e-12
    assert_close(folded.forward(x), model.astype(np.float64).forward(x), rtol=2e-5, name="float64 logits")
    assert_close(folded.forward(x), y32, rtol=2e-5, name="float32 against float64")
    assert_close(fold_batchnorm(model).forward(x), model.forward(x), rtol=1e-12, name="folded in float64")
    folded.save(tmp_path / "folded.npz")
    again = fold_batchnorm(models.mobilenet_v1(alpha=0.25, resolution=64, classes=4, seed=9)).astype(np.float64)
    again.load(tmp_path / "folded.npz")
    np.testing.assert_array_equal(again.forward(x), folded.forward(x))
