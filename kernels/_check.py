"""Input checks shared by the kernel wrappers.

Wrappers call these before any jitted loop runs, so bad input fails with a sentence naming the argument, what was
expected and what was given, never deep inside a kernel. Finiteness is not checked here: a full pass over every
activation would cost as much as a ReLU; the graph checks the network input and the loss checks the logits.
"""
import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)

# The same two dtypes as dtype objects: NumPy hands out one object per native dtype, so ``x.dtype in
# FLOAT_DTYPE_OBJECTS`` is settled by identity, where comparing a dtype with the scalar types above converts them on
# every test. The checks run some 500 times per training step; with these fast paths (and geometry's) the wrappers of
# the batch-norm, depthwise and pointwise kernels lost 10-30% of their own time (batch-norm forward 11.7 -> 9.7 us on
# a tiny map).
FLOAT_DTYPE_OBJECTS = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(name, x, ndim=None, legend=None):
    """Require a float32/float64 ndarray of the given rank.

    Args:
        name: argument name used in the message.
        x: the value to check.
        ndim: required rank, or None for any.
        legend: shape legend for the message, e.g. "(N, H, W, C)".

    Returns:
        x unchanged.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPE_OBJECTS and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}; convert with .astype(np.float32)")
    if ndim is not None and x.ndim != ndim:
        shape = f" {legend}" if legend else ""
        raise ValueError(f"{name} must be {ndim}-D{shape}, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x


def check_same_dtype(**arrays):
    """Require every given array (None values skipped) to share one dtype."""
    dtype = None
    for v in arrays.values():  # the common case without building lists: every dtype the same object
        if v is not None:
            if dtype is None:
                dtype = v.dtype
            elif v.dtype is not dtype:
                break
    else:
        return
    items = [(k, v) for k, v in arrays.items() if v is not None]
    dtypes = {v.dtype for _, v in items}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}={v.dtype}" for k, v in items)
        raise TypeError(f"arrays must share one dtype, got {listing}; cast them to the same float type")


def check_shape(name, x, expected):
    """Require ``x.shape == expected``; None entries in ``expected`` match anything."""
    if x.shape == expected:
        return x
    if len(x.shape) != len(expected) or any(e is not None and e != s for s, e in zip(x.shape, expected)):
        dims = ", ".join("*" if e is None else str(e) for e in expected)
        want = f"({dims},)" if len(expected) == 1 else f"({dims})"
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    return x


def check_finite(name, x):
    """Require every element of ``x`` to be finite."""
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s); check the data and the learning rate")
    return x
