"""Sequential: layers run forward in order and backward in reverse, with named parameters and .npz state."""
from typing import NamedTuple

import numpy as np

from kernels._check import check_finite
from tinyconv.io import atomic_write, copy_state
from tinyconv.layer import Layer
from tinyconv.summary import summary as _summary
from tinyconv.threads import CoreSplit, can_split

# The largest activation (elements, the batch included) of a training forward after which the backward pass splits
# the cores (see Sequential). Measured on the 2-core machine, training steps in-process alternating split and
# data-parallel backward passes, largest activation in brackets: Fashion-MNIST workload batch 32 1.03x (2^18),
# batch 128 1.09-1.15x (2^20), batch 256 1.16x (2^21), batch 512 1.09x (2^22); MobileNet 0.5 res 128 batch 8
# 1.11x (2^20), batch 16 1.07x (2^21), batch 32 0.95-1.00x (2^22); MobileNet 1.0 res 128 batch 32 0.96x (2^23).
# Splitting only the small layers of a large network gained nothing: before its first large layer could run on
# both cores, the backward had to wait for the weight gradients queued so far.
SPLIT_MAX_ELEMENTS = 1 << 21


class StateError(ValueError):
    """A saved state does not fit the model: missing, unexpected or mis-shaped entries."""


class Sequential:
    """A chain of layers.

    Args:
        layers: the layers, in order; names must be unique (they prefix parameter names: ``conv1/kernel``).
        input_shape: per-sample input shape, e.g. (224, 224, 3); checked on every forward and used by
            ``summary``-style shape inference.
        name: model name.

    Hooks: ``add_hook(fn)`` registers ``fn(phase, layer, event)`` called with phase 'forward' or 'backward' and
    event 'start' or 'end' around each layer; the benchmark's per-layer profile uses it, layers know nothing of it.

    In training, a layer with ``forward_deferred`` (:class:`BatchNormAct`) followed by one whose
    ``accepts_input_pass`` holds for the activation (a 3x3 depthwise conv that copies its input rows anyway) hands
    its normalization to that layer instead of writing its output (``defer_batchnorm``, default True): the same
    values bit for bit, one pass over memory and one stored activation fewer per such pair.

    On two threads, after a training forward whose activations all have at most :data:`SPLIT_MAX_ELEMENTS` values,
    the backward pass splits the cores instead of every kernel (``split_backward``, default True): this thread
    computes the input gradients on one core and a worker thread the parameter gradients on the other
    (:meth:`Layer.backward_split`, :class:`tinyconv.threads.CoreSplit`). Nothing on the chain of input gradients
    waits for a weight gradient, so those come off the critical path; on small maps one kernel gains little from
    the second core. ``backward`` returns once every gradient is in place, with the same values (only the order of
    some float additions can differ, as between thread counts). Hooks see each layer's whole backward, so with
    hooks registered the pass is not split.

    The model lays its parameters end to end in one flat array, and its gradients in another
    (:func:`_pack_parameters`; the layers hold views), so that ``zero_grad`` is one fill and
    :class:`tinyconv.optim.SGD` one kernel call over the whole model.
    """

    def __init__(self, layers, *, input_shape=None, name="model"):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        seen = set()
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer instances, got {type(layer).__name__}")
            if layer.name in seen:
                raise ValueError(f"layer names must be unique; '{layer.name}' appears twice")
            seen.add(layer.name)
        self.layers = layers
        self.name = name
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.training = False
        self.defer_batchnorm = True
        self.split_backward = True
        self._largest = 0  # elements of the largest activation of the last training forward
        self._hooks = []
        self._packed = _pack_parameters(layers)
        if self.input_shape is not None:
            self.output_shape(self.input_shape)  # fail at construction on impossible geometry

    # --- running -----------------------------------------------------------------------------------------------

    def train(self):
        """Switch to training mode (batch statistics, dropout on); returns self."""
        self.training = True
        return self

    def eval(self):
        """Switch to inference mode (moving statistics, dropout off); returns self."""
        self.training = False
        return self

    def forward(self, x, training=None):
        """Run every layer in order.

        Args:
            x: (N, *input_shape) float array, finite.
            training: overrides the model's mode for this call when given.

        Returns:
            The last layer's output.
        """
        training = self.training if training is None else training
        self._check_input(x)
        hooks = self._hooks
        layers = self.layers
        defer = training and self.defer_batchnorm
        in_pass = None  # a batch norm's deferred output pass, for the layer after it
        largest = x.size
        for i, layer in enumerate(layers):
            if hooks:
                self._run_hooks("forward", layer, "start")
            if in_pass is not None:
                x = layer.forward(x, training, in_pass=in_pass)
                in_pass = None
            elif defer and i + 1 < len(layers) and _defers(layer, layers[i + 1], x):
                in_pass = layer.forward_deferred(x)  # x stays the batch norm's input
            else:
                x = layer.forward(x, training)
            largest = max(largest, x.size)
            if hooks:
                self._run_hooks("forward", layer, "end")
        if training:
            self._largest = largest
        return x

    __call__ = forward

    def backward(self, dy, need_dx=False):
        """Backpropagate ``dy`` through the layers in reverse, accumulating parameter gradients.

        Returns:
            The gradient with respect to the network input if ``need_dx``, else None (the first layer then skips
            computing it).
        """
        hooks = self._hooks
        if self.split_backward and not hooks and self._largest <= SPLIT_MAX_ELEMENTS and can_split():
            return self._backward_split(dy, need_dx)
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            layer = self.layers[i]
            want = need_dx or i > 0
            if hooks:
                self._run_hooks("backward", layer, "start")
                dy = layer.backward(dy, want)
                self._run_hooks("backward", layer, "end")
            else:
                dy = layer.backward(dy, want)
        return dy

    def _backward_split(self, dy, need_dx):
        """:meth:`backward` with the parameter gradients on the worker thread (see the class)."""
        with CoreSplit() as cores:
            cores.split()
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                if i == 0 and not need_dx:
                    layer.backward(dy, False)  # the first layer: its parameter gradients are all that is left
                    dy = None
                else:
                    dy, job = layer.backward_split(dy)
                    if job is not None:
                        cores.submit(job)
        return dy

    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"model input must be a numpy array, got {type(x).__name__}")
        if self.input_shape is not None and x.shape[1:] != self.input_shape:
            raise ValueError(f"model '{self.name}' expects input (N, {', '.join(map(str, self.input_shape))}), "
                             f"got shape {x.shape}")
        if x.dtype.kind == "f":
            check_finite("model input", x)

    def add_hook(self, fn):
        """Register ``fn(phase, layer, event)``; returns a callable that removes it."""
        self._hooks.append(fn)
        return lambda: self._hooks.remove(fn)

    def _run_hooks(self, phase, layer, event):
        for fn in self._hooks:
            fn(phase, layer, event)

    # --- parameters and state ----------------------------------------------------------------------------------

    def named_parameters(self):
        """List of (``layer/param``, array, gradient) for every trainable parameter, in layer order."""
        return [(f"{layer.name}/{k}", p, layer.grads[k]) for layer in self.layers for k, p in layer.params.items()]

    def named_buffers(self):
        """List of (``layer/buffer``, array) for every non-trainable state array."""
        return [(f"{layer.name}/{k}", b) for layer in self.layers for k, b in layer.buffers.items()]

    def zero_grad(self):
        """Zero every parameter gradient in place: one fill of the flat gradient array while every layer still
        holds its views (see :func:`_pack_parameters`), else layer by layer."""
        packed = self._packed
        # every layer must still hold its view, and the view still see the flat array (a deep copy or a pickle of
        # the model copies each view on its own)
        if packed is not None and all(grads.get(k) is g and g.base is packed.grads for grads, k, g in packed.views):
            packed.grads.fill(0)
            return
        for layer in self.layers:
            layer.zero_grad()

    def astype(self, dtype):
        """Cast every parameter, gradient and buffer (float32 or float64); returns self. The parameters and
        gradients are laid end to end again, in new flat arrays of the new dtype."""
        for layer in self.layers:
            layer.astype(dtype)
        self._packed = _pack_parameters(self.layers)
        return self

    def param_count(self, trainable_only=True):
        """Number of trainable parameters, or with ``trainable_only=False`` all saved numbers."""
        return sum(layer.param_count(trainable_only) for layer in self.layers)

    def state_dict(self):
        """Every parameter and buffer by full name (copies)."""
        state = {name: p.copy() for name, p, _ in self.named_parameters()}
        state.update({name: b.copy() for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state):
        """Copy ``state`` into the model; names and shapes must match exactly.

        Raises:
            StateError: listing the missing and unexpected names, or the mis-shaped entries.
        """
        targets = {name: p for name, p, _ in self.named_parameters()}
        targets.update(dict(self.named_buffers()))
        copy_state(targets, state, what=f"model '{self.name}'", error=StateError)

    def save(self, path):
        """Write the state to an ``.npz`` file atomically."""
        state = self.state_dict()
        atomic_write(path, lambda f: np.savez(f, **state))

    def load(self, path):
        """Load the state from an ``.npz`` file written by ``save``."""
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"no saved state at {path}") from None
        except (OSError, ValueError) as e:
            raise StateError(f"{path} is not a readable .npz state file ({e})") from None
        self.load_state_dict(state)

    # --- analytic shapes and cost ------------------------------------------------------------------------------

    def layer_shapes(self, input_shape=None):
        """List of (layer, per-sample input shape, per-sample output shape), computed from shapes alone."""
        shape = tuple(input_shape if input_shape is not None else self._need_input_shape())
        rows = []
        for layer in self.layers:
            out = tuple(layer.output_shape(shape))
            rows.append((layer, shape, out))
            shape = out
        return rows

    def output_shape(self, input_shape=None):
        """Per-sample output shape."""
        return self.layer_shapes(input_shape)[-1][2]

    def macs(self, input_shape=None):
        """Multiply-accumulates per sample of the main ops (the paper's mult-adds)."""
        return sum(layer.macs(shape) for layer, shape, _ in self.layer_shapes(input_shape))

    def summary(self, input_shape=None, *, flops=False):
        """Print a Keras-style summary with mult-adds per layer (see ``tinyconv.summary.summary``)."""
        print(_summary(self, input_shape, flops=flops))

    def _need_input_shape(self):
        if self.input_shape is None:
            raise ValueError(f"model '{self.name}' was built without input_shape; pass one")
        return self.input_shape

    def __repr__(self):
        return f"Sequential(name={self.name!r}, layers={len(self.layers)}, params={self.param_count():,})"


class _Packed(NamedTuple):
    params: np.ndarray  # (P,) every parameter end to end, in named_parameters order
    grads: np.ndarray  # (P,) their gradients, in the same places
    views: list  # (grads dict, key, view of grads) per parameter: what zero_grad checks is still in place


def _pack_parameters(layers):
    """Copy every parameter into one flat array, and every gradient into another, in ``named_parameters`` order,
    and leave views of them in the layers' dicts; returns the arrays, or None where there is nothing to pack
    (no parameters, several dtypes, an array shared between two names, or an array that is a view of another:
    layers already packed by another model stay with that model's arrays, so an optimizer built on it keeps
    updating the arrays its layers use).

    Layers keep working on their own arrays as before (views are ordinary arrays), but a whole-model pass can
    now be one call: ``zero_grad`` fills one array, and ``tinyconv.optim.SGD`` updates every parameter in one
    kernel call when it finds them end to end. Measured on the 2-core machine in a Fashion-MNIST training step
    (83 arrays, 823,434 values): zero_grad 0.18 against 0.27 ms, the SGD step 1.35 against 1.84 ms (before its
    loop was vectorized; see :mod:`kernels.optim`).
    """
    entries = [(layer, k) for layer in layers for k in layer.params]
    arrays = [layer.params[k] for layer, k in entries]
    grads = [layer.grads[k] for layer, k in entries]
    if not arrays or len({a.dtype for a in arrays}) != 1 or len({id(a) for a in arrays}) != len(arrays) or \
            any(a.base is not None for a in arrays + grads):
        return None
    total = sum(a.size for a in arrays)
    flat_p = np.empty(total, arrays[0].dtype)
    flat_g = np.empty(total, arrays[0].dtype)
    views = []
    offset = 0
    for (layer, k), a, grad in zip(entries, arrays, grads):
        p = flat_p[offset:offset + a.size].reshape(a.shape)
        g = flat_g[offset:offset + a.size].reshape(a.shape)
        p[...] = a
        g[...] = grad
        layer.params[k], layer.grads[k] = p, g
        views.append((layer.grads, k, g))
        offset += a.size
    return _Packed(flat_p, flat_g, views)


def _defers(layer, after, x):
    """Whether ``layer`` hands its output pass on x to ``after`` (see :class:`Sequential`)."""
    return (hasattr(layer, "forward_deferred") and hasattr(after, "accepts_input_pass") and x.ndim == 4
            and after.accepts_input_pass(x.shape))
