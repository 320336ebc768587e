"""Atomic file writes: a kill at any moment leaves either the old file or the new one, never half of one."""
import os
import tempfile


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
