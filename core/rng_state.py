"""Saving and restoring the random number generators, so that a resumed run draws what an uninterrupted one would.

The training step draws its noise, timesteps and VAE latent samples from torch's global generators (CPU and, on a
GPU, CUDA); data augmentation has its own per-item seeds (datamodules/resumable.py). A checkpoint stores these states
and a resumed run restores them just before training continues. All values are tensors, lists and ints, so a
checkpoint holding them still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """The current states of torch (CPU, and every initialised CUDA device), Python's ``random`` and numpy."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators to ``states`` (from :func:`capture_rng_states`); parts that are absent are left alone."""
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"][: torch.cuda.device_count()]
        for device, state in enumerate(cuda_states):
            torch.cuda.set_rng_state(state.cpu(), device)


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator seeded with ``seed``, and put the generator back as it was afterwards.

    Only the CPU generator is touched. ``torch.manual_seed`` would also reseed every CUDA (and MPS, XPU) generator,
    which ``fork_rng(devices=[])`` does not restore: a per-item seed would then decide the training noise on a GPU.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
