"""MobileNet v1, VGG16 and the small CNN: Keras's names and parameter counts, variants, arguments, forward shapes."""
import numpy as np
import pytest

import models
from tinyconv.summary import summary

# Keras's applications.MobileNet(alpha=1.0, weights=None).summary(), 1000 classes.
KERAS_MOBILENET_1_0 = dict(total=4_253_864, trainable=4_231_976)
# (stride, output channels) of the 13 separable blocks, re-typed from the paper's Table 1.
BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)] + [(1, 512)] * 5 + [(2, 1024), (1, 1024)]


def keras_params(alpha, classes=1000):
    """Keras's trainable and total parameters, from the architecture alone."""
    c = int(32 * alpha)
    weights, bn_channels = 27 * c, c
    for _, n in BLOCKS:
        n = int(n * alpha)
        weights += 9 * c + c * n
        bn_channels += c + n
        c = n
    trainable = weights + c * classes + classes + 2 * bn_channels
    return trainable, trainable + 2 * bn_channels


def test_keras_counts_at_alpha_1():
    m = models.mobilenet_v1()
    assert (m.param_count(), m.param_count(False)) == (KERAS_MOBILENET_1_0["trainable"],
                                                       KERAS_MOBILENET_1_0["total"])


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize("classifier", ["fc", "conv"])
def test_param_counts_equal_keras(alpha, classifier):
    m = models.mobilenet_v1(alpha=alpha, classifier=classifier, classes=10 if classifier == "conv" else 1000)
    trainable, total = keras_params(alpha, 10 if classifier == "conv" else 1000)
    assert m.param_count() == trainable
    assert m.param_count(trainable_only=False) == total


def test_layer_names_follow_keras():
    names = [layer.name for layer in models.mobilenet_v1(fuse=False).layers]
    fused = [part.name for layer in models.mobilenet_v1().layers for part in layer.parts()]
    assert fused == names  # a fused BN + ReLU layer's parts carry both Keras names
    assert names[:3] == ["conv1", "conv1_bn", "conv1_relu"]
    for i in range(1, 14):
        for part in ("dw", "pw"):
            for suffix in ("", "_bn", "_relu"):
                assert f"conv_{part}_{i}{suffix}" in names
    assert names[-3:] == ["global_average_pooling2d", "dropout", "conv_preds"]
    conv_top = [layer.name for layer in models.mobilenet_v1(classifier="conv").layers]
    assert conv_top[-2:] == ["conv_preds", "reshape_2"]


def test_channel_rule_and_min_depth():
    m = models.mobilenet_v1(alpha=0.3)
    widths = {layer.name: layer.out_channels for layer in m.layers if hasattr(layer, "out_channels")}
    assert widths["conv1"] == int(32 * 0.3) == 9
    assert widths["conv_pw_13"] == int(1024 * 0.3)
    slim = models.mobilenet_v1(alpha=0.1, min_depth=8)
    assert {layer.name: layer.out_channels for layer in slim.layers if hasattr(layer, "out_channels")}[
        "conv1"] == 8


def test_variants_change_the_table_not_the_model():
    shallow = [layer.name for layer in models.mobilenet_v1(shallow=True).layers]
    assert "conv_dw_6" in shallow and "conv_dw_12" in shallow
    assert not any(f"conv_dw_{i}" in shallow for i in range(7, 12))
    full = models.mobilenet_v1(full_conv=True)
    assert not any(layer.kind in ("depthwise", "pointwise") for layer in full.layers[:-1])
    assert full.output_shape() == (1000,)
    dm = models.mobilenet_v1(depth_multiplier=2)
    by_name = {layer.name: layer for layer in dm.layers}
    assert by_name["conv_dw_1"].out_channels == 64 and by_name["conv_pw_1"].in_channels == 64


@pytest.mark.parametrize("kwargs,shape", [
    (dict(include_top=False), (7, 7, 1024)),
    (dict(include_top=False, pooling="avg"), (1024,)),
    (dict(include_top=False, pooling="max"), (1024,)),
    (dict(resolution=192, classes=10), (10,)),
    (dict(resolution=33, in_channels=1), (1000,)),
])
def test_output_shapes(kwargs, shape):
    assert models.mobilenet_v1(**kwargs).output_shape() == shape


def test_seed_sets_every_weight():
    a, b, c = (models.mobilenet_v1(alpha=0.25, resolution=32, seed=s) for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["conv1/kernel"], sc["conv1/kernel"])


@pytest.mark.parametrize("kwargs,words", [
    (dict(alpha=0), "alpha"), (dict(alpha=-0.5), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=True), "alpha"), (dict(alpha=0.01), "alpha"), (dict(resolution=31), "resolution"),
    (dict(resolution=224.0), "resolution"), (dict(classes=0), "classes"), (dict(dropout=1.0), "dropout"),
    (dict(activation="gelu"), "activation"), (dict(pooling="avg"), "pooling"), (dict(classifier="svm"),
                                                                                "classifier"),
    (dict(depth_multiplier=0), "depth_multiplier"), (dict(min_depth=0), "min_depth"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        models.mobilenet_v1(**kwargs)


def test_build_by_name():
    assert models.build("small").name == "small_cnn"
    assert models.build("mobilenet", alpha=0.5, resolution=128).name == "mobilenet_0.50_128"
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.build("resnet")
    with pytest.raises(ValueError, match="resolution"):
        models.build("vgg16", resolution=16)


def _summary_shapes(model):
    text = summary(model)
    return {line.split()[0]: line for line in text.splitlines()}


@pytest.mark.parametrize("build", [
    lambda: models.small_cnn(dtype=np.float64),
    lambda: models.mobilenet_v1(alpha=0.25, resolution=32, classes=7, dtype=np.float64),
    lambda: models.mobilenet_v1(alpha=0.25, resolution=35, classes=7, classifier="conv", in_channels=1),
])
def test_forward_output_shape_matches_summary(build):
    model = build()
    x = np.random.default_rng(0).standard_normal((2, *model.input_shape)).astype(model.layers[0].dtype)
    shapes = {}
    y = x
    for layer in model.layers:
        y = layer.forward(y)
        shapes[layer.name] = y.shape[1:]
    assert model.forward(x).shape == (2, model.output_shape()[0])
    rows = _summary_shapes(model)
    for name, shape in shapes.items():
        assert "(None, " + ", ".join(map(str, shape)) + ")" in rows[name]


def test_vgg16_layers_and_names():
    vgg = models.vgg16(resolution=32, classes=10)
    names = [layer.name for layer in vgg.layers]
    assert names[:3] == ["block1_conv1", "block1_conv1_relu", "block1_conv2"]
    assert names[-1] == "predictions" and "block5_pool" in names and "fc2" in names
    assert vgg.output_shape() == (10,)


@pytest.mark.parametrize("dtype, activation, res", [(np.float32, "relu", 32), (np.float64, "relu6", 40)])
def test_deferred_batchnorm_trains_bit_for_bit_as_written(dtype, activation, res):
    """A training batch norm that hands its normalization to the depthwise conv after it (which applies it as it
    copies rows, forward and weight gradient alike) gives the same logits, gradients, parameters and running
    statistics, bit for bit, as one that writes its output; and it does defer where the conv copies rows."""
    from tinyconv import SoftmaxCrossEntropy
    from tinyconv.layers import BatchNormAct
    from tinyconv.optim import SGD
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, res, res, 1)).astype(dtype)
    labels = rng.integers(0, 10, 6)
    runs, deferred = {}, []
    original = BatchNormAct.forward_deferred
    for defer in (True, False):
        model = models.mobilenet_v1(alpha=0.25, resolution=res, classes=10, in_channels=1, dropout=0.0, seed=3,
                                    dtype=dtype, activation=activation).train()
        model.defer_batchnorm = defer
        opt = SGD(model.named_parameters(), lr=0.05, momentum=0.9)
        loss, logits = SoftmaxCrossEntropy(), []
        BatchNormAct.forward_deferred = lambda self, v: deferred.append(self.name) or original(self, v)
        try:
            for _ in range(3):
                model.zero_grad()
                logits.append(model.forward(x))
                loss.forward(logits[-1], labels)
                model.backward(loss.backward())
                opt.step()
        finally:
            BatchNormAct.forward_deferred = original
        runs[defer] = (logits, {n: g.copy() for n, _, g in model.named_parameters()},
                       {n: p.copy() for n, p, _ in model.named_parameters()}, dict(model.named_buffers()))
        if defer:
            # every batch norm whose depthwise conv has rows of >= 4 columns (16x16 down to 4x4 at res 32)
            assert {"conv1_bn", "conv_pw_1_bn", "conv_pw_2_bn", "conv_pw_3_bn", "conv_pw_4_bn"} <= set(deferred)
            assert "conv_pw_13_bn" not in deferred  # feeds the pooling, not a depthwise conv
            assert "conv_pw_11_bn" not in deferred  # its depthwise conv has 2x2 (res 40: 3x3) maps
        else:
            assert len(deferred) == 3 * len(set(deferred)), "nothing may defer with defer_batchnorm off"
    for a, b in zip(runs[True][0], runs[False][0]):
        np.testing.assert_array_equal(a, b)
    for part in (1, 2, 3):
        for name, value in runs[True][part].items():
            np.testing.assert_array_equal(value, runs[False][part][name], err_msg=name)
