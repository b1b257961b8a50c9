"""The preprocessing open_clip attaches to a model, for CLIP models built by hand (tiny and toy encoders).

A module of its own so that the toy world's builders (:mod:`lightning_modules.toy_models`) and the metric encoders
(:mod:`metrics.encoders`, which loads the toy models) both use it without importing each other.
"""

from __future__ import annotations

from torch import nn


def attach_clip_preprocess(model: nn.Module) -> nn.Module:
    """Attach what ``open_clip.create_model`` would to a model built by hand: bicubic resize of the shorter side to
    the model's image size, CLIP mean / std (read back by :class:`ClipEncoder`)."""
    import open_clip

    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": model.visual.image_size,
            "mode": "RGB",
            "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    )
    return model
