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

Processes. Each engine runs in a persistent :class:`Worker` process of its own, started with the benchmark
environment and its own thread setting: tinyconv's worker never imports torch (an import there raises), PyTorch's
never launches a Numba kernel. In one process the two engines' OpenMP runtimes (PyTorch's bundled libgomp and
Numba's) and OpenBLAS's threads fight over the 2 cores, each runtime's idle workers spinning or waking late: a
MobileNet 0.5/32/b128 training step of ours took 28-33 ms alone in its process and 346-368 ms after torch had run
in the same one. The parent imports neither torch nor a kernel; it sends commands over a pipe (pickled
``(function, args)``, answered with the result), sets up the same case in every worker, collects their outputs to
validate, and times with :class:`Remote` contenders: each sample is measured inside its worker, one worker at a
time, round-robin, with the other workers paused (SIGSTOP) so their idle threads cannot spin into it.
"""
import argparse
import importlib
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback

ENV_MARKER = "TINYCONV_BENCH_ENV"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
OPENBLAS_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREADS = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("tinyconv", "torch")


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
    for k in (*OPENBLAS_UNSET, "OPENBLAS_THREAD_TIMEOUT"):
        shown.append(f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset")
    return "; ".join(shown)


def _cpu_model(cpuinfo="/proc/cpuinfo", caches="/sys/devices/system/cpu/cpu0/cache"):
    """The CPU's model name, with its family, model and stepping numbers and cpu0's cache sizes.

    Virtual machines often report a generic name ("Intel(R) Xeon(R) Processor"); the numbers and the caches still
    tell one machine from another (family 6 model 207 is an Emerald Rapids Xeon, whose L2 is 2 MiB a core), and
    results from different machines are not comparable."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}"
                       + (f" stepping {fields['stepping']}" if "stepping" in fields else ""))
    sizes = _cache_sizes(caches)
    if sizes:
        details.append("caches " + ", ".join(sizes) + " (cpu0's)")
    return f"{name} ({'; '.join(details)})" if details else name


def _llvm_cpu():
    """The CPU model Numba's LLVM compiles the kernels for (``NUMBA_CPU_NAME`` if set, else the host's): it decides
    the vector width LLVM prefers (256 bits on Intel's server cores, even with AVX-512)."""
    import numba
    from llvmlite import binding
    return numba.config.CPU_NAME or binding.get_host_cpu_name()


def _read_text(path):
    with open(path) as f:
        return f.read().strip()


def _cache_sizes(caches):
    """['L1d 48K', 'L2 2048K', ...] from sysfs's cache directory of one CPU, [] where it cannot be read."""
    rows = []
    try:
        entries = sorted(e for e in os.listdir(caches) if e.startswith("index"))
    except OSError:
        return rows
    for entry in entries:
        try:
            level, kind, size = (_read_text(os.path.join(caches, entry, name)) for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind == "Instruction":
            continue
        rows.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return rows


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


def machine_header(workers=(), load_at_start=None):
    """Lines describing the machine, libraries, threads and environment of this run.

    Args:
        workers: the run's :class:`Worker` processes; each describes its own engine, threads and environment.
        load_at_start: ``os.getloadavg()`` taken when the run started (default: now).
    """
    load = os.getloadavg() if load_at_start is None else load_at_start
    lines = [f"CPU: {_cpu_model()}, {os.cpu_count()} cores ({_cpu_flags()}); Python {platform.python_version()}"]
    for w in workers:
        lines += w.call("bench._harness:engine_info")
    if workers:
        lines.append("Processes: " + ", ".join(f"{w.engine} in worker pid {w.pid}" for w in workers)
                     + "; the parent only sends commands, compares outputs and writes the tables "
                       "(it imports neither torch nor a kernel)")
    else:
        lines.append(f"Environment: {environment_line()}")
    lines.append(f"Load average at start (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in load)} "
                 f"on {os.cpu_count()} cores (the machine is shared: other work runs beside the benchmark)")
    lines.append(f"Tree: git {_git_revision()}")
    return lines


def engine_info():
    """In a worker: lines naming this process's engine, libraries, threads and environment."""
    import numpy as np
    lines = []
    if _ENGINE == "tinyconv":
        import numba
        from kernels import _alloc
        lines.append(f"tinyconv worker: NumPy {np.__version__}; BLAS: {blas_description()}; Numba "
                     f"{numba.__version__}: {numba.get_num_threads()} threads, threading layer {_numba_layer()}, "
                     f"code for LLVM's CPU '{_llvm_cpu()}'; fastmath "
                     f"{os.environ.get('TINYCONV_FASTMATH', '0') == '1'}; OMP_WAIT_POLICY "
                     f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; allocator default: {_alloc.status}; "
                     f"torch imported: {imported('torch')}")
    if _ENGINE == "torch":
        import torch
        lines.append(f"torch worker: PyTorch {torch.__version__}: {torch.get_num_threads()} threads, CPU "
                     f"capability {torch.backends.cpu.get_cpu_capability()}, mkldnn "
                     f"{torch.backends.mkldnn.is_available()}; Numba kernels run: {_numba_ran()}")
    lines.append(f"Environment ({_ENGINE or 'this process'}): {environment_line()}")
    return lines


def imported(name):
    """True if module ``name`` is imported in this process (a blocked import does not count)."""
    return sys.modules.get(name) is not None


def _numba_ran():
    """Whether this process has launched a Numba parallel kernel (its OpenMP runtime then exists)."""
    if not imported("numba"):
        return False
    import numba
    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def _numba_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"not yet chosen (config: {numba.config.THREADING_LAYER})"


class CpuShare:
    """How much of the machine's CPU other processes took while a benchmark ran.

    Reads the busy time of all cores from /proc/stat and the CPU time of this process, its finished children
    (the memory and JIT subprocesses) and its worker processes (``pids``, read from /proc/<pid>/stat since they
    have not exited yet) at construction and at :meth:`line`. On a 2-core machine every competing runnable thread
    preempts one of the 2 worker threads, and a parallel region then waits a scheduler time slice at its barrier:
    timings of both engines degrade far more than the share suggests.
    """

    def __init__(self, pids=()):
        self.pids = tuple(pids)
        self.start = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / tick  # all but idle, iowait
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()  # fields from 3 (state) on
                own += sum(int(v) for v in rest[11:15]) / tick  # utime, stime, cutime, cstime
            except (OSError, ValueError, IndexError):
                pass
        return time.monotonic(), busy, own

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
    """Give an engine ``n`` threads: Numba and NumPy's BLAS (tinyconv's switch), or PyTorch's intra-op pool."""
    if torch is not None:
        torch.set_num_threads(n)
        return
    from tinyconv.threads import set_threads as tc_set_threads
    tc_set_threads(n)


# --- worker processes -------------------------------------------------------------------------------------------

_ENGINE = None
_TIMED = {}  # in a worker: key -> zero-argument callable that the parent times through Remote


class WorkerError(RuntimeError):
    """A command failed inside a worker (the message carries the worker's traceback)."""


def _target_name(fn):
    """'module:qualname' of a module-level function; ``__main__`` is replaced by the module run with ``-m``."""
    if isinstance(fn, str):
        return fn
    mod = fn.__module__
    if mod == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{fn.__qualname__} lives in a script; workers import functions by module name")
        mod = spec.name
    return f"{mod}:{fn.__qualname__}"


def _resolve(name):
    mod, _, qual = name.partition(":")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


class Worker:
    """A persistent process running one engine, driven over a pipe.

    ``Worker('tinyconv')`` sets Numba's and BLAS's threads and makes ``import torch`` fail in that process;
    ``Worker('torch')`` imports torch and sets its intra-op threads. Both start with :func:`benchmark_env` (so a
    test starting one gets the benchmark's allocator and OpenBLAS settings too) from the repository root.
    :meth:`call` runs a module-level function there and returns its (pickled) result; an exception there is
    raised here as :class:`WorkerError`. Use as a context manager, or :meth:`close`.
    """

    def __init__(self, engine, threads=THREADS):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
        code = f"from bench._harness import _worker_main; _worker_main({engine!r}, {int(threads)})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=benchmark_env(os.environ), cwd=REPO)
        self.pid = self._proc.pid
        self.call("bench._harness:imported", "numpy")  # wait until it is up (imports and threads done)

    def call(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` in the worker; ``fn`` a module-level function or 'module:qualname'."""
        if self._proc is None:
            raise WorkerError(f"{self.engine} worker is closed")
        name = _target_name(fn)
        try:
            pickle.dump((name, args, kwargs), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError) as e:
            code = self._proc.poll()
            raise WorkerError(f"{self.engine} worker (pid {self.pid}) died during {name} (exit code {code}; its "
                              f"stderr is this process's)") from e
        if status == "error":
            raise WorkerError(f"{self.engine} worker: {name} failed:\n{value}")
        return value

    def pause(self):
        """Stop the whole process (SIGSTOP): its idle threads cannot spin while another engine is timed."""
        if self._proc is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self):
        """Continue a paused process (SIGCONT; harmless if it runs)."""
        if self._proc is not None:
            os.kill(self.pid, signal.SIGCONT)

    def close(self):
        if self._proc is None:
            return
        self.resume()
        proc, self._proc = self._proc, None
        try:
            pickle.dump(None, proc.stdin)
            proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            self.close()


def _worker_main(engine, threads):
    """A worker's loop: read ``(function, args, kwargs)``, answer ``('ok', result)`` or ``('error', traceback)``.

    The protocol owns the original stdout; anything the engines print goes to stderr instead.
    """
    global _ENGINE
    _ENGINE = engine
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    if engine == "tinyconv":
        sys.modules["torch"] = None  # 'import torch' raises ImportError in this process
        set_threads(None, threads)
    else:
        import torch
        set_threads(torch, threads)
    while True:
        try:
            msg = pickle.load(requests)
        except EOFError:
            break
        if msg is None:
            break
        name, args, kwargs = msg
        try:
            out = ("ok", _resolve(name)(*args, **kwargs))
        except BaseException:  # noqa: B902  (reported to the parent, the worker lives on)
            out = ("error", traceback.format_exc())
        try:
            pickle.dump(out, reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an unpicklable result
            pickle.dump(("error", traceback.format_exc()), reply, protocol=pickle.HIGHEST_PROTOCOL)
        reply.flush()


def register(key, fn):
    """In a worker: make ``fn`` timeable by the parent as ``Remote(worker, key)``."""
    _TIMED[key] = fn


def clear_registered():
    """In a worker: forget every registered callable (and what it holds)."""
    _TIMED.clear()


def _prepare(key, warmup, min_sample):
    fn = _TIMED[key]
    for _ in range(warmup):
        fn()
    return _calibrate(fn, min_sample)


def _sample(key, n):
    fn = _TIMED[key]
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


class Local:
    """A contender running in this process (what :func:`time_interleaved` makes of a plain callable)."""

    def __init__(self, fn):
        self.fn = fn

    def prepare(self, warmup, min_sample):
        for _ in range(warmup):
            self.fn()
        return _calibrate(self.fn, min_sample)

    def sample(self, n):
        t = time.perf_counter()
        for _ in range(n):
            self.fn()
        return (time.perf_counter() - t) / n


class Remote:
    """A contender registered as ``key`` in a worker: warm-up, calibration and every sample run there, and the
    clock is read there, so the pipe's round trip is never timed."""

    def __init__(self, worker, key):
        self.worker, self.key = worker, key

    def prepare(self, warmup, min_sample):
        return self.worker.call("bench._harness:_prepare", self.key, warmup, min_sample)

    def sample(self, n):
        return self.worker.call("bench._harness:_sample", self.key, n)


def _calibrate(fn, min_sample):
    """Calls per sample so one sample lasts at least ``min_sample`` seconds."""
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    if dt >= min_sample:
        return 1
    return min(10_000, int(min_sample / max(dt, 1e-7)) + 1)


def time_interleaved(fns, *, repeats, warmup=2, min_sample=2e-3, settle=0.0, best=False):
    """Median seconds per call of each contender, with the repeats interleaved.

    Args:
        fns: dict name -> zero-argument callable (run here) or :class:`Remote` (run in its worker).
        repeats: samples per contender (each sample may hold several calls, see ``min_sample``).
        warmup: untimed calls of each contender first (compilation, caches, allocator).
        min_sample: a sample lasts at least this long (calls are repeated inside it).
        settle: seconds slept before each sample, so the thread pool of the previous contender has gone idle.

    While a contender of one worker is prepared or sampled, every other worker of ``fns`` is paused (SIGSTOP)
    and resumed for its own turn: an engine's idle threads keep running after it answers (PyTorch's libgomp
    workers spin for milliseconds after each parallel region, OpenBLAS's yield-spin for up to ~0.1 s), and
    without the pause they ate into the next engine's sample (our depthwise rows measured 2-2.5x slower right
    after PyTorch's, the bare GEMM 1.6x slower). Each engine is timed alone, as it runs in its own training.
        best: also return the fastest sample of each (what the machine can do when nobody else is running).

    Returns:
        dict name -> median seconds per call; with ``best``, (medians, fastest samples), two such dicts.
    """
    contenders = {name: fn if isinstance(fn, (Remote, Local)) else Local(fn) for name, fn in fns.items()}
    workers = list({id(c.worker): c.worker for c in contenders.values() if isinstance(c, Remote)}.values())

    def alone(c):
        """Only ``c``'s worker runs: the others are paused (a local contender pauses them all)."""
        mine = c.worker if isinstance(c, Remote) else None
        for w in workers:
            if w is not mine:
                w.pause()
        if mine is not None:
            mine.resume()

    try:
        numbers = {}
        for name, c in contenders.items():
            alone(c)
            numbers[name] = c.prepare(warmup, min_sample)
        samples = {name: [] for name in fns}
        for _ in range(max(1, repeats)):
            for name, c in contenders.items():
                alone(c)
                if settle:
                    time.sleep(settle)
                samples[name].append(c.sample(numbers[name]))
    finally:
        for w in workers:
            w.resume()
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


def _positive_int(text):
    """argparse type: an int >= 1 (a median of zero samples, or of a negative number of them, means nothing).

    Not ``tinyconv.train.positive_int``: importing tinyconv loads the kernels, and this parent process imports none.
    """
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parser(module, description, default_out, default_repeats):
    """The options every benchmark takes: --quick, --case (repeatable), --repeats, --out."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--quick", action="store_true", help="fewer repeats and shapes: a smoke run")
    p.add_argument("--case", action="append", default=[], metavar="TEXT",
                   help="run only the rows whose label contains TEXT (repeatable: a row must contain every TEXT)")
    p.add_argument("--repeats", type=_positive_int, default=None,
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
