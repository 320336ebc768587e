"""A small MobileNet-like CNN for fast tests and quick training runs on 28x28 images (Fashion-MNIST).

It uses every layer MobileNet uses (conv, batch norm, ReLU, depthwise, pointwise, global average pooling, dropout,
FC) plus a max pooling, so a test on it exercises the whole layer set in milliseconds.
"""
import numpy as np

from models.mobilenet import _check_choice, _check_int
from tinyconv import (BatchNorm, Conv2D, DepthwiseConv2D, Dropout, GlobalAvgPool2D, Linear, MaxPool2D,
                      PointwiseConv2D, Sequential)
from tinyconv import activation as make_activation


def small_cnn(*, resolution=28, in_channels=1, classes=10, width=8, dropout=0.0, activation="relu", seed=0,
              dtype=np.float32, bn_momentum=0.99, bn_eps=1e-3):
    """Build conv3x3-BN-act, maxpool 2x2, a strided separable block (width -> 2 width), GAP, dropout, FC.

    Args:
        resolution: input height and width (>= 4).
        in_channels, classes: input channels and number of classes.
        width: channels of the first conv; the separable block doubles them.
        dropout: rate before the classifier.
        activation: 'relu' or 'relu6'.
        seed, dtype, bn_momentum, bn_eps: as :func:`models.mobilenet_v1`.

    Returns:
        Sequential named 'small_cnn' taking (N, resolution, resolution, in_channels), returning logits (N, classes).
    """
    _check_int("resolution", resolution, 4)
    _check_int("in_channels", in_channels, 1)
    _check_int("classes", classes, 1)
    _check_int("width", width, 1)
    _check_choice("activation", activation, ("relu", "relu6"))
    rng = np.random.default_rng(seed)

    def bn_act(name, c):
        return [BatchNorm(c, momentum=bn_momentum, eps=bn_eps, name=f"{name}_bn", dtype=dtype),
                make_activation(activation, name=f"{name}_relu")]

    w2 = 2 * width
    layers = [
        Conv2D(in_channels, width, 3, padding="same", name="conv1", rng=rng, dtype=dtype), *bn_act("conv1", width),
        MaxPool2D(2, name="pool1"),
        DepthwiseConv2D(width, 3, stride=2, padding="same", name="conv_dw_1", rng=rng, dtype=dtype),
        *bn_act("conv_dw_1", width),
        PointwiseConv2D(width, w2, name="conv_pw_1", rng=rng, dtype=dtype), *bn_act("conv_pw_1", w2),
        GlobalAvgPool2D(name="global_average_pooling2d"),
        Dropout(dropout, seed=int(rng.integers(2**32)), name="dropout"),
        Linear(w2, classes, name="fc", rng=rng, dtype=dtype),
    ]
    return Sequential(layers, input_shape=(resolution, resolution, in_channels), name="small_cnn")
