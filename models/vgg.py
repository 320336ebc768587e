"""VGG16 (Simonyan and Zisserman 2015, configuration D), built from the same layers as MobileNet.

It is here for the MobileNet paper's comparison rows (Table 8: 15300 million mult-adds, 138 million parameters).
Layer names follow Keras's ``applications.VGG16`` (``block1_conv1``, ..., ``block5_pool``, ``fc1``, ``fc2``,
``predictions``): 3x3 convs with bias and ReLU, 2x2 max pooling, then three fully connected layers.
"""
import numpy as np

from models.mobilenet import _check_choice, _check_int
from tinyconv import Conv2D, Dropout, Flatten, GlobalAvgPool2D, Linear, MaxPool2D, Sequential
from tinyconv import activation as make_activation

VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
"""Output channels of the 3x3 convs, one tuple per block; each block ends with a 2x2 stride-2 max pooling."""

FC_WIDTH = 4096


def vgg16(*, resolution=224, classes=1000, include_top=True, pooling=None, in_channels=3, activation="relu",
          dropout=0.0, seed=0, dtype=np.float32):
    """Build VGG16 as a Sequential model.

    Args:
        resolution: input height and width (>= 32, as Keras).
        classes: outputs of the last FC layer (logits, no softmax).
        include_top: end with flatten and the three FC layers (fc1, fc2, predictions).
        pooling: without the top: None (feature map), 'avg' (global average pooling) or 'max'.
        in_channels: input channels.
        activation: 'relu' (the original) or 'relu6'.
        dropout: dropout rate after fc1 and fc2 (the original trained with 0.5; Keras's model has none: 0).
        seed: seeds the numpy Generator every layer is initialized from.
        dtype: float32 or float64.

    Returns:
        Sequential named 'vgg16' taking (N, resolution, resolution, in_channels).
    """
    _check_int("resolution", resolution, 32)
    _check_int("classes", classes, 1)
    _check_int("in_channels", in_channels, 1)
    _check_choice("pooling", pooling, (None, "avg", "max"))
    if include_top and pooling is not None:
        raise ValueError("pooling applies only with include_top=False (the top already flattens)")
    _check_choice("activation", activation, ("relu", "relu6"))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    rng = np.random.default_rng(seed)
    layers = []
    c, size = in_channels, resolution
    for b, widths in enumerate(VGG16, start=1):
        for i, n in enumerate(widths, start=1):
            name = f"block{b}_conv{i}"
            layers += [Conv2D(c, n, 3, padding="same", use_bias=True, name=name, rng=rng, dtype=dtype),
                       make_activation(activation, name=f"{name}_relu")]
            c = n
        layers.append(MaxPool2D(2, name=f"block{b}_pool"))
        size //= 2  # 2x2 'valid' pooling with stride 2 floors
    if include_top:
        features = size * size * c
        layers.append(Flatten(name="flatten"))
        for name, n_in in (("fc1", features), ("fc2", FC_WIDTH)):
            layers += [Linear(n_in, FC_WIDTH, name=name, rng=rng, dtype=dtype),
                       make_activation(activation, name=f"{name}_relu")]
            if dropout:
                layers.append(Dropout(dropout, seed=int(rng.integers(2**32)), name=f"{name}_dropout"))
        layers.append(Linear(FC_WIDTH, classes, name="predictions", rng=rng, dtype=dtype))
    elif pooling == "avg":
        layers.append(GlobalAvgPool2D(name="global_average_pooling2d"))
    elif pooling == "max":
        layers += [MaxPool2D(size, name="global_max_pooling2d"), Flatten(name="flatten")]
    return Sequential(layers, input_shape=(resolution, resolution, in_channels), name="vgg16")
