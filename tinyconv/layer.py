"""The Layer base class: parameters, gradients, buffers, a one-slot forward cache, and analytic cost.

A layer maps a batch ``x`` to ``y = forward(x, training)`` and, given ``dy``, accumulates its parameter gradients
into ``grads`` and returns ``dx = backward(dy)``. Shapes passed to ``output_shape``, ``macs`` and ``extra_ops`` are
per-sample (no batch axis): ``(H, W, C)`` for feature maps, ``(C,)`` for vectors.

Counting convention (stated once, see ``tinyconv.counting``): ``macs`` is the number of multiply-accumulates of
the layer's main op per sample, counted at the output resolution; ``extra_ops`` reports the operations that the
default convention treats as free (bias adds, batch-norm scale-and-shift, activations, pooling), by kind, so a
counter can include them on request.
"""
import numpy as np

from kernels._check import FLOAT_DTYPE_OBJECTS, FLOAT_DTYPES

EXTRA_KINDS = ("bias", "bn", "activation", "pool")


class Layer:
    """Base class of every tinyconv layer.

    Attributes:
        name: unique name within a model, Keras-style (``conv_dw_3``), used in parameter names and summaries.
        params: trainable arrays by short name (``kernel``, ``bias``, ``gamma``...).
        grads: gradient arrays, same keys and shapes as ``params``; backward accumulates into them (``+=``).
        buffers: non-trainable state saved with the model (batch norm's ``moving_mean``...).
    """

    kind = "layer"  # machine-readable family: conv, depthwise, pointwise, batchnorm, activation, pool...
    type_label = "Layer"  # human label for summaries and the by-type breakdown (the paper's Table 2 names)

    def __init__(self, name=None):
        self.name = name or type(self).__name__.lower()
        self.params = {}
        self.grads = {}
        self.buffers = {}
        self._cache = None

    # --- computation -------------------------------------------------------------------------------------------

    def forward(self, x, training=False):
        """Compute the layer's output for a batch; in training mode keep what backward needs."""
        raise NotImplementedError

    def backward(self, dy, need_dx=True):
        """Accumulate parameter gradients for upstream gradient ``dy``; return dx (None if not ``need_dx``)."""
        raise NotImplementedError

    def backward_split(self, dy):
        """The backward pass in two parts: returns ``(dx, job)``, where ``job()`` (or None) accumulates the
        parameter gradients that computing dx does not need. The job reads only ``dy`` and the forward's cache and
        writes only ``grads``, so it may run on another thread while the caller goes on with dx
        (:meth:`tinyconv.sequential.Sequential.backward`). By default everything is done here and there is no job.
        """
        return self.backward(dy, True), None

    def __call__(self, x, training=False):
        return self.forward(x, training)

    def _take_cache(self):
        """Return and release the forward cache; backward without a training-mode forward is an error."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"layer '{self.name}': backward called without a preceding forward(x, training=True)")
        self._cache = None
        return cache

    # --- analytic shape and cost -------------------------------------------------------------------------------

    def output_shape(self, input_shape):
        """Per-sample output shape for a per-sample input shape."""
        return tuple(input_shape)

    def macs(self, input_shape):
        """Multiply-accumulates of the main op per sample (0 for layers without one)."""
        return 0

    def extra_ops(self, input_shape):
        """Operations the default convention counts as free, per sample, by kind (keys from EXTRA_KINDS)."""
        return {}

    def parts(self):
        """The layers this one computes, for counting and summaries: itself, or a fused layer's components."""
        return (self,)

    def param_count(self, trainable_only=True):
        """Number of parameters (with ``trainable_only=False``, buffers included)."""
        n = sum(int(p.size) for p in self.params.values())
        if not trainable_only:
            n += sum(int(b.size) for b in self.buffers.values())
        return n

    # --- parameter housekeeping --------------------------------------------------------------------------------

    def _add_param(self, key, value):
        self.params[key] = value
        self.grads[key] = np.zeros_like(value)

    def zero_grad(self):
        """Set every gradient to zero in place."""
        for g in self.grads.values():
            g.fill(0)

    def astype(self, dtype):
        """Cast parameters, gradients and buffers to ``dtype`` (float32 or float64) in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        for store in (self.params, self.grads, self.buffers):
            for k, v in store.items():
                store[k] = v.astype(dtype)
        self._cache = None
        return self

    @property
    def dtype(self):
        """The dtype of the layer's parameters (None for layers without parameters)."""
        for v in self.params.values():
            return v.dtype
        return None

    def _check_input(self, x, ndim, channels=None):
        """Raise a clear error naming this layer when ``x`` has the wrong rank, channels or dtype."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"layer '{self.name}': input must be a numpy array, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPE_OBJECTS and x.dtype not in FLOAT_DTYPES:  # identity first (see kernels._check)
            raise TypeError(f"layer '{self.name}': input must be float32 or float64, got {x.dtype}")
        legend = "(N, H, W, C)" if ndim == 4 else "(N, C)"
        if x.ndim != ndim:
            raise ValueError(f"layer '{self.name}': input must be {ndim}-D {legend}, got shape {x.shape}")
        if channels is not None and x.shape[-1] != channels:
            raise ValueError(
                f"layer '{self.name}': input must have {channels} channels (last axis), got shape {x.shape}")
        dtype = self.dtype
        if dtype is not None and x.dtype != dtype:
            raise TypeError(
                f"layer '{self.name}': input dtype {x.dtype} differs from the parameters' {dtype}; "
                f"cast the input or call model.astype({x.dtype.name!r})")

    def _check_maps_or_rows(self, x, channels=None):
        """:meth:`_check_input` for layers that take either (N, H, W, C) maps or (N, C) rows (batch norm, the
        activations)."""
        ndim = x.ndim if isinstance(x, np.ndarray) else 4  # not an array: _check_input says so
        if ndim not in (2, 4):
            raise ValueError(f"layer '{self.name}': input must be (N, H, W, C) or (N, C), got shape {x.shape}")
        self._check_input(x, ndim, channels)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"
