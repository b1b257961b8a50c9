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
from datamodules.masks import load_mask

# One item: the instance image with its prompt and, only when the dataset has class images, a class image
# with its prompt. Pixels are (3, resolution, resolution) float32 in [-1, 1].
# Each row's geometry: (4,) long, the photo's (height, width) as read and (top, left) of its crop in the resized photo.
DreamBoothExample = TypedDict(
    "DreamBoothExample",
    {
        "instance": tuple[Tensor, str],
        "class": tuple[Tensor, str],
        "instance_mask": Tensor,  # (1, H, W)
        "instance_geometry": Tensor,
        "class_geometry": Tensor,
    },
    total=False,
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


def mask_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> transforms.Compose:
    """Grayscale mask -> (1, resolution, resolution) float32 in [0, 1], by the geometric steps of
    :func:`image_transform` (run under the same random state as its photo, it gets the same crop and flip)."""
    steps = _resize_and_crop(resolution, center_crop)
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip(p=0.5))
    return transforms.Compose([*steps, transforms.ToTensor()])


def _resize_and_crop(resolution: int, center_crop: bool) -> list:
    return [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]


def crop_geometry(
    size: tuple[int, int], resolution: int, center_crop: bool = True, rng_before: Tensor | None = None
) -> Tensor:
    """(4,) long: a photo's (height, width) as read and (top, left) of its crop in the photo resized by
    :func:`image_transform` (what SDXL's ``time_ids`` hold).

    Args:
        size: (width, height) of the photo, as PIL gives it.
        rng_before: With a random crop, the CPU random state from before the transform ran: the crop's draws are
            replayed from it (and the state after is restored), so nothing the transform drew changes.
    """
    width, height = size
    # torchvision's Resize(int): the shorter side to ``resolution``, the longer scaled and truncated
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_h, new_w = resolution, int(resolution * width / height)
    if center_crop or rng_before is None:
        top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    else:
        after = torch.get_rng_state()
        torch.set_rng_state(rng_before)
        top, left, _, _ = transforms.RandomCrop.get_params(torch.empty(0, new_h, new_w), (resolution, resolution))
        torch.set_rng_state(after)
    return torch.tensor([height, width, top, left], dtype=torch.long)


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
        masks: Give each instance row its loss mask (``instance_mask``, ones for a photo without one): the photo's
            ``photo_mask.png``, or with ``alpha_mask`` its alpha channel (see :mod:`datamodules.masks`).
        alpha_mask: A photo without a mask file uses its own alpha channel, if it has one.
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
        masks: bool = False,
        alpha_mask: bool = False,
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
        self.center_crop = center_crop
        self.transform = image_transform(resolution, center_crop, random_flip)
        self.masks, self.alpha_mask = masks, alpha_mask
        self.mask_transform = mask_transform(resolution, center_crop, random_flip)
        self._center_mask = mask_transform(resolution)

    def __len__(self) -> int:
        if self.class_images is None:
            return len(self.instance_images)
        return max(len(self.instance_images), len(self.class_images))

    def _pixels(self, path: Path) -> tuple[Tensor, Tensor]:
        """The photo's (3, resolution, resolution) pixels and its geometry (:func:`crop_geometry`)."""
        image = load_image(path)
        before = None if self.center_crop else torch.get_rng_state()
        pixels = self.transform(image)
        return pixels, crop_geometry(image.size, self.resolution, self.center_crop, before)

    def _pixels_and_mask(self, path: Path) -> tuple[Tensor, Tensor, Tensor]:
        """The photo's pixels and (1, resolution, resolution) mask, cropped and flipped alike, and its geometry."""
        image = load_image(path)
        mask = load_mask(path, image.size, self.alpha_mask)
        before = torch.get_rng_state()
        pixels = self.transform(image)
        geometry = crop_geometry(image.size, self.resolution, self.center_crop, before)
        if mask is None:
            return pixels, torch.ones(1, *pixels.shape[1:]), geometry
        after = torch.get_rng_state()
        torch.set_rng_state(before)  # the mask's random crop and flip draw what the photo's drew
        weights = self.mask_transform(mask)
        torch.set_rng_state(after)
        return pixels, weights, geometry

    def center_mask(self, image_index: int) -> Tensor:
        """(1, resolution, resolution) mask of instance image ``image_index`` center-cropped, unflipped (what cached
        latents were encoded from), ones for a photo without one."""
        path = self.instance_images[image_index]
        image = load_image(path)
        mask = load_mask(path, image.size, self.alpha_mask)
        return self._center_mask(mask) if mask is not None else torch.ones(1, self.resolution, self.resolution)

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
        if self.masks:
            pixels, mask, geometry = self._pixels_and_mask(self.instance_images[i])
        else:
            (pixels, geometry), mask = self._pixels(self.instance_images[i]), None
        class_pixels = self._pixels(self.class_images[c]) if c is not None else None
        example: DreamBoothExample = {"instance": (pixels, self.instance_caption(i))}  # the caption's draws come last
        example["instance_geometry"] = geometry
        if mask is not None:
            example["instance_mask"] = mask
        if class_pixels is not None:
            example["class"] = (class_pixels[0], self.class_prompt)
            example["class_geometry"] = class_pixels[1]
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
    batch = DreamBoothBatch(
        pixel_values=pixel_values,
        prompts=prompts,  # (B,)
        is_prior=torch.tensor(is_prior, dtype=torch.bool),  # (B,)
    )
    add_loss_weight(batch, examples)
    add_size_conditioning(batch, examples)
    return batch


def add_size_conditioning(batch: DreamBoothBatch, examples: Sequence[dict]) -> None:
    """The batch's ``original_sizes`` and ``crop_top_lefts`` (B, 2) from each row's geometry, instance rows first."""
    rows = [ex["instance_geometry"] for ex in examples] + [ex["class_geometry"] for ex in examples if "class" in ex]
    geometry = torch.stack(rows)  # (B, 4) long
    batch["original_sizes"] = geometry[:, :2].contiguous()
    batch["crop_top_lefts"] = geometry[:, 2:].contiguous()


def add_loss_weight(batch: DreamBoothBatch, examples: Sequence[dict]) -> None:
    """With masks, the batch's ``loss_weight`` (B, 1, H, W): each instance row's mask, ones for the class rows."""
    if "instance_mask" not in examples[0]:
        return
    masks = [ex["instance_mask"] for ex in examples]
    class_rows = int(batch["is_prior"].sum())
    batch["loss_weight"] = torch.stack(masks + [torch.ones_like(masks[0])] * class_rows).float()
