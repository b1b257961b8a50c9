"""Checkpoints that survive crashes and signals, and that load without running code.

:class:`FaultTolerance` (added to every run by ``train.py``) does three things:

- it makes the strategy write checkpoints atomically (a temporary file in the checkpoint's folder, then a rename:
  Lightning's own writer stages them in the system temporary folder, from where a move to another file system is a
  non-atomic copy) and load them with ``torch.load(weights_only=True)`` whatever ``--weights_only`` or
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say;
- on SIGTERM (a cluster scheduler, ``kill``) or a first Ctrl-C it saves ``last.ckpt`` at the end of the current
  training step, then stops with exit status 143 (SIGTERM; Lightning's own exit would be 0, as if the run had
  finished) or 1 (Ctrl-C). A second Ctrl-C stops at once, without saving: the last checkpoint written stays as
  it was;
- a run killed without warning (SIGKILL, a power cut) resumes from its last checkpoint with ``--ckpt_path``.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.run_dir import run_dir
from core.errors import InputNotFoundError
from core.safe_files import atomic_torch_save, safe_torch_load


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local files atomically and always loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            rank_zero_warn("weights_only=False is ignored: checkpoints are always loaded with weights_only=True.")
        if not _is_local_file_protocol(path):
            return pl_load(path, map_location=map_location, weights_only=True)
        if not Path(path).is_file():
            raise InputNotFoundError(f"Checkpoint file not found: {path}")
        return safe_torch_load(path, map_location=map_location)


def install_safe_checkpoint_io(strategy: Any) -> bool:
    """Put :class:`SafeCheckpointIO` in place of the strategy's plain ``TorchCheckpointIO``; True when in place."""
    io = strategy.checkpoint_io
    if isinstance(io, SafeCheckpointIO):
        return True
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
        return True
    if isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:  # e.g. async saving
        io.checkpoint_io = SafeCheckpointIO()
        return True
    return False


class FaultTolerance(pl.Callback):
    """Atomic, code-free checkpoints, and a last checkpoint saved on SIGTERM or Ctrl-C before the run stops.

    Args:
        save_on_signal: On SIGTERM or a first Ctrl-C, save ``last.ckpt`` at the end of the current training step
            and stop (a second Ctrl-C stops at once, without saving).
        dirpath: Folder of that checkpoint; defaults to the ``ModelCheckpoint``'s folder, else
            ``<run directory>/checkpoints``.
    """

    def __init__(self, save_on_signal: bool = True, dirpath: str | None = None) -> None:
        self.save_on_signal = save_on_signal
        self.dirpath = dirpath
        self.interrupted = False  # a first Ctrl-C was received
        self.saved_on_signal: Path | None = None
        self._saved_step: int | None = None  # global step of the last checkpoint saved on a signal
        self._previous_sigint: Any = None

    # -------------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not install_safe_checkpoint_io(trainer.strategy):
            rank_zero_warn(
                f"{type(trainer.strategy.checkpoint_io).__name__} is a custom CheckpointIO: atomic checkpoint writes "
                "and weights_only loading are up to it."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.interrupted = False
        if self.save_on_signal and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        print(
            "\nCtrl-C: saving a checkpoint at the end of this training step, then stopping. "
            "Press Ctrl-C again to stop at once, without saving.",
            file=sys.stderr,
            flush=True,
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    # -------------------------------------------------------------------------------------------------- stopping
    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint saved on a signal goes: ``last.ckpt`` beside the run's other checkpoints."""
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        if self.dirpath:
            return Path(self.dirpath) / name
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / name
        return run_dir(trainer) / "checkpoints" / name

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.save_on_signal:
            return
        requested = trainer.received_sigterm or self.interrupted
        if trainer.world_size > 1:  # every rank must take part in the save
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self._save(trainer)
        if not trainer.received_sigterm:  # Ctrl-C: Lightning's graceful shutdown (exit status 1)
            raise KeyboardInterrupt
        # SIGTERM: Lightning itself stops the run at the end of this batch (SIGTERMException, see on_exception).

    def _save(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_on_signal, self._saved_step = path, trainer.global_step
        rank_zero_info(f"Saved a checkpoint at step {trainer.global_step} to {path}; resume with --ckpt_path {path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        # SIGTERM after this callback's on_train_batch_end (e.g. while a ModelCheckpoint wrote): save now, at the
        # end of the same step, which Lightning resumes from as well.
        if self.save_on_signal and trainer.training and self._saved_step != trainer.global_step:
            self._save(trainer)
        if exception.code in (None, 0):
            exception.code = 128 + signal.SIGTERM  # the shell's status for a run ended by SIGTERM: not "finished"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
