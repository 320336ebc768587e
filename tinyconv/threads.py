"""One switch for the two thread pools: Numba's (our kernels) and the BLAS library's (NumPy's GEMMs).

They never nest: no kernel calls BLAS inside a parallel region, and GEMMs are called from Python between kernels.
So both pools can use every core in turn; what must not happen is each pool sizing itself to the machine on top of
a caller that is already parallel (oversubscription halves speed on two cores). ``set_threads`` sets both.

On two threads there is a second way to use the two cores, for a backward pass on small maps (:class:`CoreSplit`):
each pool drops to one thread, and the weight gradients, which nothing in the backward pass waits for, run on a
worker thread beside the chain of input gradients. Two kernels then run at once, one per core, instead of one
kernel split across both, which on maps this small gains little over one core (a launch costs as much as the
second core saves).
"""
import os
import queue
import threading

import numba
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

_blas_limiter = None
_blas_controllers = None
_worker = None
_worker_pid = None


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


def _blas():
    """threadpoolctl's controllers of the loaded BLAS libraries (found once: the search reads the process's maps)."""
    global _blas_controllers
    if _blas_controllers is None:
        _blas_controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas_controllers


def can_split():
    """Whether :class:`CoreSplit` applies here: this thread runs Numba on exactly two threads, and threadpoolctl
    can set the BLAS library's thread count (with more cores, each engine keeps them all: one worker would leave
    most of them idle)."""
    return numba.get_num_threads() == 2 and bool(_blas())


class _Worker:
    """One daemon thread running queued jobs in order, with Numba on one thread inside it.

    Lighter than a one-thread ``concurrent.futures.ThreadPoolExecutor``, which the split backward used before: a
    job is a queue entry, not a Future with its own lock and condition, and waiting for a batch of jobs is one
    event at the end of the queue. On the 2-core machine, 27 empty jobs (one Fashion-MNIST backward's worth)
    submitted and waited for took 204 us through the executor and 54 us this way.
    """

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tinyconv-grads", daemon=True)
        self._thread.start()

    def _run(self):
        numba.set_num_threads(1)
        while True:
            fn, errors = self._queue.get()
            try:
                fn()
            except BaseException as e:  # handed to the caller waiting for this batch, which raises it
                errors.append(e)

    def submit(self, fn, errors):
        """Queue ``fn()``; an exception it raises is appended to the list ``errors``."""
        self._queue.put((fn, errors))

    def wait(self):
        """Block until every job queued so far has run."""
        done = threading.Event()
        self._queue.put((done.set, []))
        done.wait()


def _grad_worker():
    """The one worker thread (created on first use, again in a forked child, where the parent's thread is gone)."""
    global _worker, _worker_pid
    if _worker is None or _worker_pid != os.getpid():
        _worker = _Worker()
        _worker_pid = os.getpid()
    return _worker


class CoreSplit:
    """A context in which the calling thread and one worker thread each compute on one core.

    ``split()`` puts Numba (in this thread) and BLAS (process-wide) on one thread, so that this thread and the
    worker, which runs Numba on one thread too, never share a core; ``submit(fn)`` queues ``fn()`` on the worker;
    ``join()`` waits for everything queued and restores the thread counts, so what runs next has both cores again.
    Leaving the context joins. A job's exception is raised by the ``join()`` that waits for it, after every job has
    finished, so that no job still runs once the context is left; an exception already leaving the context wins.

    Jobs must not write anything the calling thread reads or writes before the join, and the caller must not
    write what a queued job reads.
    """

    def __init__(self):
        self._saved = None  # (Numba threads, BLAS threads per library) while split
        self._worker = None  # the worker, once a job is queued
        self._errors = []  # exceptions raised by this context's jobs

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            self.join()
        else:
            self._wait()
            self._restore()
        return False

    def split(self):
        """One thread for Numba here and for BLAS; idempotent."""
        if self._saved is None:
            blas = _blas()
            self._saved = (numba.get_num_threads(), [c.num_threads for c in blas])
            numba.set_num_threads(1)
            for c in blas:
                c.set_num_threads(1)

    def submit(self, fn):
        """Queue ``fn()`` on the worker thread."""
        if self._worker is None:
            self._worker = _grad_worker()
        self._worker.submit(fn, self._errors)

    def join(self):
        """Wait for every queued job, restore the thread counts, then raise the first job's exception if any."""
        errors = self._wait()
        self._restore()
        if errors:
            raise errors[0]

    def _wait(self):
        if self._worker is not None:
            self._worker.wait()
            self._worker = None
        errors, self._errors = self._errors, []
        return errors

    def _restore(self):
        if self._saved is not None:
            threads, blas_threads = self._saved
            self._saved = None
            numba.set_num_threads(threads)
            for c, n in zip(_blas(), blas_threads):
                c.set_num_threads(n)
