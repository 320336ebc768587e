"""Compiling ahead of use: kernels.warmup reaches every public kernel, and tinyconv.precompile fills the on-disk
cache on a pool of processes so that a later process compiles nothing."""
import importlib
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import kernels
from kernels import warmup
from tinyconv import precompile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Public kernel functions that no warm-up entry needs: pure Python, or a kernel another entry compiles.
NOT_JITTED = {"pieces",  # the SGD's layout of parameter pieces, NumPy only
              "sgd_update_unchecked",  # sgd_update without its checks: the same kernel, same signature
              "swaps_weight_product"}  # the 1x1 weight gradient's product order, a comparison

COUNT_COMPILES = """
import sys
from numba.core import event
rec = event.RecordingListener()
event.register("numba:compile", rec)
from kernels import warmup
warmup.run(sys.argv[1:])
print(sum(1 for _, e in rec.buffer if e.is_start))
"""


def _public_kernel_functions():
    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_") or info.name in ("geometry", "warmup"):
            continue
        mod = importlib.import_module(f"kernels.{info.name}")
        names |= {attr for attr, obj in vars(mod).items() if callable(obj) and not attr.startswith("_")
                  and getattr(obj, "__module__", "") == mod.__name__ and not isinstance(obj, type)}
    return names


def test_warmup_calls_every_public_kernel():
    assert _public_kernel_functions() - NOT_JITTED <= set(warmup.names())
    assert [n for n, _ in warmup.calls(np.float64)] == warmup.names()


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="float32 or float64"):
        warmup.calls(np.int32)
    with pytest.raises(ValueError, match="no warm-up entry named"):
        warmup.run(["relu_forward", "nope"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        precompile.precompile(("float16",))
    for jobs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be a positive int"):
            precompile.precompile(jobs=jobs)
    with pytest.raises(ValueError, match="no warm-up entry named"):
        precompile.precompile(names=["nope"])
    proc = subprocess.run([sys.executable, "-m", "tinyconv.precompile", "--jobs", "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--jobs must be a positive int" in proc.stderr


def test_precompile_fills_the_cache_a_fresh_process_then_loads(tmp_path):
    entries = ["relu_forward", "relu6_backward"]  # quick to compile, serial and parallel builds
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def compiles(cache_env):
        proc = subprocess.run([sys.executable, "-c", COUNT_COMPILES, *entries], cwd=REPO, env=cache_env,
                              capture_output=True, text=True, check=True)
        return int(proc.stdout.split()[-1])
    code = ("from tinyconv.precompile import precompile; "
            f"wall, times = precompile(('float32',), jobs=2, names={entries!r}); print(sorted(times))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == str(sorted((n, "float32") for n in entries))
    assert compiles(env) == 0  # everything loaded from what the pool wrote
    assert compiles({**env, "NUMBA_CACHE_DIR": str(tmp_path / "empty")}) > 0  # the count does see compiles


def test_default_pool_is_one_process_per_core_within_a_cap(monkeypatch):
    for cores, want in ((None, 1), (1, 1), (2, 2), (64, precompile.MAX_DEFAULT_JOBS)):
        monkeypatch.setattr(precompile.os, "cpu_count", lambda cores=cores: cores)
        assert precompile.default_jobs() == want
