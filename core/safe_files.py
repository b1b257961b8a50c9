"""Writing files atomically and loading checkpoints without running code, Lightning-free.

- :func:`atomic_write` / :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_torch_save`: write to a
  hidden temporary file in the target's own folder, flush it to disk, then rename it over the target
  (:func:`atomic_directory` likewise for a folder). Each file and folder gets the mode an ordinary ``open()`` /
  ``mkdir()`` gives it (the umask decides), not the private one of ``mkstemp`` / ``mkdtemp``. A crash at any moment
  leaves either the previous file or the new one, complete, never a mix; the temporary file is in the same file
  system, so the rename is atomic (a temporary file elsewhere, e.g. in /tmp, would have to be copied, which is not).
- :func:`safe_torch_load`: ``torch.load(weights_only=True)``, always, whatever the caller or the environment
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) asks: a checkpoint is a user-supplied file, and unpickling one with
  ``weights_only=False`` can run any code it carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from core.errors import UserInputError


class UnsafeCheckpointError(UserInputError, pickle.UnpicklingError):
    """A checkpoint holds objects that only an unrestricted (code-executing) unpickler could load."""


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask): what every file the project writes gets."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``mkdir()`` gives a new folder (0o777 less the umask); ``mkdtemp`` makes private ones (0o700)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the name of a hidden temporary file beside ``path``, for writers that take a file name; when the block
    ends without an exception the file is flushed to disk and replaces ``path`` in one rename.

    On an exception (or a crash) ``path`` keeps its previous content; the temporary file is removed (after a
    SIGKILL a hidden ``.<name>.*.tmp`` file may remain; it is never read). The file gets the mode an ordinary
    ``open()`` would give it (:func:`file_mode`; ``mkstemp`` makes it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary file for writing (binary) beside ``path``; on success it replaces ``path`` in one rename
    (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def give_ordinary_modes(folder: str | Path) -> None:
    """Give ``folder`` and everything in it the modes ``mkdir()`` / ``open()`` give (:func:`folder_mode`,
    :func:`file_mode`): ``mkdtemp`` makes private folders, and some writers private files (safetensors' ``save_file``
    writes 0600)."""
    folder = Path(folder)
    files, folders = file_mode(), folder_mode()
    os.chmod(folder, folders)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, folders)
        for name in names:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, files | (stat.S_IMODE(path.stat().st_mode) & 0o111 & folders))  # keep execute bits


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    A crash or an exception leaves ``target`` as it was: an earlier good folder (an export, a built model) is never
    replaced by a partial one. The folder and what it holds get the modes of ordinary ones
    (:func:`give_ordinary_modes`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        give_ordinary_modes(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def safe_torch_load(path: str | Path | IO[bytes], map_location: Any = None, mmap: bool = False) -> Any:
    """Load a ``torch.save`` file with the restricted unpickler (tensors, containers, numbers and strings only).

    Raises:
        UnsafeCheckpointError: the file holds other objects (a crafted or foreign file); nothing in it was run.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {str(path)!r}: it holds objects that only an unrestricted unpickler could load, and "
            "unpickling those can run arbitrary code. Checkpoints written by this trainer hold only tensors, numbers "
            "and strings; this file was made by other code, or crafted. Nothing in it was run. "
            f"(torch: {str(e).splitlines()[0]})"
        ) from e
