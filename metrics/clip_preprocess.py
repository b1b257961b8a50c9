"""The preprocessing open_clip attaches to a model, for CLIP models built by hand (tiny and toy encoders).

Used by the tiny and toy encoders of :mod:`metrics.encoders`; a module of its own, with no imports from the project.
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
