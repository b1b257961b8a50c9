"""Frozen image / text encoders for the DreamBench metrics, behind two small interfaces.

- :class:`ImageEncoder`: ``encoder(images) -> (N, D)`` L2-normalized embeddings from RGB float images in
  [0, 1], shape (N, 3, H, W), any H, W; each encoder does its own resize / crop / normalization.
- :class:`TextEncoder`: ``encoder.encode_text(prompts) -> (N, D)`` L2-normalized embeddings.

Real encoders load by hub id (DINO, through transformers) or open_clip model name + pretrained tag (CLIP).
Offline, ``builtin:tiny-dino`` and ``builtin:tiny-clip`` build tiny randomly initialized (fixed seed) models
from configs through the same loaders, so tests exercise the code real runs use; their numbers mean nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from core.errors import ConfigError
from core.rng_state import cpu_seeded
from metrics.clip_preprocess import attach_clip_preprocess
from sd.models.toy import TOY_RESOLUTION, load_weights

BUILTIN_PREFIX = "builtin:"
TINY_DINO = "builtin:tiny-dino"
TINY_CLIP = "builtin:tiny-clip"
TOY_DINO = "builtin:toy-dino"  # trained on the toy world (scripts/pretrain_toy.py)
TOY_CLIP = "builtin:toy-clip"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BUILTIN_SEED = 0


def check_images(images: Tensor) -> None:
    """Raise a ValueError unless ``images`` is a float batch (N, 3, H, W) with values in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    # One host sync per batch; catches the common slip of passing [-1, 1] decoder output.
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"expected images in [0, 1], got values in [{images.min().item():.3f}, {images.max().item():.3f}]"
        )


def resize_crop_normalize(
    images: Tensor,
    resize: int | tuple[int, int],
    crop: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    mode: str = "shortest",
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> Tensor:
    """Resize (antialiased), center crop and normalize a batch of [0, 1] images; returns (N, 3, *crop).

    Args:
        images: (N, 3, H, W) float in [0, 1].
        resize: ``shortest``: target of the shorter side (int) or a (h, w) box to cover; ``squash``: (h, w) or side;
            ``longest``: target of the longer side (int) or a (h, w) box to fit in (then zero-padded by the crop).
        crop: (h, w) of the center crop (pads with zeros when larger than the resized image).
        mean: per-channel mean for normalization.
        std: per-channel std for normalization.
        mode: ``shortest`` / ``squash`` / ``longest``, as open_clip names its resize modes.
        interpolation: resize interpolation.
    """
    h, w = images.shape[-2:]
    if mode == "squash":
        size = [resize, resize] if isinstance(resize, int) else list(resize)
    elif mode in ("shortest", "longest"):
        th, tw = (resize, resize) if isinstance(resize, int) else resize
        scale = max(th / h, tw / w) if mode == "shortest" else min(th / h, tw / w)
        if isinstance(resize, int) and mode == "shortest":
            size = [resize]  # torchvision's own shorter-side rule, as in the reference pipelines
        else:
            size = [max(1, round(h * scale)), max(1, round(w * scale))]
    else:
        raise ValueError(f"unknown resize mode {mode!r}; expected shortest, squash or longest")
    images = TF.resize(images, size, interpolation=interpolation, antialias=True)
    # Bicubic overshoots; PIL-based reference pipelines clamp to the pixel range, so do the same.
    images = TF.center_crop(images.clamp(0.0, 1.0), list(crop))
    return TF.normalize(images, list(mean), list(std))


class ImageEncoder(nn.Module):
    """Base of frozen image encoders: ``forward(images (N, 3, H, W) in [0, 1]) -> (N, D)`` unit-norm embeddings.

    Subclasses set ``name`` (what a report names the encoder by) and ``embed_dim``, and implement
    ``preprocess`` and ``embed`` (raw features of preprocessed images). The module is always in eval mode
    with ``requires_grad`` False, whatever ``.train()`` is called with.
    """

    name: str
    embed_dim: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        """Stay in eval mode: the encoders are fixed measuring instruments."""
        return super().train(False)

    def _param(self) -> Tensor:
        return next(self.parameters())

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> model input (N, 3, h, w)."""
        raise NotImplementedError

    def embed(self, pixels: Tensor) -> Tensor:
        """Preprocessed (N, 3, h, w) -> unnormalized features (N, D)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Embed RGB images (N, 3, H, W) in [0, 1]; returns float32 unit-norm embeddings (N, D) on the model's device."""
        check_images(images)
        p = self._param()
        pixels = self.preprocess(images.to(device=p.device, dtype=torch.float32)).to(p.dtype)
        return nn.functional.normalize(self.embed(pixels).float(), dim=-1)


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that embeds prompts: ``encode_text(prompts) -> (N, D)`` unit-norm embeddings."""

    name: str

    def encode_text(self, prompts: list[str]) -> Tensor: ...


class DinoEncoder(ImageEncoder):
    """DINO ViT image encoder: the CLS token of the last hidden state (DreamBench's DINO metric).

    Preprocessing follows the protocol: shorter side to 256 (bicubic, antialiased), center crop 224,
    ImageNet mean / std.
    """

    def __init__(self, model: nn.Module, name: str, resize: int = 256, crop: int = 224) -> None:
        """Args:
        model: a transformers ``ViTModel`` (no pooling layer needed).
        name: what reports call this encoder (the hub id, or ``builtin:tiny-dino``).
        resize: shorter-side size before cropping, in pixels.
        crop: center-crop size, in pixels; must match the model's ``image_size``.
        """
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.config.hidden_size
        self.resize, self.crop = resize, crop
        self._freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        return resize_crop_normalize(images, self.resize, (self.crop, self.crop), IMAGENET_MEAN, IMAGENET_STD)

    def embed(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # (N, D) CLS token


class ClipEncoder(ImageEncoder):
    """open_clip CLIP model: image embeddings (CLIP-I) and text embeddings (CLIP-T).

    Image preprocessing (size, resize mode, interpolation, mean, std) is read from the model's
    ``visual.preprocess_cfg``, which open_clip sets from the model config and pretrained tag.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str) -> None:
        """Args:
        model: an ``open_clip.CLIP`` (or any open_clip model with ``encode_image`` / ``encode_text``).
        tokenizer: callable ``list[str] -> LongTensor (N, context_length)``, e.g. ``open_clip.get_tokenizer(...)``.
        name: what reports call this encoder, e.g. ``open_clip:ViT-B-32/openai``.
        """
        import open_clip  # imported when a CLIP encoder is made: it brings timm (~70 MB resident)

        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode: str = cfg.get("resize_mode", "shortest")
        interp = cfg.get("interpolation", "bicubic")
        self.interpolation = InterpolationMode.BILINEAR if interp == "bilinear" else InterpolationMode.BICUBIC
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.embed_dim = int(getattr(model.visual, "output_dim", -1))
        self._freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        h, w = self.image_size
        # A square target in "shortest" mode resizes the shorter side (torchvision's rule); otherwise cover / fit a box.
        resize = h if h == w and self.resize_mode == "shortest" else self.image_size
        return resize_crop_normalize(
            images, resize, self.image_size, self.mean, self.std, self.resize_mode, self.interpolation
        )

    def embed(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Embed prompts; returns float32 unit-norm embeddings (N, D) on the model's device."""
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompts, not a single string")
        tokens = self.tokenizer(list(prompts)).to(self._param().device)  # (N, context_length)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _seeded(build, seed: int = _BUILTIN_SEED):
    """Run ``build()`` under a fixed seed without touching the caller's RNG state."""
    with cpu_seeded(seed):
        return build()


def _tiny_dino() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        image_size=224,
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False))


def _tiny_clip() -> nn.Module:
    import open_clip

    vision_cfg = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    return attach_clip_preprocess(
        _seeded(lambda: open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg))
    )


# The toy world's encoders (builtin:toy-clip, builtin:toy-dino): built here, their weights pretrained by
# scripts/pretrain_toy.py and loaded from models/toy-world-v1 (sd.models.toy.load_weights).
def build_toy_clip(seed: int = 0) -> nn.Module:
    """An open_clip ``CLIP`` for 32 px images with the preprocessing the metric reads (bicubic, CLIP mean / std)."""
    import open_clip

    vision_cfg = {"image_size": TOY_RESOLUTION, "layers": 3, "width": 64, "patch_size": 8}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
    return attach_clip_preprocess(
        _seeded(lambda: open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg), seed + 3)
    )


def build_toy_dino(seed: int = 0) -> nn.Module:
    """A small ``ViTModel`` for 32 px images (patch 4), read through its CLS token like DINO."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        patch_size=4,
        image_size=TOY_RESOLUTION,
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False), seed + 4)


def load_dino(name: str = "facebook/dino-vits16") -> DinoEncoder:
    """Load a DINO ViT encoder.

    Args:
        name: a hub id or local folder that ``transformers.ViTModel.from_pretrained`` accepts
            (``facebook/dino-vits16`` is the protocol's ViT-S/16), or ``builtin:tiny-dino`` (offline, random).
    """
    if name == TINY_DINO:
        model = _tiny_dino()
    elif name == TOY_DINO:
        model = load_weights(build_toy_dino(), "toy_dino")
        return DinoEncoder(model, name=name, resize=TOY_RESOLUTION, crop=TOY_RESOLUTION)
    elif name.startswith(BUILTIN_PREFIX):
        raise ConfigError(f"unknown built-in DINO encoder {name!r}; available: {TINY_DINO}, {TOY_DINO}")
    else:
        from transformers import ViTModel

        model = ViTModel.from_pretrained(name, add_pooling_layer=False)
    return DinoEncoder(model, name=name)


def load_clip(name: str = "ViT-B-32", pretrained: str | None = "openai") -> ClipEncoder:
    """Load an open_clip encoder for CLIP-I and CLIP-T.

    Args:
        name: an open_clip model name (``ViT-B-32``, ``ViT-L-14``, ``hf-hub:...``) or ``builtin:tiny-clip``
            (offline, random).
        pretrained: open_clip pretrained tag or checkpoint path (ignored for ``builtin:`` and ``hf-hub:`` names).
            ``None`` gives random weights: only useful to check shapes.
    """
    import open_clip

    if name == TINY_CLIP:
        return ClipEncoder(_tiny_clip(), open_clip.SimpleTokenizer(context_length=77), name=name)
    if name == TOY_CLIP:
        model = load_weights(build_toy_clip(), "toy_clip")
        return ClipEncoder(model, open_clip.SimpleTokenizer(context_length=77), name=name)
    if name.startswith(BUILTIN_PREFIX):
        raise ConfigError(f"unknown built-in CLIP encoder {name!r}; available: {TINY_CLIP}, {TOY_CLIP}")
    model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=pretrained is not None)
    label = f"open_clip:{name}" + (f"/{pretrained}" if pretrained and not name.startswith("hf-hub:") else "")
    return ClipEncoder(model, open_clip.get_tokenizer(name), name=label)
