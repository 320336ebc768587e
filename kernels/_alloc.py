"""glibc's allocator, told to keep freed memory for the next training step instead of handing it back to the OS.

Every kernel wrapper allocates its output (``np.empty``), so a training step allocates and frees the same few
hundred MiB of activations and gradients each time. glibc serves large blocks with a fresh ``mmap`` and unmaps
them on ``free`` (from 128 KiB; it raises that threshold to the largest block freed so far, but never past
32 MiB) and returns free memory at the top of its heap to the OS beyond twice the threshold; the next step then
page-faults those pages back in and the kernel zeroes them, work of the same order as a kernel's own pass over
the array. With the mmap threshold at 1 GiB and the trim threshold at 2 GiB, blocks come from the heap and freed
ones are reused as they are; the process keeps its peak resident size between steps, which it reaches anyway.
Measured on the 2-core machine, training steps in a fresh process each, kept / glibc's default, three
alternating pairs, medians of 15 steps:
    MobileNet 1.0 res 128 batch 32:     227-240 / 266-313 ms
    MobileNet 0.5 res 128 batch 32:     101-103 / 142-172 ms
    Fashion-MNIST 0.5 res 32 batch 128:  31-35 / 31-35 ms (its largest array is 4 MiB: glibc's own threshold
                                         adapts to it after the first step; a 2-epoch run took 30.6 s either way)
This is ``mallopt``, the call behind glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
variables: it takes effect whenever it is called. A user who set any of glibc's malloc variables (or
``GLIBC_TUNABLES`` for malloc) keeps them; ``TINYCONV_KEEP_FREED_MEMORY=0`` leaves the allocator as it is.
"""
import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap (every activation of the networks here)
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the top of the heap kept up to 2 GiB (mallopt takes a C int)

_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                   "MALLOC_ARENA_MAX")

status = "not set"
"""What :func:`keep_freed_memory` did at import: 'set', or why it left the allocator alone."""


def _glibc():
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):  # not a glibc system (macOS, Windows, musl)
        return False
    return bool(version) and version.startswith("glibc")


def reason_to_skip(environ):
    """Why the allocator must be left as it is under ``environ`` (a mapping), or None to go ahead."""
    if environ.get("TINYCONV_KEEP_FREED_MEMORY", "1") == "0":
        return "off (TINYCONV_KEEP_FREED_MEMORY=0)"
    user = [k for k in _USER_VARIABLES if k in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"left to the user ({', '.join(user)} set)"
    if not _glibc():
        return "not glibc"
    return None


def keep_freed_memory(environ=None):
    """Raise glibc's mmap and trim thresholds (see the module docstring) unless the user decided otherwise.

    Args:
        environ: the environment to consult (default ``os.environ``).

    Returns:
        'set', or the reason nothing was changed.
    """
    global status
    skip = reason_to_skip(os.environ if environ is None else environ)
    if skip is not None:
        status = skip
        return status
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    status = "set" if ok else "glibc refused mallopt"
    return status
