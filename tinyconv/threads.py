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


_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def blas_override_note(environ=None, cpuinfo="/proc/cpuinfo"):
    """A one-line hint when ``OPENBLAS_CORETYPE`` pins OpenBLAS to kernels older than the CPU's, else None.

    Some machines set ``OPENBLAS_CORETYPE=Haswell`` globally; on an AVX-512 CPU NumPy's GEMMs then run AVX2 code.
    On the README's machine that made training about 20% slower (1x1 convolutions are GEMMs). The variable is the
    user's choice, so this only says so; it must be unset before NumPy is imported to take effect.
    """
    forced = (os.environ if environ is None else environ).get("OPENBLAS_CORETYPE", "")
    if not forced or forced.lower() in _AVX512_CORES:
        return None
    try:
        with open(cpuinfo) as f:
            has_avx512 = " avx512f" in f.read()
    except OSError:
        return None
    if not has_avx512:
        return None
    return (f"note: OPENBLAS_CORETYPE={forced} makes NumPy's BLAS run {forced} kernels on this AVX-512 CPU; "
            f"run with it unset (env -u OPENBLAS_CORETYPE ...) for faster 1x1 convolutions")

