"""What every speed benchmark shares: its environment, the machine header, interleaved timing, result tables.

Environment. A benchmark re-executes itself once at start (:func:`reexec_for_benchmark`) so both engines run at
their best and the run says how:
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
        glibc keeps freed blocks up to 1 GiB on the heap and never trims it, so a large temporary is not mmapped,
        page-faulted and unmapped on every call (that alone made PyTorch's training step ~1.4x faster here).
    OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed (both together)
        the machine sets them (a workaround for an old OpenBLAS) and they pin NumPy's GEMMs to the Haswell (AVX2)
        kernels; without them OpenBLAS picks its kernels for this CPU (the header names the one it chose).
Only the benchmark process changes; tests and CI keep the machine's environment.

Timing. :func:`time_interleaved` warms every contender up, then runs the repeats round-robin (ours, torch, ours,
torch...) so a burst of noise on this shared machine hits all of them, and reports medians. A call shorter than
``min_sample`` is repeated inside one sample, so clock resolution and Python overhead do not dominate.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

ENV_MARKER = "TINYCONV_BENCH_ENV"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
OPENBLAS_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREADS = 2


def benchmark_env(environ):
    """The benchmark's environment derived from ``environ``: allocator settings on, the two OpenBLAS overrides off.

    Args:
        environ: a mapping, e.g. ``os.environ``.

    Returns:
        a new dict (``environ`` is not changed) with the marker set, so a re-executed process does not re-execute.
    """
    env = {k: v for k, v in environ.items() if k not in OPENBLAS_UNSET}
    env.update(MALLOC_ENV)
    env[ENV_MARKER] = "1"
    return env


def reexec_for_benchmark(module):
    """Re-execute ``python -m module <same arguments>`` with :func:`benchmark_env`, unless already done.

    Call it before NumPy or torch is imported: glibc reads the malloc variables and OpenBLAS its core type when
    they load, so only a fresh process sees them.
    """
    if os.environ.get(ENV_MARKER) == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], benchmark_env(os.environ))


def environment_line():
    """The benchmark-relevant environment variables as they are in this process."""
    shown = [f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ]
    for k in OPENBLAS_UNSET:
        shown.append(f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset")
    return "; ".join(shown)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags)
    except OSError:
        pass
    return "unknown"


def _git_revision():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "kernels",
                                "tinyconv", "models"], cwd=here, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes in kernels/tinyconv/models' if dirty else ''}" if rev else "unknown"


def blas_description():
    """NumPy's BLAS as threadpoolctl sees it: library, version, the core/kernel set it chose, threads."""
    from threadpoolctl import threadpool_info
    rows = [f"{i.get('internal_api')} {i.get('version')} core {i.get('architecture', '?')} "
            f"({i.get('num_threads')} threads, {os.path.basename(i.get('filepath', ''))})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(rows) or "unknown"


def machine_header(torch=None):
    """Lines describing the machine, libraries, threads and environment of this run."""
    import numba
    import numpy as np
    lines = [f"CPU: {_cpu_model()}, {os.cpu_count()} cores ({_cpu_flags()}); Python {platform.python_version()}",
             f"NumPy {np.__version__}; BLAS: {blas_description()}",
             f"Numba {numba.__version__}: {numba.get_num_threads()} threads, threading layer "
             f"{_numba_layer()}; fastmath {os.environ.get('TINYCONV_FASTMATH', '0') == '1'}"]
    if torch is not None:
        lines.append(f"PyTorch {torch.__version__}: {torch.get_num_threads()} threads, CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()}, mkldnn {torch.backends.mkldnn.is_available()}")
    lines.append(f"Environment: {environment_line()}")
    lines.append(f"Load average at start (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
                 f"on {os.cpu_count()} cores (the machine is shared: other work runs beside the benchmark)")
    lines.append(f"Tree: git {_git_revision()}")
    return lines


def _numba_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"not yet chosen (config: {numba.config.THREADING_LAYER})"


class CpuShare:
    """How much of the machine's CPU other processes took while a benchmark ran.

    Reads the busy time of all cores from /proc/stat and this process's own CPU time (children included, so the
    benchmark's subprocesses count as its own) at construction and at :meth:`line`. On a 2-core machine every
    competing runnable thread preempts one of the 2 worker threads, and a parallel region then waits a scheduler
    time slice at its barrier: timings of both engines degrade far more than the share suggests.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / tick  # all but idle, iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def line(self):
        end = self._sample()
        if self.start is None or end is None:
            return "CPU taken by other processes: unknown (no /proc/stat)"
        wall = end[0] - self.start[0]
        cores = os.cpu_count() or 1
        others = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        return (f"CPU taken by other processes during the run: {100 * others / (wall * cores):.0f}% of "
                f"{cores} cores ({others:.0f} core-seconds in {wall:.0f} s); load average at the end: "
                f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")


def set_threads(torch=None, n=THREADS):
    """Give both engines ``n`` threads: Numba and NumPy's BLAS (tinyconv's switch) and PyTorch's intra-op pool."""
    from tinyconv.threads import set_threads as tc_set_threads
    tc_set_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def _calibrate(fn, min_sample):
    """Calls per sample so one sample lasts at least ``min_sample`` seconds."""
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    if dt >= min_sample:
        return 1
    return min(10_000, int(min_sample / max(dt, 1e-7)) + 1)


def time_interleaved(fns, *, repeats, warmup=2, min_sample=2e-3, settle=0.0, best=False):
    """Median seconds per call of each callable, with the repeats interleaved.

    Args:
        fns: dict name -> zero-argument callable.
        repeats: samples per callable (each sample may hold several calls, see ``min_sample``).
        warmup: untimed calls of each callable first (compilation, caches, allocator).
        min_sample: a sample lasts at least this long (calls are repeated inside it).
        settle: seconds slept before each sample, so the thread pool of the previous contender has gone idle.
        best: also return the fastest sample of each (what the machine can do when nobody else is running).

    Returns:
        dict name -> median seconds per call; with ``best``, (medians, fastest samples), two such dicts.
    """
    numbers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        numbers[name] = _calibrate(fn, min_sample)
    samples = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            if settle:
                time.sleep(settle)
            n = numbers[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t) / n)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return (medians, {name: min(s) for name, s in samples.items()}) if best else medians


def rel_error(ours, ref):
    """max |ours - ref| / max |ref| (0 when both are all zero): the error relative to the result's scale."""
    import numpy as np
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: ours {ours.shape}, reference {ref.shape}")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def markdown_table(headers, rows):
    """A GitHub-markdown table (also readable as plain text); numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _is_number(s):
    s = s.rstrip("x%").replace(",", "")
    try:
        float(s)
        return True
    except ValueError:
        return s in ("-", "")


def fmt_ms(seconds):
    """Milliseconds with 3 significant digits (1.23, 12.3, 123)."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def verdict(value, target):
    """'met' or 'MISSED' for a ratio against its target (higher is better); '-' without a target."""
    if target is None or value is None:
        return "-"
    return "met" if value >= target else "MISSED"


def command_line(module):
    """The command that reproduces this run, as the results file quotes it."""
    return " ".join([".venv/bin/python -m", module, *sys.argv[1:]])


def parser(module, description, default_out, default_repeats):
    """The options every benchmark takes: --quick, --case (repeatable), --repeats, --out."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes: a smoke run")
    p.add_argument("--case", action="append", default=[], metavar="TEXT",
                   help="run only the rows whose label contains TEXT (repeatable: a row must contain every TEXT)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed samples per contender (default {default_repeats}, --quick 3)")
    p.add_argument("--out", default=default_out, help=f"markdown results file (default {default_out})")
    return p


def selected(label, filters):
    """True if ``label`` contains every filter string (case-insensitive); no filters select everything."""
    label = label.lower()
    return all(f.lower() in label for f in filters)


def write_results(path, title, module, header, sections):
    """Write ``# title``, the command, the machine header and the sections (markdown strings) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = [f"# {title}", "", "Produced by:", "", "```", command_line(module), "```", "",
            *(f"- {h}" for h in header), ""]
    for s in sections:
        text += [s, ""]
    with open(path, "w") as f:
        f.write("\n".join(text).rstrip() + "\n")
