"""tinyconv kernels: Numba loops with hand-written backward passes, NHWC layout.

Each module holds one op family with its forward and backward side by side. Importing compiles nothing; each
kernel compiles on its first call and is cached on disk.

Importing this package sets one default for NumPy's BLAS, which runs the 1x1 convolutions' GEMMs between our
kernels: ``OPENBLAS_THREAD_TIMEOUT=18`` (unless already set), so OpenBLAS's idle workers spin for 2^18 cycles
(~0.1 ms) after a GEMM before sleeping, instead of OpenBLAS's default 2^28 (~0.1 s). A worker spinning that long
takes a core from the parallel Numba kernels that run next; one that sleeps at once (2^4) must be woken for every
GEMM, which costs the small-batch Fashion-MNIST network more than the spinning did. Measured on the 2-core
machine, alternating runs, medians:
    training step 0.5/128 batch 32:  2^28 159 ms, 2^4 122, 2^18 121 (6 runs); again 153, 133, 132 (4 runs)
    training step 1.0/128 batch 32:  2^28 330 ms, 2^4 256, 2^18 266 (6 runs)
    Fashion-MNIST training epoch:    2^28 22.7 s, 2^4 25.6, 2^18 21.7 (3 runs; 2^4 was slower than 2^28 in 3 of
                                     3 further pairs)
OpenBLAS reads the variable when it loads (``tinyconv`` and ``models`` import this package first). When NumPy was
imported before, OpenBLAS may hold another value (none, if the variable was unset then, or set only after NumPy
loaded): this package then restarts OpenBLAS's workers so that they read it (:mod:`kernels._openblas`;
``OPENBLAS_RESTARTED`` names the libraries restarted).

It also tells glibc's allocator to keep freed memory for reuse (:mod:`kernels._alloc`): every wrapper allocates
its output, and without this each training step page-faults its activations back in.
"""
import os as _os
import sys as _sys

# Whether NumPy's BLAS has already read its environment: then setting the variable is not enough.
_late = "numpy" in _sys.modules
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")
OPENBLAS_RESTARTED = []
if _late:
    from kernels import _openblas

    try:
        OPENBLAS_RESTARTED = _openblas.restart_workers()
    except Exception as _e:  # a speed setting: never a reason for the import to fail
        import warnings as _warnings

        _warnings.warn(f"tinyconv could not restart NumPy's OpenBLAS workers ({_e!r}); they keep OpenBLAS's own "
                       f"idle spin. Set OPENBLAS_THREAD_TIMEOUT=18 before importing NumPy for full speed.",
                       RuntimeWarning, stacklevel=2)

from kernels import _alloc  # noqa: E402

_alloc.keep_freed_memory()
