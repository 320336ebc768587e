"""NumPy's OpenBLAS, loaded before this package: its idle workers' spin set after the fact.

OpenBLAS takes ``OPENBLAS_THREAD_TIMEOUT`` (how long an idle worker spins before it sleeps, see ``kernels``) from
the environment when it loads, and uses it when it starts its worker threads. A script that imports NumPy before
tinyconv (``import numpy as np`` on its first line) has loaded OpenBLAS with its own default, 2^28 cycles: after
every GEMM a worker spins for ~0.1 s on a core that the next depthwise or batch-norm kernel wants. Measured on the
README's 2-core machine, NumPy imported first, alternating processes without and with the restart below: a
Fashion-MNIST training step (alpha 0.5, res 32, batch 128) 26.7-28.4 against 19.0-21.0 ms, alpha 0.5 res 128
batch 32 85-90 against 67-74 ms; a folded inference forward at batch 32, res 128, 21.6-21.8 against 18.8-19.3 ms
(alpha 0.5) and 52.0-54.3 against 46.8-47.6 ms (alpha 1.0).

:func:`restart_workers` does what OpenBLAS itself does in a child process after ``fork``: it stops the workers
(``blas_thread_shutdown_``), and the next threaded GEMM starts them again, reading the timeout anew (after
``openblas_read_env``, which refreshes OpenBLAS's copy of its variables). These are exported by OpenBLAS builds
that run their own pthreads pool (NumPy's wheels among them); other BLAS libraries, and OpenBLAS built on OpenMP,
which has no such workers, are left as they are.
"""
import ctypes
import os


def restart_workers():
    """Restart the worker pool of every loaded pthreads OpenBLAS whose idle spin is not the one
    ``OPENBLAS_THREAD_TIMEOUT`` now asks for, so that it reads the variable again: a library loaded before the
    variable was set (OpenBLAS keeps the value it read, 0 for none: ``openblas_thread_timeout``). One that already
    runs with the value, as when the user set it before starting Python, is left alone. Call it with no GEMM
    running on another thread (``kernels`` calls it on import).

    Returns:
        the file paths of the libraries restarted (empty where there was nothing to restart).
    """
    from threadpoolctl import ThreadpoolController  # only here: the search reads the process's loaded libraries
    try:
        wanted = int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "0"))
    except ValueError:  # not a number: OpenBLAS makes of it what it makes of it
        return []
    restarted = []
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if getattr(lib, "threading_layer", None) != "pthreads":
            continue
        try:
            read, read_env, shutdown = (lib.dynlib.openblas_thread_timeout, lib.dynlib.openblas_read_env,
                                        lib.dynlib.blas_thread_shutdown_)
        except AttributeError:  # a build that does not export them: leave it alone
            continue
        read.restype, read.argtypes = ctypes.c_uint, []
        read_env.restype, read_env.argtypes = None, []
        shutdown.restype, shutdown.argtypes = ctypes.c_int, []
        if read() == wanted:
            continue
        read_env()
        shutdown()
        restarted.append(lib.filepath)
    return restarted
