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
from numba.core.compiler import Compiler  # noqa: E402

FASTMATH = os.environ.get("TINYCONV_FASTMATH", "0") == "1"

JIT_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")

# For the hot convolution loops: without 'contract' LLVM does not fuse a*b + c into one FMA, which halves their
# arithmetic throughput. Contraction only drops the intermediate rounding; nothing is reassociated.
FAST_OPTIONS = dict(JIT_OPTIONS, fastmath=True if FASTMATH else {"contract"})

# With passive workers a launch costs ~60 us on this VM when idle (waking a sleeping vCPU) and ~10 us under load.
# Measured per BN+ReLU layer: two threads win only from ~0.5-1 M elements (forward 0.52 -> 0.35 ms at 1 M, backward
# 0.44 -> 0.54 ms at 0.5 M), so smaller maps run serial and never pay for a launch.
PARALLEL_MIN_WORK = int(os.environ.get("TINYCONV_PARALLEL_MIN", 1 << 19))


class _NoAliasCompiler(Compiler):
    """Numba's compiler with its ``noalias`` flag set (the one parfors sets on a loop body it has proved free of
    aliases): every pointer argument, so every array's data, is marked LLVM ``noalias``.

    Without it LLVM must assume that an output row may overlap the rows it reads, and it vectorizes a loop only
    behind runtime overlap checks, one per pair of (written, read) arrays and offsets, run each time the loop
    starts. In the depthwise 3x3 loops (2 outputs, 15 input and 9 weight offsets: ~50 checks) those cost more
    than a 16- or 32-channel loop itself: the stride-2 column pairs ran 1.7x faster at 16 channels and 1.3x at 32
    once the checks were gone, unchanged from 64 on.
    """

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags.noalias = True  # a fresh Flags object per compilation
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)


def _options(base, noalias):
    """``base`` jit options, plus the no-alias compiler when asked.

    noalias=True is a promise about every call: no array the kernel writes overlaps another array argument
    (reading one array through two arguments is fine). Breaking it is undefined behaviour, silently wrong
    results, so only kernels whose outputs the wrapper allocates (or that are called with fresh buffers) use it.
    """
    return dict(base, pipeline_class=_NoAliasCompiler) if noalias else base


def _decorator(base, fn, noalias, **extra):
    if fn is None:  # used as @decorator(noalias=...)
        return lambda f: numba.njit(**extra, **_options(base, noalias))(f)
    return numba.njit(**extra, **_options(base, noalias))(fn)


def kernel(fn=None, *, noalias=False, inline=False):
    """Compile ``fn`` as a serial Numba kernel with the project's options (``@kernel`` or
    ``@kernel(noalias=True)``, see :func:`_options`).

    inline=True: Numba inlines it into every caller, in its own IR, before LLVM sees either. For a small helper
    called from a function that runs per row: a function that calls another takes a reference to each array
    argument on entry and drops it on return (two atomic updates each, ~8 ns apiece here), where one without
    calls has those pairs removed by Numba's reference-count pruning."""
    return _decorator(JIT_OPTIONS, fn, noalias, **({"inline": "always"} if inline else {}))


def parallel_kernel(fn=None, *, noalias=False):
    """Compile ``fn`` as a parallel Numba kernel; its ``prange`` loops must write disjoint outputs."""
    return _decorator(JIT_OPTIONS, fn, noalias, parallel=True)


def fast_kernel(fn=None, *, noalias=False, inline=False):
    """Compile ``fn`` as a serial Numba kernel that may contract a*b + c into FMAs (``inline`` as for
    :func:`kernel`)."""
    return _decorator(FAST_OPTIONS, fn, noalias, **({"inline": "always"} if inline else {}))


def fast_parallel_kernel(fn=None, *, noalias=False):
    """:func:`parallel_kernel` that may contract a*b + c into FMAs."""
    return _decorator(FAST_OPTIONS, fn, noalias, parallel=True)


def use_parallel(work, min_work=None):
    """The serial/parallel rule: run ``work`` elements on Numba's threads only if it is worth a launch, from
    ``min_work`` elements (default :data:`PARALLEL_MIN_WORK`)."""
    return work >= (PARALLEL_MIN_WORK if min_work is None else min_work) and numba.get_num_threads() > 1


class SizedKernel:
    """A kernel compiled twice, serial and parallel (``prange`` is ``range`` in the serial one).

    Call ``k(*args, work=n)``: :func:`use_parallel` picks the version for ``n`` elements of work (``min_work=``
    overrides its threshold for a call site that measured its own).
    """

    def __init__(self, fn, options):
        self.serial = numba.njit(**options)(_renamed(fn, "_serial"))  # own name: its own on-disk cache entry
        self.parallel = numba.njit(parallel=True, **options)(fn)
        self.__doc__ = fn.__doc__

    def __call__(self, *args, work, min_work=None):
        return (self.parallel if use_parallel(work, min_work) else self.serial)(*args)


def _renamed(fn, suffix):
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + suffix
    clone.__module__ = fn.__module__
    return clone


def sized_kernel(fn=None, *, noalias=False):
    """Compile ``fn`` serial and parallel, dispatched by work size (see :class:`SizedKernel`)."""
    if fn is None:
        return lambda f: SizedKernel(f, _options(JIT_OPTIONS, noalias))
    return SizedKernel(fn, _options(JIT_OPTIONS, noalias))


def fast_sized_kernel(fn=None, *, noalias=False):
    """:func:`sized_kernel` that may contract a*b + c into FMAs."""
    if fn is None:
        return lambda f: SizedKernel(f, _options(FAST_OPTIONS, noalias))
    return SizedKernel(fn, _options(FAST_OPTIONS, noalias))

