"""DreamBench subject metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) and the frozen encoders they use."""

from metrics.encoders import (
    ClipEncoder,
    DinoEncoder,
    ImageEncoder,
    TextEncoder,
    load_clip,
    load_dino,
)
from metrics.subject import (
    Diversity,
    PreservationScore,
    PromptFidelity,
    SubjectFidelity,
    build_lpips,
    strip_identifier,
)

__all__ = [
    "ClipEncoder",
    "DinoEncoder",
    "Diversity",
    "ImageEncoder",
    "PreservationScore",
    "PromptFidelity",
    "SubjectFidelity",
    "TextEncoder",
    "build_lpips",
    "load_clip",
    "load_dino",
    "strip_identifier",
]
