"""MobileNet v1 in PyTorch, layer for layer the network ``models.mobilenet_v1`` builds: the benchmarks' peer.

Identical in everything that changes results or cost:
    the table    ``models.mobilenet.MOBILENET_V1`` itself, channels ``int(c * alpha)`` (Keras's rule);
    padding      TensorFlow's 'same' from ``kernels.geometry.conv_geometry``: symmetric convs pad inside
                 ``nn.Conv2d``; a strided conv on an even size pads (0, 1) bottom/right with ``F.pad`` first, as
                 Keras's ZeroPadding2D does (PyTorch's usual pad-1-everywhere would shift every strided output);
    batch norm   eps as given, ``momentum = 1 - bn_momentum`` (Keras's 0.99 is PyTorch's 0.01); both update
                 the running variance with the unbiased batch variance;
    top          global average pooling, dropout, a Linear classifier with bias (tinyconv's ``classifier='fc'``).
Module names are tinyconv's (``conv1``, ``conv_dw_1_bn``, ``conv_pw_13_relu``, ``conv_preds``), so
:func:`copy_from_tinyconv` can load a tinyconv model's weights and buffers by name and the two give the same
outputs; :func:`copy_weights` does the same across processes (the benchmarks' tinyconv worker
sends its model's weights to the torch worker). Only ``bench/`` imports this file (and torch).
"""
import copy
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.geometry import conv_geometry
from models.mobilenet import MOBILENET_V1, SHALLOW_BLOCKS


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's 'same' padding for one input size (asymmetric pads via ``F.pad``).

    Args:
        in_channels, out_channels, kernel_size, stride, groups: as ``nn.Conv2d`` (square kernel and stride).
        in_size: input height and width the padding is computed for; other sizes are rejected.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, stride, groups=1, in_size):
        g = conv_geometry(in_size, in_size, kernel_size, stride, "same")
        symmetric = g.pt == g.pb and g.pl == g.pr
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(g.pt, g.pl) if symmetric else 0, groups=groups, bias=False)
        self.in_size = in_size
        self.pad = None if symmetric else (g.pl, g.pr, g.pt, g.pb)  # F.pad order: left, right, top, bottom

    def forward(self, x):
        if x.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(f"SameConv2d was built for {self.in_size}x{self.in_size} input, got {tuple(x.shape)}")
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return super().forward(x)


def mobilenet_v1(*, alpha=1.0, resolution=224, classes=1000, in_channels=3, dropout=1e-3, activation="relu",
                 shallow=False, full_conv=False, bn_momentum=0.99, bn_eps=1e-3, seed=0):
    """MobileNet v1 as ``nn.Sequential`` with tinyconv's layer names; NCHW modules (use channels_last freely).

    Args:
        alpha, resolution, classes, in_channels, dropout, activation, shallow, full_conv, bn_momentum, bn_eps:
            as ``models.mobilenet_v1`` (Keras conventions; ``bn_momentum=0.99`` is PyTorch's momentum 0.01).
        seed: seeds the initialization (He-uniform kernels, Glorot-uniform classifier, as tinyconv); to get the
            very same weights as a tinyconv model, use :func:`copy_from_tinyconv`.

    Returns:
        nn.Sequential taking (N, in_channels, resolution, resolution) and returning logits (N, classes).
    """
    if activation not in ("relu", "relu6"):
        raise ValueError(f"activation must be 'relu' or 'relu6', got {activation!r}")
    torch.manual_seed(seed)
    act = nn.ReLU if activation == "relu" else nn.ReLU6
    layers = OrderedDict()

    def conv_bn_act(name, cin, cout, kernel, stride, size, groups=1):
        conv = SameConv2d(cin, cout, kernel, stride=stride, groups=groups, in_size=size)
        fan_in = conv.weight[0].numel()  # (C / groups) * KH * KW, as tinyconv's He-uniform
        nn.init.uniform_(conv.weight, -math.sqrt(6 / fan_in), math.sqrt(6 / fan_in))
        layers[name] = conv
        layers[f"{name}_bn"] = nn.BatchNorm2d(cout, eps=bn_eps, momentum=1 - bn_momentum)
        layers[f"{name}_relu"] = act(inplace=True)

    c, size, block = in_channels, resolution, 0
    for row in MOBILENET_V1:
        n = int(row.channels * alpha)
        if row.kind == "conv":
            conv_bn_act("conv1", c, n, row.kernel, row.stride, size)
        else:
            block += 1
            if shallow and block in SHALLOW_BLOCKS:
                continue
            if full_conv:
                conv_bn_act(f"conv_full_{block}", c, n, row.kernel, row.stride, size)
            else:
                conv_bn_act(f"conv_dw_{block}", c, c, row.kernel, row.stride, size, groups=c)
                conv_bn_act(f"conv_pw_{block}", c, n, 1, 1, -(-size // row.stride))
        c, size = n, -(-size // row.stride)
    layers["global_average_pooling2d"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    layers["dropout"] = nn.Dropout(dropout)
    fc = nn.Linear(c, classes)
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)
    layers["conv_preds"] = fc
    return nn.Sequential(layers)


def fold_batchnorm(torch_model):
    """An inference copy of ``torch_model`` with every batch norm folded into the convolution before it.

    PyTorch's own ``torch.nn.utils.fusion.fuse_conv_bn_eval`` on each (conv, batch norm) pair, the batch norm
    replaced by ``nn.Identity``; the ReLU stays a module of its own (eager PyTorch has no fused activation). The
    benchmarks' peer of ``tinyconv.fold.fold_batchnorm``, so both engines are timed at their best inference path.

    Returns:
        A new nn.Sequential in eval mode, the same layout as the input's parameters.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    children = OrderedDict(copy.deepcopy(torch_model).eval().named_children())
    names = list(children)
    for name, nxt in zip(names, names[1:]):
        if isinstance(children[name], nn.Conv2d) and isinstance(children[nxt], nn.BatchNorm2d):
            children[name] = fuse_conv_bn_eval(children[name], children[nxt])
            children[nxt] = nn.Identity()
    return nn.Sequential(children).eval()


def copy_weights(torch_model, weights):
    """Load weights given as plain data into the matching torch modules, by name.

    Args:
        torch_model: from :func:`mobilenet_v1`.
        weights: list of (layer name, layer kind, {param key: array}, {buffer key: array}) for every tinyconv
            layer with parameters (``bench.model.weights_of`` builds it; it pickles, so it crosses processes).

    Layouts: conv (KH, KW, C, K) -> (K, C, KH, KW); depthwise (KH, KW, C, 1) -> (C, 1, KH, KW); pointwise (C, K)
    -> (K, C, 1, 1); linear (C, K) -> (K, C).

    Returns:
        torch_model.
    """
    modules = dict(torch_model.named_children())
    with torch.no_grad():
        for name, kind, params, buffers in weights:
            if name not in modules:
                raise KeyError(f"torch model has no module named '{name}'")
            m = modules[name]
            p = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
            if kind == "conv":
                m.weight.copy_(p["kernel"].permute(3, 2, 0, 1))
            elif kind == "depthwise":
                kh, kw, c, mult = p["depthwise_kernel"].shape
                m.weight.copy_(p["depthwise_kernel"].reshape(kh, kw, c * mult).permute(2, 0, 1).unsqueeze(1))
            elif kind == "pointwise":
                m.weight.copy_(p["kernel"].T[:, :, None, None])
            elif kind == "linear":
                m.weight.copy_(p["kernel"].T)
                m.bias.copy_(p["bias"])
            elif kind == "batchnorm":
                m.weight.copy_(p["gamma"])
                m.bias.copy_(p["beta"])
                m.running_mean.copy_(torch.from_numpy(np.array(buffers["moving_mean"])))
                m.running_var.copy_(torch.from_numpy(np.array(buffers["moving_variance"])))
            else:
                raise ValueError(f"layer '{name}' of kind {kind} has no torch counterpart here")
    return torch_model


def copy_from_tinyconv(torch_model, tc_model):
    """Load a tinyconv model's parameters and batch-norm buffers into the matching torch modules, by name (see
    :func:`copy_weights` for the layouts).

    Returns:
        torch_model.
    """
    return copy_weights(torch_model, [(layer.name, layer.kind, layer.params, getattr(layer, "buffers", None) or {})
                                      for layer in tc_model.layers if layer.params])


def torch_gradient_like_tinyconv(module, name):
    """The gradient of torch parameter ``name`` ('weight'/'bias') in tinyconv's layout for that layer's kind."""
    g = getattr(module, name).grad
    if name == "bias" or isinstance(module, nn.BatchNorm2d):
        return g.numpy()
    if isinstance(module, nn.Linear):
        return g.T.numpy()
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return g.squeeze(1).permute(1, 2, 0).unsqueeze(-1).numpy()  # (C, 1, KH, KW) -> (KH, KW, C, 1)
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
        return g[:, :, 0, 0].T.numpy()  # (K, C, 1, 1) -> (C, K)
    return g.permute(2, 3, 1, 0).numpy()  # (K, C, KH, KW) -> (KH, KW, C, K)


TORCH_PARAM = {"kernel": "weight", "depthwise_kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
"""tinyconv parameter key -> torch attribute name."""
