"""tinyconv kernels: Numba loops with hand-written backward passes, NHWC layout.

Each module holds one op family with its forward and backward side by side. Importing compiles nothing; each
kernel compiles on its first call and is cached on disk.

Importing this package sets one default for NumPy's BLAS, which runs the 1x1 convolutions' GEMMs between our
kernels: ``OPENBLAS_THREAD_TIMEOUT=4`` (unless already set). OpenBLAS's worker threads otherwise spin for 2^28 cycles
(~0.1 s) after every GEMM before sleeping, and on a machine with few cores a spinning BLAS worker takes a core from
the Numba kernels that run next. Measured on the 2-core machine, median training step, 6 alternating runs each:
MobileNet 1.0/128 batch 32 330 -> 256 ms, 0.5/128 159 -> 122 ms, 0.5/32 batch 128 39.8 -> 36.8 ms. OpenBLAS reads
the variable when it loads, so the default only applies if NumPy is not imported yet (``tinyconv`` imports this
package first; a script that imports NumPy before tinyconv should set the variable itself).
"""
import os as _os

_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
