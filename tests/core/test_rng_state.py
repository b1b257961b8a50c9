"""RNG states: captured, restored, and loadable with weights_only=True."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from core.rng_state import capture_rng_states, restore_rng_states


def _draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_restoring_repeats_the_draws_and_survives_a_weights_only_round_trip():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    buffer = io.BytesIO()
    torch.save({"rng_states": capture_rng_states()}, buffer)
    expected = _draws()
    _draws()
    buffer.seek(0)
    restore_rng_states(torch.load(buffer, weights_only=True)["rng_states"])
    assert _draws() == expected
