"""One switch for the two thread pools: Numba's (our kernels) and the BLAS library's (NumPy's GEMMs).

They never nest: no kernel calls BLAS inside a parallel region, and GEMMs are called from Python between kernels.
So both pools can use every core in turn; what must not happen is each pool sizing itself to the machine on top of
a caller that is already parallel (oversubscription halves speed on two cores). ``set_threads`` sets both.
"""
import os

import numba
from threadpoolctl import threadpool_info, threadpool_limits

_blas_limiter = None


def set_threads(n=None):
    """Use ``n`` threads (default: all cores) for Numba kernels and for BLAS; returns n."""
    global _blas_limiter
    cores = os.cpu_count() or 1
    n = cores if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    _blas_limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def describe():
    """One line naming the thread settings and the BLAS library, for logs and benchmark headers."""
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return f"numba {numba.__version__} ({numba.get_num_threads()} threads); BLAS: {', '.join(blas) or 'unknown'}"
