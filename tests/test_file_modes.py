"""Everything a run writes gets the permissions an ordinary file or folder gets (the umask decides), so that others
on a shared machine or a shared results folder can read the exports, grids and checkpoints as they read the rest.

``mkstemp`` / ``mkdtemp``, which atomic writes go through, make private files (0600) and folders (0700); each
atomic write sets the ordinary mode before it renames into place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from callbacks.grid import save_png_atomic
from callbacks.run_dir import run_dir
from core.safe_files import atomic_directory, atomic_torch_save, atomic_write_text
from sd.render.infotext import save_png
from train import cli_main

UMASK = 0o002  # a shared machine's: group members may read and write


@pytest.fixture
def shared_umask():
    old = os.umask(UMASK)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): _mode(p) for p in [folder, *folder.rglob("*")] if not p.is_symlink()}


def test_atomic_writes_get_ordinary_modes(tmp_path, shared_umask):
    image = Image.new("RGB", (4, 4))
    save_png_atomic(image, tmp_path / "grid.png")
    save_png(image, tmp_path / "render.png", {"parameters": "a photo"})
    atomic_write_text(tmp_path / "report.json", "{}")
    atomic_torch_save({"x": 1}, tmp_path / "last.ckpt")
    with atomic_directory(tmp_path / "export") as folder:
        (folder / "weights.safetensors").write_bytes(b"")
    modes = {name: _mode(tmp_path / name) for name in ("grid.png", "render.png", "report.json", "last.ckpt")}
    assert modes == dict.fromkeys(modes, 0o664)
    assert _mode(tmp_path / "export") == 0o775


def test_run_directory_is_readable_by_the_group(run_args, shared_umask):
    cli = cli_main(run_args("--trainer.val_check_interval=1", steps=1))
    folder = run_dir(cli.trainer)
    modes = _modes_under(folder)
    assert "export" in modes and any(name.startswith("grids/") for name in modes), sorted(modes)
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o775 if (folder / name).is_dir() else 0o664)}
    assert not wrong, wrong
