"""MobileNet v1 (Howard et al. 2017) as a table of rows and one builder that loops over it.

The table is the paper's Table 1 with each depthwise-separable pair (3x3 depthwise + BN + ReLU, then 1x1 pointwise
+ BN + ReLU) as one ``sep`` row. Table 1 prints stride 2 for the last depthwise layer, but its input and output are
both 7x7: that is a typo and the row below has stride 1, as in Keras and TF-slim.

Layer names follow Keras's ``applications.MobileNet`` (``conv1``, ``conv1_bn``, ``conv1_relu``, ``conv_dw_1``,
``conv_dw_1_bn``, ``conv_dw_1_relu``, ``conv_pw_1``, ..., ``conv_preds``), so parameters can be matched by name.
By default each ``_bn``/``_relu`` pair is one fused ``BatchNormAct`` layer named ``..._bn`` whose parts carry both
names (``fuse=False`` builds them as two layers).
Keras inserts ``ZeroPadding2D`` layers before strided convs to get TensorFlow's 'same' padding (extra row and column
bottom/right); here 'same' padding does that inside the conv, so those layers have no counterpart.
"""
import math
from typing import NamedTuple

import numpy as np

from tinyconv import (AvgPool2D, BatchNorm, BatchNormAct, Conv2D, DepthwiseConv2D, Dropout, Flatten,
                      GlobalAvgPool2D, Linear, MaxPool2D, PointwiseConv2D, Sequential, activation as make_activation)


class Row(NamedTuple):
    """One row of the architecture table.

    Attributes:
        kind: 'conv' (standard conv + BN + activation) or 'sep' (depthwise-separable block).
        kernel: spatial kernel size (square).
        stride: stride of the conv, or of the block's depthwise conv.
        channels: output channels at alpha = 1.
    """
    kind: str
    kernel: int
    stride: int
    channels: int


MOBILENET_V1 = (
    Row("conv", 3, 2, 32),    # 224 -> 112
    Row("sep", 3, 1, 64),     # block 1
    Row("sep", 3, 2, 128),    # 112 -> 56
    Row("sep", 3, 1, 128),
    Row("sep", 3, 2, 256),    # 56 -> 28
    Row("sep", 3, 1, 256),
    Row("sep", 3, 2, 512),    # 28 -> 14
    Row("sep", 3, 1, 512),    # blocks 7-11: the five 14x14x512 blocks the paper's shallow variant drops
    Row("sep", 3, 1, 512),
    Row("sep", 3, 1, 512),
    Row("sep", 3, 1, 512),
    Row("sep", 3, 1, 512),
    Row("sep", 3, 2, 1024),   # 14 -> 7
    Row("sep", 3, 1, 1024),   # block 13 (Table 1's "s2" here is a typo)
)
"""MobileNet v1 at alpha = 1, the paper's Table 1; followed by global average pooling and the classifier."""

SHALLOW_BLOCKS = (7, 8, 9, 10, 11)
"""Block numbers the paper's shallow MobileNet removes (Section 4.2: the five 14x14x512 separable layers)."""


def _check_number(name, value, low, inclusive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < low or (value == low and not inclusive):
        op = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a number {op} {low}, got {value!r}")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def mobilenet_v1(*, alpha=1.0, resolution=224, classes=1000, dropout=1e-3, include_top=True, pooling=None,
                 depth_multiplier=1, activation="relu", shallow=False, full_conv=False, in_channels=3,
                 min_depth=None, classifier="fc", seed=0, dtype=np.float32, bn_momentum=0.99, bn_eps=1e-3,
                 fuse=True):
    """Build MobileNet v1 as a Sequential model.

    Args:
        alpha: width multiplier (> 0); every layer has ``int(c * alpha)`` channels (Keras's rule).
        resolution: input height and width (>= 32, as Keras); the paper's resolution multiplier is
            ``resolution / 224``.
        classes: number of classes of the classifier.
        dropout: dropout rate before the classifier (Keras's default 1e-3).
        include_top: end with global average pooling, dropout and the classifier (logits, no softmax).
        pooling: without the top: None (feature map), 'avg' or 'max' (global pooling to a vector).
        depth_multiplier: channel multiplier of every depthwise conv (Keras's ``depth_multiplier``).
        activation: 'relu' (the paper) or 'relu6' (Keras).
        shallow: drop the five 14x14x512 separable blocks (the paper's shallow MobileNet, Table 5).
        full_conv: replace every separable block by a standard 3x3 conv from C_in to C_out (Table 4).
        in_channels: input channels.
        min_depth: if given, channels are ``max(int(c * alpha), min_depth)`` (TF-slim's rule).
        classifier: 'fc' (a Linear with bias on the pooled vector) or 'conv' (Keras's layout: average pooling
            to 1x1, a 1x1 conv with bias, then a reshape). Both have Keras's parameters and mult-adds.
        seed: seeds the numpy Generator every layer is initialized from.
        dtype: float32 or float64.
        bn_momentum, bn_eps: batch-norm hyperparameters (Keras's defaults).
        fuse: compute each batch norm and its activation as one ``BatchNormAct`` layer named like the batch norm
            (same parameters, names and counts; about a third of the memory passes). False keeps Keras's separate
            ``..._bn`` and ``..._relu`` layers.

    Returns:
        Sequential named like Keras (``mobilenet_1.00_224``) taking (N, resolution, resolution, in_channels);
        with the top it returns logits (N, classes).

    Raises:
        ValueError: an argument out of range, naming it.
    """
    _check_number("alpha", alpha, 0)
    _check_int("resolution", resolution, 32)
    _check_int("classes", classes, 1)
    _check_number("dropout", dropout, 0, inclusive=True)
    if dropout >= 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    _check_choice("pooling", pooling, (None, "avg", "max"))
    if include_top and pooling is not None:
        raise ValueError("pooling applies only with include_top=False (the top already pools)")
    _check_int("depth_multiplier", depth_multiplier, 1)
    _check_choice("activation", activation, ("relu", "relu6"))
    _check_int("in_channels", in_channels, 1)
    if min_depth is not None:
        _check_int("min_depth", min_depth, 1)
    _check_choice("classifier", classifier, ("fc", "conv"))

    def depth(c):
        d = int(c * alpha)
        d = d if min_depth is None else max(d, min_depth)
        if d < 1:
            raise ValueError(f"alpha={alpha} leaves {c} channels with int({c} * {alpha}) = 0; "
                             f"use a larger alpha or set min_depth")
        return d

    rng = np.random.default_rng(seed)
    common = dict(rng=rng, dtype=dtype)

    def bn_act(name, channels):
        if fuse:
            return [BatchNormAct(channels, activation, momentum=bn_momentum, eps=bn_eps, name=f"{name}_bn",
                                 act_name=f"{name}_relu", dtype=dtype)]
        return [BatchNorm(channels, momentum=bn_momentum, eps=bn_eps, name=f"{name}_bn", dtype=dtype),
                make_activation(activation, name=f"{name}_relu")]

    layers = []
    c, size, block = in_channels, resolution, 0
    for row in MOBILENET_V1:
        n = depth(row.channels)
        if row.kind == "conv":
            layers += [Conv2D(c, n, row.kernel, stride=row.stride, padding="same", name="conv1", **common),
                       *bn_act("conv1", n)]
        else:
            block += 1
            if shallow and block in SHALLOW_BLOCKS:
                continue
            if full_conv:
                name = f"conv_full_{block}"
                layers += [Conv2D(c, n, row.kernel, stride=row.stride, padding="same", name=name, **common),
                           *bn_act(name, n)]
            else:
                dw, pw = f"conv_dw_{block}", f"conv_pw_{block}"
                layers += [DepthwiseConv2D(c, row.kernel, stride=row.stride, padding="same",
                                           depth_multiplier=depth_multiplier, name=dw, **common),
                           *bn_act(dw, c * depth_multiplier),
                           PointwiseConv2D(c * depth_multiplier, n, name=pw, **common),
                           *bn_act(pw, n)]
        c, size = n, -(-size // row.stride)  # 'same' padding: ceil(size / stride)

    layers += _top(c, size, include_top=include_top, pooling=pooling, classes=classes, dropout=dropout,
                   classifier=classifier, rng=rng, dtype=dtype)
    return Sequential(layers, input_shape=(resolution, resolution, in_channels),
                      name=f"mobilenet_{alpha:0.2f}_{resolution}")


def _top(channels, size, *, include_top, pooling, classes, dropout, classifier, rng, dtype):
    """Keras's head: pooling, dropout and the classifier with bias; or just the pooling without the top."""
    if not include_top:
        if pooling == "avg":
            return [GlobalAvgPool2D(name="global_average_pooling2d")]
        if pooling == "max":
            return [MaxPool2D(size, name="global_max_pooling2d"), Flatten(name="flatten")]
        return []
    drop = Dropout(dropout, seed=int(rng.integers(2**32)), name="dropout")
    if classifier == "fc":
        return [GlobalAvgPool2D(name="global_average_pooling2d"), drop,
                Linear(channels, classes, name="conv_preds", rng=rng, dtype=dtype)]
    return [AvgPool2D(size, name="global_average_pooling2d"), drop,
            PointwiseConv2D(channels, classes, use_bias=True, name="conv_preds", rng=rng, dtype=dtype),
            Flatten(name="reshape_2")]
