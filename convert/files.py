"""The one atomic file writer: every file the project writes (weights files, images, figures, benchmark results,
downloaded MNIST) goes through it, so a crash or a full disk never leaves a half-written file in place of a
good one. Checkpoint directories are swapped whole by convert.checkpoint.save, which uses it for none of its
files but follows the same rule for the directory."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError, quote


def _discard(tmp: Path):
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # the folder itself is unusable: nothing was written there
        pass


def atomic_write(path, write, *, binary_file: bool = False, make_parents: bool = True) -> Path:
    """write(tmp) fills a temporary sibling of `path` (a path, or with binary_file=True an open binary file),
    which is fsynced and renamed over `path`. Temporaries of killed writers are removed first. make_parents=False
    refuses a path whose folder does not exist (a typo in it should not create folders)."""
    from .checkpoint import _fsync_dir, remove_stale

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, path.name, "tmp")
        if binary_file:
            with open(tmp, "wb") as f:
                write(f)
        else:
            write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _discard(tmp)
        raise UserError(f"cannot write {quote(path)}: {e.strerror or e} -- choose a writable location") from None
    except BaseException:
        _discard(tmp)
        raise
    return path
