"""The one place that sets Numba's jit options for every kernel.

Kernels are decorated with :func:`kernel` (serial) or :func:`parallel_kernel` (uses ``prange``). Both compile
lazily on first call and cache the machine code on disk (``cache=True``), so importing a kernel module compiles
nothing and a second process starts warm.

Environment switches (read once, at import):
    TINYCONV_FASTMATH=1   allow fastmath reassociation (faster reductions, results differ in the last bits).
    NUMBA_DISABLE_JIT=1   Numba's own switch: kernels run as plain Python, for debugging and coverage.
"""
import os

import numba

FASTMATH = os.environ.get("TINYCONV_FASTMATH", "0") == "1"

JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

# For the hot convolution loops: without 'contract' LLVM does not fuse a*b + c into one FMA, which halves their
# arithmetic throughput. Contraction only drops the intermediate rounding; nothing is reassociated.
FAST_OPTIONS = dict(JIT_OPTIONS, fastmath=True if FASTMATH else {"contract"})


def kernel(fn):
    """Compile ``fn`` as a serial Numba kernel with the project's options."""
    return numba.njit(**JIT_OPTIONS)(fn)


def parallel_kernel(fn):
    """Compile ``fn`` as a parallel Numba kernel; its ``prange`` loops must write disjoint outputs."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(fn)


def fast_kernel(fn):
    """Compile ``fn`` as a serial Numba kernel that may contract a*b + c into FMAs."""
    return numba.njit(**FAST_OPTIONS)(fn)


def fast_parallel_kernel(fn):
    """:func:`parallel_kernel` that may contract a*b + c into FMAs."""
    return numba.njit(parallel=True, **FAST_OPTIONS)(fn)
