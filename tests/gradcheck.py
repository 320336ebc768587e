"""Central-difference gradient checking, shared by every kernel and layer test.

The checked function maps inputs to one output array ``y``; we contract ``y`` with a fixed random upstream
gradient ``dy`` (never all ones, which would hide transposed or summed-wrong gradients), so the scalar is
``L = sum(y * dy)`` and the analytic gradient of each input is what a backward pass returns for that ``dy``.
"""
import numpy as np


def numeric_grad(f, x, dy, eps=1e-6):
    """d sum(f() * dy) / dx by central differences, perturbing ``x`` in place (float64 only).

    Args:
        f: callable taking no arguments and returning the output array; it must read ``x``.
        x: float64 array that ``f`` reads; restored on return.
        dy: upstream gradient, same shape as f()'s output.
        eps: step.

    Returns:
        Array shaped like ``x``.
    """
    assert x.dtype == np.float64, "finite differences need float64"
    g = np.zeros_like(x)
    flat = x.reshape(-1)  # a view when x is contiguous; non-contiguous x is checked through its base below
    if not np.shares_memory(flat, x):
        raise ValueError("numeric_grad needs a contiguous x (pass the base array and view it inside f)")
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = float(np.sum(f() * dy))
        flat[i] = old - eps
        fm = float(np.sum(f() * dy))
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def assert_close(actual, expected, rtol=1e-5, atol_floor=1e-7, name="value"):
    """Elementwise ``|a - e| <= rtol * max(|e|, scale) + atol_floor`` where scale is the max |e|.

    The floor relative to the largest magnitude keeps near-zero entries (sums that cancel) from failing a pure
    relative test, while any entry wrong by a real amount still fails.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tol = rtol * np.maximum(np.abs(expected), scale) + atol_floor
    err = np.abs(actual - expected)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.size} entries differ; worst at {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r} (tol {tol[i]:.3g})")


def check_grad(f, x, dy, analytic, rtol=1e-5, atol_floor=1e-8, eps=1e-6, name="grad"):
    """Assert that ``analytic`` equals the central-difference gradient of sum(f() * dy) with respect to x."""
    assert_close(analytic, numeric_grad(f, x, dy, eps), rtol=rtol, atol_floor=atol_floor, name=name)


def check_directional(f, x, dy, analytic, rng, n_dirs=3, eps=1e-6, rtol=1e-6, name="grad"):
    """Check ``analytic`` along random directions: a cheap full-gradient test for big inputs.

    For a direction v, (L(x + eps v) - L(x - eps v)) / 2 eps must equal <analytic, v>; a wrong entry anywhere in
    the gradient changes the inner product, so a few directions catch what sampling single coordinates can miss,
    at two forward calls per direction.
    """
    assert x.dtype == np.float64, "finite differences need float64"
    x0 = x.copy()
    for k in range(n_dirs):
        v = rng.standard_normal(x.shape)
        x[...] = x0 + eps * v
        fp = float(np.sum(f() * dy))
        x[...] = x0 - eps * v
        fm = float(np.sum(f() * dy))
        x[...] = x0
        numeric = (fp - fm) / (2 * eps)
        exact = float(np.sum(analytic * v))
        scale = float(np.sqrt(np.sum(analytic ** 2) * np.sum(v ** 2))) + 1e-12
        assert abs(numeric - exact) <= rtol * scale + 1e-9, (
            f"{name}: directional derivative {k}: finite differences {numeric!r} vs analytic {exact!r}")
