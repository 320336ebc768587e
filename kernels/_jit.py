"""The one place that sets Numba's jit options for every kernel.

Kernels are decorated with :func:`kernel` (serial) or :func:`parallel_kernel` (uses ``prange``). Both compile
lazily on first call and cache the machine code on disk (``cache=True``), so importing a kernel module compiles
nothing and a second process starts warm.

Kernels that run on anything from a 1x1 map to a 30 MB activation use :func:`sized_kernel` (or
:func:`fast_sized_kernel`): compiled serial and parallel, called with the amount of work, and
:func:`use_parallel` is the one rule that picks. Their loops give the same bits either way (each iteration of a
``prange`` writes its own outputs, reductions use fixed blocks), so the choice only changes the time.

Environment switches (read once, at import):
    TINYCONV_FASTMATH=1       allow fastmath reassociation (faster reductions, results differ in the last bits).
    TINYCONV_PARALLEL_MIN=n   smallest work (elements) a sized kernel runs in parallel (default 2**19).
    NUMBA_DISABLE_JIT=1       Numba's own switch: kernels run as plain Python, for debugging and coverage.
    OMP_WAIT_POLICY           defaults to PASSIVE here (see below); set it yourself to override.
"""
import os
import types

# Numba's OpenMP pool (libgomp, loaded at the first parallel launch) spins its idle workers by default. Between two
# kernels the workers spin while NumPy's BLAS threads need the same cores, and on a loaded machine a spinning
# worker that the scheduler has parked makes the next launch wait a whole time slice: measured on the 2-core
# machine at load 7, a launch of a 1024-element loop took 16 ms median with the default and 8.5 us with PASSIVE
# (a MobileNet 0.5/32 training step: ~4 s against ~0.1 s); at load ~2 the step took 370-410 ms with ACTIVE or
# GOMP_SPINCOUNT >= 20000 against 29-34 ms with PASSIVE. Set before libgomp loads, so it applies.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402  (after the environment default above)

FASTMATH = os.environ.get("TINYCONV_FASTMATH", "0") == "1"

JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

# For the hot convolution loops: without 'contract' LLVM does not fuse a*b + c into one FMA, which halves their
# arithmetic throughput. Contraction only drops the intermediate rounding; nothing is reassociated.
FAST_OPTIONS = dict(JIT_OPTIONS, fastmath=True if FASTMATH else {"contract"})

# With passive workers a launch costs ~60 us on this VM when idle (waking a sleeping vCPU) and ~10 us under load.
# Measured per BN+ReLU layer: two threads win only from ~0.5-1 M elements (forward 0.52 -> 0.35 ms at 1 M, backward
# 0.44 -> 0.54 ms at 0.5 M), so smaller maps run serial and never pay for a launch.
PARALLEL_MIN_WORK = int(os.environ.get("TINYCONV_PARALLEL_MIN", 1 << 19))


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


def use_parallel(work):
    """The serial/parallel rule: run ``work`` elements on Numba's threads only if it is worth a launch."""
    return work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1


class SizedKernel:
    """A kernel compiled twice, serial and parallel (``prange`` is ``range`` in the serial one).

    Call ``k(*args, work=n)``: :func:`use_parallel` picks the version for ``n`` elements of work.
    """

    def __init__(self, fn, options):
        self.serial = numba.njit(**options)(_renamed(fn, "_serial"))  # own name: its own on-disk cache entry
        self.parallel = numba.njit(parallel=True, **options)(fn)
        self.__doc__ = fn.__doc__

    def __call__(self, *args, work):
        return (self.parallel if use_parallel(work) else self.serial)(*args)


def _renamed(fn, suffix):
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + suffix
    clone.__module__ = fn.__module__
    return clone


def sized_kernel(fn):
    """Compile ``fn`` serial and parallel, dispatched by work size (see :class:`SizedKernel`)."""
    return SizedKernel(fn, JIT_OPTIONS)


def fast_sized_kernel(fn):
    """:func:`sized_kernel` that may contract a*b + c into FMAs."""
    return SizedKernel(fn, FAST_OPTIONS)

