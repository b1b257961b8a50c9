"""Component configs shared by the models this project builds itself (built-in and toy models), Lightning-free.

No heavy imports here: :mod:`sd.models.builtin` and :mod:`sd.models.toy` both read these,
and neither imports the other at module level.
"""

from __future__ import annotations

from typing import Any

# The SD 1.x scheduler config (as in stable-diffusion-v1-5's scheduler/scheduler_config.json).
SD1_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
    "timestep_spacing": "leading",
}

# A CLIP text encoder that fits the real CLIP tokenizer (49408 tokens, 77 positions).
CLIP_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
