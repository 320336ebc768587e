"""tinyconv: the layer graph, optimizers, data, checkpoints and training on top of the kernels.

Importing compiles no kernel: each compiles on first use and is cached on disk.
"""
import kernels  # noqa: F401  (first: it sets a BLAS thread default that only applies before NumPy loads)
from tinyconv.fold import FoldedConv, fold_batchnorm
from tinyconv.layer import Layer
from tinyconv.layers import (AvgPool2D, BatchNorm, BatchNormAct, Conv2D, DepthwiseConv2D, Dropout, Flatten,
                             GlobalAvgPool2D, Linear, MaxPool2D, PointwiseConv2D, ReLU, ReLU6, activation)
from tinyconv.loss import SoftmaxCrossEntropy
from tinyconv.sequential import Sequential, StateError
from tinyconv.threads import set_threads

__all__ = [
    "Layer", "Conv2D", "DepthwiseConv2D", "PointwiseConv2D", "BatchNorm", "BatchNormAct", "ReLU", "ReLU6", "activation",
    "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "Dropout", "Flatten", "Linear", "SoftmaxCrossEntropy",
    "Sequential", "StateError", "set_threads", "FoldedConv", "fold_batchnorm",
]
