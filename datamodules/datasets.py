"""The DreamBooth dataset (instance images, and class images for prior preservation) and its collate function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from datamodules.batch import DreamBoothBatch
from datamodules.captions import vary_caption
from datamodules.images import load_image

# One item: the instance image with its prompt and, only when the dataset has class images, a class image
# with its prompt. Pixels are (3, resolution, resolution) float32 in [-1, 1].
DreamBoothExample = TypedDict(
    "DreamBoothExample", {"instance": tuple[Tensor, str], "class": tuple[Tensor, str]}, total=False
)


def image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> transforms.Compose:
    """PIL RGB image -> (3, resolution, resolution) float32 tensor in [-1, 1].

    The shorter side is resized to ``resolution`` (bilinear, antialiased), then a center or random square crop
    is taken, optionally flipped horizontally with probability 0.5.
    """
    steps = _resize_and_crop(resolution, center_crop)
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip(p=0.5))
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]  # [0, 1] -> [-1, 1]
    return transforms.Compose(steps)


def _resize_and_crop(resolution: int, center_crop: bool) -> list:
    return [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]


def as_trained(image: Image.Image, resolution: int) -> Image.Image:
    """A photo as training sees it, for people to look at: the shorter side resized to ``resolution`` and the center
    square cropped, the steps of :func:`image_transform`. A random crop or flip varies around this view; here no
    random number is drawn, so showing the photos changes nothing in training."""
    return transforms.Compose(_resize_and_crop(resolution, center_crop=True))(image)


class DreamBoothDataset(Dataset):
    """Instance images paired with the instance prompt, and optionally class images with the class prompt.

    With class images the length is ``max(#instance, #class)`` and item ``i`` pairs instance image
    ``i % #instance`` with class image ``i % #class``, so one pass shows every image of both sets.
    Images are loaded from disk on each access (no cache), in RGB, through :func:`load_image`.

    Args:
        instance_images: Paths of the subject's images.
        instance_prompt: Caption of every instance image, with the identifier (``"a photo of sks dog"``).
        resolution: Side of the square training images, in pixels.
        class_images: Paths of the class (prior-preservation) images; ``None`` for none.
        class_prompt: Caption of every class image (``"a photo of dog"``); required with ``class_images``.
        center_crop: Center crop after resizing; otherwise a random crop.
        random_flip: Flip images horizontally with probability 0.5.
        instance_captions: Per instance image, its own caption (placeholders filled), or None to use the instance
            prompt; ``None`` for none at all.
        caption_dropout: Probability that an instance row trains on the empty prompt.
        shuffle_tags: Shuffle the comma-separated tags of each instance row's caption (after the first ``keep_tags``).
        keep_tags: Leading tags that stay in place when shuffling.
    """

    def __init__(
        self,
        instance_images: Sequence[str | Path],
        instance_prompt: str,
        resolution: int,
        class_images: Sequence[str | Path] | None = None,
        class_prompt: str | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        instance_captions: Sequence[str | None] | None = None,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
    ) -> None:
        if not instance_images:
            raise ValueError("DreamBoothDataset: no instance images given.")
        if resolution <= 0:
            raise ValueError(f"DreamBoothDataset: resolution must be positive, got {resolution}.")
        if class_images is not None:
            if not class_images:
                raise ValueError("DreamBoothDataset: class_images is an empty list; pass None for no class images.")
            if class_prompt is None:
                raise ValueError("DreamBoothDataset: class_images need a class_prompt.")
        self.instance_images = [Path(p) for p in instance_images]
        self.instance_prompt = instance_prompt
        if instance_captions is not None and len(instance_captions) != len(self.instance_images):
            raise ValueError("DreamBoothDataset: instance_captions must give one entry per instance image.")
        self.instance_captions = list(instance_captions) if instance_captions is not None else None
        self.caption_dropout, self.shuffle_tags, self.keep_tags = caption_dropout, shuffle_tags, keep_tags
        self.class_images = [Path(p) for p in class_images] if class_images is not None else None
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.transform = image_transform(resolution, center_crop, random_flip)

    def __len__(self) -> int:
        if self.class_images is None:
            return len(self.instance_images)
        return max(len(self.instance_images), len(self.class_images))

    def _pixels(self, path: Path) -> Tensor:
        return self.transform(load_image(path))  # (3, resolution, resolution)

    def base_caption(self, image_index: int) -> str:
        """Instance image ``image_index``'s own caption, else the instance prompt."""
        own = self.instance_captions[image_index] if self.instance_captions is not None else None
        return own if own is not None else self.instance_prompt

    def instance_caption(self, image_index: int) -> str:
        """The caption this access trains instance image ``image_index`` on (tags shuffled, dropped out); call it
        after the item's image draws, so that turning these options on leaves crops and flips as they were."""
        return vary_caption(self.base_caption(image_index), self.shuffle_tags, self.keep_tags, self.caption_dropout)

    def training_prompts(self) -> list[str] | None:
        """Every prompt a row can train on (what the text-embedding cache holds), or None when there are too many
        to list (shuffled tags)."""
        if self.shuffle_tags:
            return None
        prompts = [self.base_caption(i) for i in range(len(self.instance_images))]
        prompts += [""] if self.caption_dropout > 0 else []
        return prompts + ([self.class_prompt] if self.class_images else [])

    def pair_indices(self, index: int) -> tuple[int, int | None]:
        """Item ``index`` -> (instance image index, class image index or None)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return index % len(self.instance_images), None if self.class_images is None else index % len(self.class_images)

    def __getitem__(self, index: int) -> DreamBoothExample:
        i, c = self.pair_indices(index)
        pixels = self._pixels(self.instance_images[i])
        class_pixels = self._pixels(self.class_images[c]) if c is not None else None
        example: DreamBoothExample = {"instance": (pixels, self.instance_caption(i))}  # the caption's draws come last
        if class_pixels is not None:
            example["class"] = (class_pixels, self.class_prompt)
        return example


def collate_dreambooth(examples: Sequence[DreamBoothExample]) -> DreamBoothBatch:
    """Stack examples into a :class:`DreamBoothBatch`: all instance rows first, then all class rows.

    ``is_prior`` marks the class rows; the module reads the mask, not the order.
    """
    pixels = [ex["instance"][0] for ex in examples]
    prompts = [ex["instance"][1] for ex in examples]
    is_prior = [False] * len(examples)
    for ex in examples:
        if "class" in ex:
            pixels.append(ex["class"][0])
            prompts.append(ex["class"][1])
            is_prior.append(True)
    pixel_values = torch.stack(pixels).to(memory_format=torch.contiguous_format).float()  # (B, 3, H, W)
    return DreamBoothBatch(
        pixel_values=pixel_values,
        prompts=prompts,  # (B,)
        is_prior=torch.tensor(is_prior, dtype=torch.bool),  # (B,)
    )
