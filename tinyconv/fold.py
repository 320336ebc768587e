"""Batch norm folded into the convolution before it, for inference, as deployment converters do.

With its moving statistics, batch norm is a per-channel affine map, BN(z) = k * (z - mean) + beta with
k = gamma / sqrt(var + eps). After a convolution z = conv(x, w) + b (b = 0 without a bias) it gives

    BN(conv(x, w) + b) = conv(x, w * k) + (beta + k * (b - mean))

where ``w * k`` scales each output channel's filter. So a convolution and the batch norm after it become one
convolution with a bias, and the activation that follows runs in the same output pass:
    depthwise        the kernel adds the bias and clips each output row while the row is still in cache
                     (``depthwise_forward(..., bias=, act=)``): the batch norm and the activation cost no pass
                     over memory at all;
    pointwise, conv  the GEMM, then one bias + activation pass over its output in place (``bias_act_forward``),
                     where the unfolded layers write the batch norm's output to a new array: one array less in
                     flight per layer. When a 3x3 depthwise conv comes next, even that pass goes: the
                     depthwise kernel copies each input row into a ring of three rows and applies the bias and
                     activation there (``depthwise_forward(..., in_bias=, in_act=)``), so the folded layer hands
                     its output pass on (``defer``) and returns the bare GEMM output.

:func:`fold_batchnorm` returns a new model for inference: a snapshot of the weights when it is called (fold again
after more training). The folded weights and bias are computed in float64 and rounded once, so the folded model
agrees with the original to float32 rounding (tested on MobileNet), not bit for bit.
"""
import copy

import numpy as np

from kernels import batchnorm as bn_k
from kernels import conv as conv_k
from kernels import depthwise as dw_k
from kernels import pointwise as pw_k
from tinyconv.layer import Layer
from tinyconv.layers import BatchNorm, BatchNormAct, Conv2D, DepthwiseConv2D, PointwiseConv2D, ReLU, ReLU6
from tinyconv.sequential import Sequential

_CONVS = (Conv2D, DepthwiseConv2D, PointwiseConv2D)
_ACTS = ((ReLU, "relu"), (ReLU6, "relu6"))


class FoldedConv(Layer):
    """A convolution with the batch norm after it folded into its weights and bias, and optionally the activation
    after that: y = act(conv(x, w * k) + bias). Inference only.

    Parameters keep the convolution's names (``kernel`` or ``depthwise_kernel``, plus ``bias``), and the layer
    keeps the convolution's name, kind, geometry and mult-add count.

    Args:
        conv: the Conv2D, DepthwiseConv2D or PointwiseConv2D (not modified).
        bn: the BatchNorm that follows it, on its output channels (not modified).
        act: the activation after the batch norm: None, 'relu' or 'relu6'.
    """

    def __init__(self, conv, bn, act=None):
        if not isinstance(conv, _CONVS):
            raise TypeError(f"conv must be a Conv2D, DepthwiseConv2D or PointwiseConv2D, got {type(conv).__name__}")
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn must be a BatchNorm, got {type(bn).__name__}")
        if bn.channels != conv.out_channels:
            raise ValueError(f"batch norm '{bn.name}' has {bn.channels} channels, but convolution '{conv.name}' "
                             f"has {conv.out_channels} outputs")
        if act not in (None, "relu", "relu6"):
            raise ValueError(f"act must be None, 'relu' or 'relu6', got {act!r}")
        super().__init__(conv.name)
        self.kind = conv.kind
        self.act = act
        self.defer = False  # True: the next layer applies this one's bias and activation to its input
        self.deferred_from = None  # the FoldedConv before, whose output pass this one applies (depthwise only)
        self._key = "depthwise_kernel" if isinstance(conv, DepthwiseConv2D) else "kernel"
        w = conv.params[self._key]
        dtype = w.dtype
        f64 = np.float64
        k = bn.params["gamma"].astype(f64) / np.sqrt(bn.buffers["moving_variance"].astype(f64) + bn.eps)  # (K,)
        b = conv.params["bias"].astype(f64) if "bias" in conv.params else np.zeros(conv.out_channels)
        bias = bn.params["beta"].astype(f64) + k * (b - bn.buffers["moving_mean"].astype(f64))
        # Output channel o is w's last axis (HWIO, (C, K)); for a depthwise kernel (KH, KW, C, M) it is c*M + m.
        scaled = w.astype(f64) * k.reshape(w.shape[-2:] if self._key == "depthwise_kernel" else (-1,))
        self._add_param(self._key, scaled.astype(dtype))
        self._add_param("bias", bias.astype(dtype))
        # The convolution's geometry for shapes and counts; it shares this layer's (folded) arrays.
        self.conv = copy.copy(conv)
        self.conv.params, self.conv.grads, self.conv.buffers, self.conv._cache = self.params, self.grads, {}, None
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "depth_multiplier"):
            if hasattr(conv, attr):  # the geometry, for counting and summaries
                setattr(self, attr, getattr(conv, attr))

    @property
    def in_bias(self):
        """The bias applied to this layer's input (the previous layer's, deferred), or None."""
        return None if self.deferred_from is None else self.deferred_from.params["bias"]

    @property
    def in_act(self):
        """The activation applied to this layer's input after ``in_bias``, or None."""
        return None if self.deferred_from is None else self.deferred_from.act

    @property
    def type_label(self):
        act = {None: "", "relu": "+ReLU", "relu6": "+ReLU6"}[self.act]
        return f"{self.conv.type_label}+BN{act} (folded)"

    def forward(self, x, training=False):
        if training:
            raise RuntimeError(f"layer '{self.name}': batch norm is folded into this convolution for inference; "
                               f"train the original model and fold it again")
        self._check_input(x, 4, self.in_channels)
        c, w, b = self.conv, self.params[self._key], self.params["bias"]
        if self.kind == "depthwise":
            return dw_k.depthwise_forward(x, w, stride=c.stride, padding=c.padding, bias=b, act=self.act,
                                          in_bias=self.in_bias, in_act=self.in_act)
        if self.kind == "pointwise":
            y = pw_k.pointwise_forward(x, w)
        else:
            y = conv_k.conv2d_forward(x, w, stride=c.stride, padding=c.padding)
        if self.defer:
            return y
        return bn_k.bias_act_forward(y, b, act=self.act, out=y)  # in place: see bias_act_forward

    def backward(self, dy, need_dx=True):
        raise RuntimeError(f"layer '{self.name}': a folded layer has no backward pass; train the original model")

    def output_shape(self, input_shape):
        return self.conv.output_shape(input_shape)

    def macs(self, input_shape):
        return self.conv.macs(input_shape)

    def extra_ops(self, input_shape):
        out = int(np.prod(self.output_shape(input_shape)))
        return {"bias": out, **({"activation": out} if self.act else {})}


def fold_batchnorm(model):
    """An inference copy of ``model`` with every batch norm that directly follows a convolution folded into it.

    Patterns folded: a Conv2D, DepthwiseConv2D or PointwiseConv2D followed by a BatchNormAct (batch norm and its
    activation), or by a BatchNorm and optionally a ReLU or ReLU6 layer. Every other layer is copied as it is. The
    copy does not share arrays with ``model``, runs in inference mode only (a training forward raises), and
    returns the same logits up to float32 rounding. Where a folded conv feeds a folded depthwise conv that can
    apply its input's bias and activation for free (``kernels.depthwise.input_pass_is_free``, which needs the
    model's ``input_shape``), the first hands them to the second: its own output is then the pre-bias one.

    Args:
        model: a Sequential.

    Returns:
        A new Sequential named ``<name>_folded``, in eval mode.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"fold_batchnorm takes a Sequential, got {type(model).__name__}")
    layers, out, i = model.layers, [], 0
    while i < len(layers):
        layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, _CONVS) and isinstance(nxt, BatchNormAct):
            out.append(FoldedConv(layer, nxt.bn, nxt.act_kind))
            i += 2
        elif isinstance(layer, _CONVS) and isinstance(nxt, BatchNorm):
            after = layers[i + 2] if i + 2 < len(layers) else None
            act = next((kind for cls, kind in _ACTS if isinstance(after, cls)), None)
            out.append(FoldedConv(layer, nxt, act))
            i += 3 if act else 2
        else:
            twin = copy.deepcopy(layer)
            twin._cache = None
            out.append(twin)
            i += 1
    folded = Sequential(out, input_shape=model.input_shape, name=f"{model.name}_folded").eval()
    if model.input_shape is not None:
        shapes = folded.layer_shapes()
        for (a, _, _), (b, b_in, _) in zip(shapes, shapes[1:]):
            if isinstance(a, FoldedConv) and isinstance(b, FoldedConv) and b.kind == "depthwise" and \
                    a.kind != "depthwise" and dw_k.input_pass_is_free(
                        b.conv.kernel_size, b.conv.stride, b.conv.padding, b_in, b.conv.depth_multiplier):
                a.defer, b.deferred_from = True, a
    return folded
