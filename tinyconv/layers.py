"""Layers wrapping every kernel: convolutions, batch norm, activations, pooling, dropout, flatten and linear.

Each layer validates its input (naming itself in the message), calls the kernels, keeps exactly what its backward
needs in one cache slot, and reports its output shape, parameters and mult-adds analytically from shapes.
Parameter names follow Keras (``kernel``, ``depthwise_kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
``moving_variance``) so a model's names can be matched against Keras's MobileNet.
"""
import math

import numpy as np

from kernels import activation as act_k
from kernels import batchnorm as bn_k
from kernels import conv as conv_k
from kernels import depthwise as dw_k
from kernels import dropout as drop_k
from kernels import linear as lin_k
from kernels import pointwise as pw_k
from kernels import pool as pool_k
from kernels.geometry import conv_geometry, normalize_window
from tinyconv.layer import Layer


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


def _he_uniform(rng, shape, fan_in, dtype):
    """He (Kaiming) uniform init: Var(w) = 2 / fan_in, the right scale in front of a ReLU."""
    limit = math.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _glorot_uniform(rng, shape, fan_in, fan_out, dtype):
    """Glorot (Xavier) uniform init, Keras's default for Dense: Var(w) = 2 / (fan_in + fan_out)."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _check_spatial(layer, input_shape, channels):
    if len(input_shape) != 3 or (channels is not None and input_shape[2] != channels):
        want = f"(H, W, {channels})" if channels is not None else "(H, W, C)"
        raise ValueError(f"layer '{layer.name}': per-sample input shape must be {want}, got {tuple(input_shape)}")


class _Conv(Layer):
    """What the three convolutions share: window geometry, output shape, mult-adds and the optional bias.

    Subclasses set ``in_channels``, ``out_channels`` and call ``_set_window``; ``_macs_per_output`` is the number
    of multiply-accumulates behind one output value (KH*KW*C for a standard conv, KH*KW for a depthwise one, C for
    a pointwise one).
    """

    def _set_window(self, kernel_size, stride, padding):
        (kh, kw), self.stride, self.padding = normalize_window(kernel_size, stride, padding)
        self.kernel_size = (kh, kw)

    def _add_bias(self, use_bias, dtype):
        if use_bias:
            self._add_param("bias", np.zeros(self.out_channels, dtype))

    @property
    def _macs_per_output(self):
        raise NotImplementedError

    def output_shape(self, input_shape):
        _check_spatial(self, input_shape, self.in_channels)
        g = conv_geometry(input_shape[0], input_shape[1], self.kernel_size, self.stride, self.padding)
        return (g.oh, g.ow, self.out_channels)

    def macs(self, input_shape):
        return math.prod(self.output_shape(input_shape)) * self._macs_per_output

    def extra_ops(self, input_shape):
        return {"bias": math.prod(self.output_shape(input_shape))} if "bias" in self.params else {}


class Conv2D(_Conv):
    """Standard convolution, weights HWIO ``kernel`` (KH, KW, C, K), optional ``bias`` (K,).

    Args:
        in_channels, out_channels: C and K.
        kernel_size: int or (KH, KW).
        stride: int or (sh, sw).
        padding: 'same' (TensorFlow rule), 'valid', int or (ph, pw).
        use_bias: add a learned bias (MobileNet's convs have none: batch norm follows).
        rng: numpy Generator for the He-uniform init.
    """

    kind = "conv"

    def __init__(self, in_channels, out_channels, kernel_size=3, *, stride=1, padding="same", use_bias=False,
                 name=None, rng=None, dtype=np.float32):
        super().__init__(name)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self._set_window(kernel_size, stride, padding)
        kh, kw = self.kernel_size
        self._add_param("kernel", _he_uniform(_rng(rng), (kh, kw, in_channels, out_channels),
                                              kh * kw * in_channels, dtype))
        self._add_bias(use_bias, dtype)

    @property
    def type_label(self):
        kh, kw = self.kernel_size
        return f"Conv {kh}x{kw}"

    def forward(self, x, training=False):
        self._check_input(x, 4, self.in_channels)
        w = self.params["kernel"]
        cols = None
        if training and self._keeps_cols:
            cols = conv_k.im2col(x, w.shape, stride=self.stride, padding=self.padding)
        y = conv_k.conv2d_forward(x, w, self.params.get("bias"), stride=self.stride, padding=self.padding,
                                  cols=cols)
        self._cache = (x, cols) if training else None
        return y

    @property
    def _keeps_cols(self):
        """Whether training keeps the forward's im2col rows for the weight gradient: when a row (KH*KW*C values)
        is at most twice an output pixel (K values), so the saved rows cost at most twice the output's memory. The
        input layer's 27-value rows qualify; the 288-value rows of a 3x3 conv from 32 channels would not."""
        kh, kw = self.kernel_size
        return kh * kw * self.in_channels <= 2 * self.out_channels

    def backward(self, dy, need_dx=True):
        x, cols = self._take_cache()
        self._param_grads(dy, x, cols)
        return self._input_grad(dy, x) if need_dx else None

    def backward_split(self, dy):
        x, cols = self._take_cache()
        return self._input_grad(dy, x), lambda: self._param_grads(dy, x, cols)

    def _input_grad(self, dy, x):
        return conv_k.conv2d_backward_input(dy, self.params["kernel"], x.shape, stride=self.stride,
                                            padding=self.padding)

    def _param_grads(self, dy, x, cols):
        self.grads["kernel"] += conv_k.conv2d_backward_weight(dy, x, self.params["kernel"].shape, stride=self.stride,
                                                              padding=self.padding, cols=cols)
        if "bias" in self.params:
            self.grads["bias"] += conv_k.conv2d_backward_bias(dy)

    @property
    def _macs_per_output(self):
        return self.kernel_size[0] * self.kernel_size[1] * self.in_channels


class DepthwiseConv2D(_Conv):
    """Depthwise convolution: one KH x KW filter per input channel (times ``depth_multiplier``).

    ``depthwise_kernel`` has shape (KH, KW, C, M); output channel ``c * M + m`` as Keras's DepthwiseConv2D.
    """

    kind = "depthwise"

    def __init__(self, channels, kernel_size=3, *, stride=1, padding="same", depth_multiplier=1, use_bias=False,
                 name=None, rng=None, dtype=np.float32):
        super().__init__(name)
        self.in_channels = _positive_int("channels", channels)
        self.depth_multiplier = _positive_int("depth_multiplier", depth_multiplier)
        self.out_channels = self.in_channels * self.depth_multiplier
        self._set_window(kernel_size, stride, padding)
        kh, kw = self.kernel_size
        self._add_param("depthwise_kernel", _he_uniform(_rng(rng), (kh, kw, channels, self.depth_multiplier),
                                                        kh * kw, dtype))
        self._add_bias(use_bias, dtype)

    @property
    def type_label(self):
        kh, kw = self.kernel_size
        return f"Conv DW {kh}x{kw}"

    def forward(self, x, training=False, in_pass=None):
        """y = depthwise(x); with ``in_pass`` (keyword arguments ``in_center``, ``in_scale``, ``in_bias``,
        ``in_act`` of :func:`kernels.depthwise.depthwise_forward`, from :meth:`BatchNormAct.forward_deferred`) x is
        the previous batch norm's input, normalized as the kernel copies its rows."""
        self._check_input(x, 4, self.in_channels)
        in_pass = in_pass or {}
        y = dw_k.depthwise_forward(x, self.params["depthwise_kernel"], stride=self.stride, padding=self.padding,
                                   **in_pass)
        if "bias" in self.params:
            y += self.params["bias"]
        self._cache = (x, in_pass) if training else None
        return y

    def accepts_input_pass(self, in_shape):
        """Whether :meth:`forward` applies an input pass while copying rows, at no pass over memory of its own
        (in_shape (N, H, W, C)): what lets a training batch norm before it skip writing its output."""
        return self.depth_multiplier == 1 and dw_k.input_pass_is_free(self.kernel_size, self.stride, self.padding,
                                                                      in_shape[1:])

    def backward(self, dy, need_dx=True):
        x, in_pass = self._take_cache()
        dx, dw = dw_k.depthwise_backward(dy, x, self.params["depthwise_kernel"], stride=self.stride,
                                         padding=self.padding, need_dx=need_dx, **in_pass)
        self._add_grads(dy, dw)
        return dx

    def backward_split(self, dy):
        """The input gradient here, the weight gradient in the job: two passes over dy where :meth:`backward` may
        fuse them into one, which pays where the two run on different cores."""
        x, in_pass = self._take_cache()
        w = self.params["depthwise_kernel"]
        dx = dw_k.depthwise_backward_input(dy, w, x.shape, stride=self.stride, padding=self.padding)

        def job():
            _, dw = dw_k.depthwise_backward(dy, x, w, stride=self.stride, padding=self.padding, need_dx=False,
                                            **in_pass)
            self._add_grads(dy, dw)
        return dx, job

    def _add_grads(self, dy, dw):
        self.grads["depthwise_kernel"] += dw
        if "bias" in self.params:
            self.grads["bias"] += dy.sum(axis=(0, 1, 2))

    @property
    def _macs_per_output(self):
        return self.kernel_size[0] * self.kernel_size[1]


class _ProductBackward:
    """The backward pass of a layer whose forward caches x and computes y = x @ kernel (+ bias) over rows: a 1x1
    conv or a dense layer. Subclasses name their three gradient kernels (``_backward_input(dy, w)``,
    ``_backward_weight(dy, x)``, ``_backward_bias(dy)``)."""

    def backward(self, dy, need_dx=True):
        x = self._take_cache()
        self._param_grads(dy, x)
        return self._backward_input(dy, self.params["kernel"]) if need_dx else None

    def backward_split(self, dy):
        x = self._take_cache()
        return self._backward_input(dy, self.params["kernel"]), lambda: self._param_grads(dy, x)

    def _param_grads(self, dy, x):
        self.grads["kernel"] += self._backward_weight(dy, x)
        if "bias" in self.params:
            self.grads["bias"] += self._backward_bias(dy)


class PointwiseConv2D(_ProductBackward, _Conv):
    """1x1 convolution as one GEMM: ``kernel`` (C, K), optional ``bias`` (K,)."""

    kind = "pointwise"
    type_label = "Conv 1x1"

    def __init__(self, in_channels, out_channels, *, use_bias=False, name=None, rng=None, dtype=np.float32):
        super().__init__(name)
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self._set_window(1, 1, "valid")
        self._add_param("kernel", _he_uniform(_rng(rng), (in_channels, out_channels), in_channels, dtype))
        self._add_bias(use_bias, dtype)

    def forward(self, x, training=False):
        self._check_input(x, 4, self.in_channels)
        y = pw_k.pointwise_forward(x, self.params["kernel"], self.params.get("bias"))
        self._cache = x if training else None
        return y

    _backward_input = staticmethod(pw_k.pointwise_backward_input)
    _backward_weight = staticmethod(pw_k.pointwise_backward_weight)
    _backward_bias = staticmethod(pw_k.pointwise_backward_bias)

    @property
    def _macs_per_output(self):
        return self.in_channels


class BatchNorm(Layer):
    """Batch normalization over every axis but the last (channels).

    Training mode normalizes with the batch statistics and updates the buffers ``moving_mean`` and
    ``moving_variance`` as ``moving = momentum * moving + (1 - momentum) * batch`` (Keras's convention, unbiased
    batch variance); inference mode uses the moving statistics. Keras's defaults: momentum 0.99, eps 1e-3.
    """

    kind = "batchnorm"
    type_label = "BatchNorm"

    def __init__(self, channels, *, momentum=0.99, eps=1e-3, name=None, dtype=np.float32):
        super().__init__(name)
        self.channels = _positive_int("channels", channels)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self._add_param("gamma", np.ones(channels, dtype))
        self._add_param("beta", np.zeros(channels, dtype))
        self.buffers["moving_mean"] = np.zeros(channels, dtype)
        self.buffers["moving_variance"] = np.ones(channels, dtype)

    def forward(self, x, training=False):
        self._check_maps_or_rows(x, self.channels)
        p, b = self.params, self.buffers
        if training:
            y, x_hat, inv_std = bn_k.batchnorm_forward_train(
                x, p["gamma"], p["beta"], b["moving_mean"], b["moving_variance"], momentum=self.momentum,
                eps=self.eps)
            self._cache = (x_hat, inv_std)
            return y
        self._cache = None
        return bn_k.batchnorm_forward_eval(x, p["gamma"], p["beta"], b["moving_mean"], b["moving_variance"],
                                           eps=self.eps)

    def backward(self, dy, need_dx=True):
        x_hat, inv_std = self._take_cache()
        dx, dgamma, dbeta = bn_k.batchnorm_backward(dy, x_hat, inv_std, self.params["gamma"])
        self.grads["gamma"] += dgamma
        self.grads["beta"] += dbeta
        return dx if need_dx else None

    def output_shape(self, input_shape):
        if input_shape[-1] != self.channels:
            raise ValueError(f"layer '{self.name}': per-sample input shape must end in {self.channels} channels, "
                             f"got {tuple(input_shape)}")
        return tuple(input_shape)

    def extra_ops(self, input_shape):
        return {"bn": math.prod(input_shape)}  # one multiply-add per element once folded into scale and shift


class _Activation(Layer):
    kind = "activation"
    _forward = None
    _backward = None

    def forward(self, x, training=False):
        self._check_maps_or_rows(x)
        y = type(self)._forward(x)
        self._cache = y if training else None
        return y

    def backward(self, dy, need_dx=True):
        y = self._take_cache()
        return type(self)._backward(dy, y) if need_dx else None

    def extra_ops(self, input_shape):
        return {"activation": math.prod(input_shape)}


class ReLU(_Activation):
    """max(x, 0), the paper's nonlinearity."""

    type_label = "ReLU"
    _forward = staticmethod(act_k.relu_forward)
    _backward = staticmethod(act_k.relu_backward)


class ReLU6(_Activation):
    """min(max(x, 0), 6), Keras MobileNet's nonlinearity."""

    type_label = "ReLU6"
    _forward = staticmethod(act_k.relu6_forward)
    _backward = staticmethod(act_k.relu6_backward)


def activation(kind, name=None):
    """Build the activation layer named by ``kind``: 'relu' or 'relu6'."""
    table = {"relu": ReLU, "relu6": ReLU6}
    if kind not in table:
        raise ValueError(f"activation must be one of {sorted(table)}, got {kind!r}")
    return table[kind](name)


class BatchNormAct(Layer):
    """Batch norm followed by its activation, run by fused kernels: one pass after the statistics in the forward,
    two in the backward, and only the input x (plus two (C,) vectors) kept in between.

    It owns the batch norm's parameters and buffers under the batch norm's name, so a fused model has the unfused
    one's parameter names (``conv1_bn/gamma``, ``conv1_bn/moving_mean``), counts and state files. ``parts()``
    returns the two layers it computes (a :class:`BatchNorm` sharing these arrays and the activation, named like
    Keras's ``conv1_bn`` and ``conv1_relu``); counting and summaries report those, so they read as unfused.

    Args:
        channels: C.
        act: 'relu' or 'relu6'.
        momentum, eps: batch norm's (Keras's defaults 0.99, 1e-3).
        name: the batch norm's name; act_name: the activation's (default ``name + '_act'``).
    """

    kind = "batchnorm"

    def __init__(self, channels, act="relu", *, momentum=0.99, eps=1e-3, name=None, act_name=None,
                 dtype=np.float32):
        super().__init__(name)
        self.bn = BatchNorm(channels, momentum=momentum, eps=eps, name=self.name, dtype=dtype)
        self.act = activation(act, name=act_name or f"{self.name}_act")
        self.act_kind = act
        self.channels, self.momentum, self.eps = self.bn.channels, self.bn.momentum, self.bn.eps
        self.params, self.grads, self.buffers = self.bn.params, self.bn.grads, self.bn.buffers  # shared dicts

    @property
    def type_label(self):
        return f"BatchNorm+{self.act.type_label}"

    def parts(self):
        return (self.bn, self.act)

    def forward(self, x, training=False):
        self._check_maps_or_rows(x, self.channels)
        p, b = self.params, self.buffers
        if training:
            y, mean, inv_std = bn_k.batchnorm_act_forward_train(
                x, p["gamma"], p["beta"], b["moving_mean"], b["moving_variance"], act=self.act_kind,
                momentum=self.momentum, eps=self.eps)
            self._cache = (x, mean, inv_std)
            return y
        self._cache = None
        return bn_k.batchnorm_act_forward_eval(x, p["gamma"], p["beta"], b["moving_mean"], b["moving_variance"],
                                               act=self.act_kind, eps=self.eps)

    def forward_deferred(self, x):
        """Training forward without the output: the batch statistics (and the running-statistics update) only.

        Returns the input pass that normalizes x, as keyword arguments for the next layer's forward
        (:meth:`DepthwiseConv2D.forward`), which applies it as it copies x's rows: the same values the output
        would have held, bit for bit, never written to memory. The backward is the usual one.
        """
        self._check_maps_or_rows(x, self.channels)
        p, b = self.params, self.buffers
        mean, inv_std = bn_k.batchnorm_stats_train(x, b["moving_mean"], b["moving_variance"], momentum=self.momentum,
                                                   eps=self.eps)
        self._cache = (x, mean, inv_std)
        # gamma * inv_std exactly as batchnorm_act_forward_train computes it; beta copied, so that the next layer's
        # backward applies the forward's pass even if the parameter changes in between, as a written output would
        return dict(in_center=mean, in_scale=p["gamma"] * inv_std, in_bias=p["beta"].copy(), in_act=self.act_kind)

    def backward(self, dy, need_dx=True):
        x, mean, inv_std = self._take_cache()
        p = self.params
        dx, dgamma, dbeta = bn_k.batchnorm_act_backward(dy, x, mean, inv_std, p["gamma"], p["beta"],
                                                        act=self.act_kind)
        self.grads["gamma"] += dgamma
        self.grads["beta"] += dbeta
        return dx if need_dx else None

    def output_shape(self, input_shape):
        return self.bn.output_shape(input_shape)

    def extra_ops(self, input_shape):
        return {**self.bn.extra_ops(input_shape), **self.act.extra_ops(input_shape)}


class _Pool(Layer):
    kind = "pool"

    def __init__(self, kernel_size, stride=None, padding="valid", name=None):
        super().__init__(name)
        (kh, kw), stride, padding = normalize_window(kernel_size, kernel_size if stride is None else stride,
                                                     padding)
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding

    def output_shape(self, input_shape):
        _check_spatial(self, input_shape, None)
        g = conv_geometry(input_shape[0], input_shape[1], self.kernel_size, self.stride, self.padding)
        return (g.oh, g.ow, input_shape[2])

    def extra_ops(self, input_shape):
        kh, kw = self.kernel_size
        return {"pool": math.prod(self.output_shape(input_shape)) * kh * kw}


class MaxPool2D(_Pool):
    """Max pooling over KH x KW windows; the gradient goes to the (first) maximum of each window."""

    type_label = "MaxPool"

    def forward(self, x, training=False):
        self._check_input(x, 4)
        y, argmax = pool_k.maxpool_forward(x, kernel_size=self.kernel_size, stride=self.stride,
                                           padding=self.padding)
        self._cache = (argmax, x.shape) if training else None
        return y

    def backward(self, dy, need_dx=True):
        argmax, x_shape = self._take_cache()
        return pool_k.maxpool_backward(dy, argmax, x_shape) if need_dx else None


class AvgPool2D(_Pool):
    """Average pooling over KH x KW windows, padding excluded from the average (TensorFlow's convention)."""

    type_label = "AvgPool"

    def forward(self, x, training=False):
        self._check_input(x, 4)
        y = pool_k.avgpool_forward(x, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)
        self._cache = x.shape if training else None
        return y

    def backward(self, dy, need_dx=True):
        x_shape = self._take_cache()
        if not need_dx:
            return None
        return pool_k.avgpool_backward(dy, x_shape, kernel_size=self.kernel_size, stride=self.stride,
                                       padding=self.padding)


class GlobalAvgPool2D(Layer):
    """Mean over height and width: (N, H, W, C) -> (N, C)."""

    kind = "pool"
    type_label = "AvgPool"

    def forward(self, x, training=False):
        self._check_input(x, 4)
        self._cache = x.shape if training else None
        return pool_k.global_avgpool_forward(x)

    def backward(self, dy, need_dx=True):
        x_shape = self._take_cache()
        return pool_k.global_avgpool_backward(dy, x_shape) if need_dx else None

    def output_shape(self, input_shape):
        _check_spatial(self, input_shape, None)
        return (input_shape[2],)

    def extra_ops(self, input_shape):
        return {"pool": math.prod(input_shape)}


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability ``rate`` and scale the rest by
    1 / (1 - rate); identity in inference. ``seed`` makes the masks reproducible."""

    kind = "dropout"
    type_label = "Dropout"

    def __init__(self, rate, *, seed=None, name=None):
        super().__init__(name)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.rng = np.random.default_rng(seed)

    def forward(self, x, training=False):
        if not training or self.rate == 0.0:
            self._cache = False if training else None  # backward of an identity is the identity
            return x
        y, mask = drop_k.dropout_forward(x, rate=self.rate, rng=self.rng)
        self._cache = mask
        return y

    def backward(self, dy, need_dx=True):
        mask = self._take_cache()
        if not need_dx:
            return None
        return dy if mask is False else drop_k.dropout_backward(dy, mask)


class Flatten(Layer):
    """Reshape (N, H, W, C) to (N, H * W * C)."""

    kind = "reshape"
    type_label = "Reshape"

    def forward(self, x, training=False):
        self._cache = x.shape if training else None
        return x.reshape(x.shape[0], -1)  # (N, H*W*C), a view when x is contiguous

    def backward(self, dy, need_dx=True):
        x_shape = self._take_cache()
        return dy.reshape(x_shape) if need_dx else None

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)


class Linear(_ProductBackward, Layer):
    """Fully connected layer: y = x @ kernel + bias, ``kernel`` (C, K) as Keras's Dense."""

    kind = "linear"
    type_label = "FC"

    def __init__(self, in_features, out_features, *, use_bias=True, name=None, rng=None, dtype=np.float32):
        super().__init__(name)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self._add_param("kernel", _glorot_uniform(_rng(rng), (in_features, out_features), in_features,
                                                  out_features, dtype))
        if use_bias:
            self._add_param("bias", np.zeros(out_features, dtype))

    def forward(self, x, training=False):
        self._check_input(x, 2, self.in_features)
        y = lin_k.linear_forward(x, self.params["kernel"], self.params.get("bias"))
        self._cache = x if training else None
        return y

    _backward_input = staticmethod(lin_k.linear_backward_input)
    _backward_weight = staticmethod(lin_k.linear_backward_weight)
    _backward_bias = staticmethod(lin_k.linear_backward_bias)

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"layer '{self.name}': per-sample input shape must be ({self.in_features},), "
                             f"got {tuple(input_shape)}")
        return (self.out_features,)

    def macs(self, input_shape):
        self.output_shape(input_shape)
        return self.in_features * self.out_features

    def extra_ops(self, input_shape):
        return {"bias": self.out_features} if "bias" in self.params else {}
