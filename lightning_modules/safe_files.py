"""Writing files atomically and loading checkpoints without running code, Lightning-free.

- :func:`atomic_write` / :func:`atomic_torch_save`: write to a hidden temporary file in the target's own folder,
  flush it to disk, then rename it over the target. A crash at any moment leaves either the previous file or the new
  one, complete, never a mix; the temporary file is in the same file system, so the rename is atomic (a temporary
  file elsewhere, e.g. in /tmp, would have to be copied, which is not).
- :func:`safe_torch_load`: ``torch.load(weights_only=True)``, always, whatever the caller or the environment
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) asks: a checkpoint is a user-supplied file, and unpickling one with
  ``weights_only=False`` can run any code it carries.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that only an unrestricted (code-executing) unpickler could load."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Open a temporary file for writing beside ``path``; on success it replaces ``path`` in one rename.

    On an exception (or a crash) ``path`` keeps its previous content; the temporary file is removed (after a
    SIGKILL a hidden ``.<name>.*.tmp`` file may remain; it is never read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def safe_torch_load(path: str | Path | IO[bytes], map_location: Any = None) -> Any:
    """Load a ``torch.save`` file with the restricted unpickler (tensors, containers, numbers and strings only).

    Raises:
        UnsafeCheckpointError: the file holds other objects (a crafted or foreign file); nothing in it was run.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {str(path)!r}: it holds objects that only an unrestricted unpickler could load, and "
            "unpickling those can run arbitrary code. Checkpoints written by this trainer hold only tensors, numbers "
            "and strings; this file was made by other code, or crafted. Nothing in it was run. "
            f"(torch: {str(e).splitlines()[0]})"
        ) from e
