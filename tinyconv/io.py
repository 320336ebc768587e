"""Atomic file writes (a kill at any moment leaves the old file or the new one, never half of one) and checked
loading of saved arrays into live ones."""
import os
import tempfile

import numpy as np


def atomic_write(path, write):
    """Write a file atomically.

    ``write(f)`` fills an open binary temporary file in the destination's folder; the file is flushed, fsynced
    and renamed over ``path`` (atomic on POSIX), then the folder is fsynced so the rename itself survives a crash.
    If ``write`` raises, the temporary file is removed and ``path`` is untouched.

    Args:
        path: destination file.
        write: callable taking a binary file object.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def copy_state(targets, state, *, what, error=ValueError):
    """Copy saved arrays into live ones after checking that they fit, all or nothing.

    Args:
        targets: ``{name: array}`` to fill in place.
        state: ``{name: array-like}`` as saved.
        what: what the state belongs to, for messages (``"model 'small'"``, ``"the sgd optimizer"``).
        error: exception class to raise.

    Raises:
        error: listing the missing and unexpected names, the mis-shaped entries, or an entry with NaN or Inf;
        nothing is copied then.
    """
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise error(f"state does not match {what}: missing {missing or 'none'}; unexpected {unexpected or 'none'}")
    wrong = [f"{n}: saved {np.shape(state[n])}, expected {dst.shape}"
             for n, dst in targets.items() if np.shape(state[n]) != dst.shape]
    if wrong:
        raise error(f"state does not match {what}: wrong shapes: {'; '.join(wrong)}")
    values = {n: np.asarray(state[n]) for n in targets}
    for n, value in values.items():
        if not np.isfinite(value).all():
            raise error(f"state entry {n} contains NaN or Inf")
    for n, dst in targets.items():
        dst[...] = values[n]
