"""Compile every kernel ahead of use, on every core: ``python -m tinyconv.precompile``.

Numba compiles each kernel on its first call, in the calling process, one after another: on a fresh machine the
first training run waits ~40 s on the 2-core machine before its first step, and the test suite pays the same for
float32 and again for float64. Compiled kernels go to Numba's on-disk cache (``cache=True``), which any later
process loads in milliseconds. This command fills that cache with a pool of processes, each taking the next
first call of :mod:`kernels.warmup` (the heaviest first) until none is left: the same compile work, spread over
the cores. ``scripts/setup`` runs it after installing.

Processes that compile the same helper write the same cache entry; Numba writes each file to a temporary name
and renames it, so they never corrupt one another (at worst an entry is compiled twice).

    python -m tinyconv.precompile                      # float32, one process per core (at most 8)
    python -m tinyconv.precompile --dtype float32 float64 --jobs 4
"""
import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

DTYPES = ("float32", "float64")
# Default pool size: one process per core, but no more than this: each process holds Numba and LLVM (~150 MB while
# compiling), and with ~45 first calls per dtype, more processes mostly compile the same shared helpers again.
MAX_DEFAULT_JOBS = 8


def default_jobs():
    """One process per core, at most :data:`MAX_DEFAULT_JOBS`."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_JOBS))


def _compile(name, dtype):
    """In a pool process: the warm-up entry ``name`` in ``dtype``; returns its seconds."""
    from kernels import warmup
    return warmup.run([name], dtype)[name]


def precompile(dtypes=("float32",), jobs=None, names=None):
    """Compile (or load from the cache) every kernel for each of ``dtypes``, on ``jobs`` processes (default:
    :func:`default_jobs`); ``names``: only these entries of :func:`kernels.warmup.names`. Returns (wall seconds,
    {(name, dtype): seconds of that entry in its process})."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {d!r}")
    if jobs is None:
        jobs = default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    from kernels import warmup
    known = warmup.names()
    if names is not None:
        warmup.check_names(names, known)  # before any process starts
    # Heaviest first (warmup's order), each entry in every dtype before the next entry.
    tasks = [(name, d) for name in known if names is None or name in names for d in dict.fromkeys(dtypes)]
    start = time.perf_counter()
    if jobs == 1:
        times = {(name, d): _compile(name, d) for name, d in tasks}
    else:
        # spawn, not fork: a forked child would inherit this process's OpenMP and BLAS thread pools mid-state.
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {task: pool.submit(_compile, *task) for task in tasks}
            times = {task: future.result() for task, future in futures.items()}
    return time.perf_counter() - start, times


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tinyconv.precompile",
                                description="Compile every tinyconv kernel into Numba's on-disk cache, on every "
                                            "core.")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"],
                   help="the dtypes to compile for (training uses float32; the tests use both)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"processes (default: one per core, at most {MAX_DEFAULT_JOBS})")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be a positive int, got {args.jobs}")
    jobs = args.jobs or default_jobs()
    wall, times = precompile(tuple(args.dtype), jobs)
    print(f"precompile: {len(times)} first calls ({', '.join(dict.fromkeys(args.dtype))}) in {wall:.1f} s on "
          f"{jobs} process{'es' if jobs > 1 else ''} ({sum(times.values()):.1f} s of work in them; a second run "
          f"loads from the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
