"""The DreamBooth dataset on cached latents, and the collate functions for cached inputs.

Training on cached latents loads no image and runs no VAE: each item is the latent distribution (mean, std) of
an instance image (and a class image), in one of its cached orientations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.batch import DreamBoothBatch
from datamodules.caches import LatentMasks, LatentTable
from datamodules.datasets import DreamBoothDataset, add_loss_weight, add_size_conditioning, crop_geometry
from datamodules.images import displayed_size
from datamodules.masks import mask_key

LatentRow = tuple[Tensor, Tensor, str]  # (4, h, w) mean, (4, h, w) std, the row's prompt


class CachedLatentDataset(Dataset):
    """The items of a :class:`DreamBoothDataset` (same length and pairing), with latents in place of pixels.

    Args:
        dataset: The pixel dataset whose images, prompts and pairing this one follows.
        table: The cached latents of ``dataset.instance_images`` followed by ``dataset.class_images``. With two
            orientations (random flip), each access picks one with probability 0.5, as a random flip would. With
            ``dataset.masks``, the table holds the latent-size masks too (:func:`~datamodules.caches.latent_cache`).
    """

    def __init__(self, dataset: DreamBoothDataset, table: LatentTable) -> None:
        n_images = len(dataset.instance_images) + len(dataset.class_images or [])
        if table.mean.shape[0] != n_images or table.std.shape != table.mean.shape:
            raise ValueError(f"latent table of {tuple(table.mean.shape)} does not match the {n_images} images")
        self.dataset = dataset
        self.table = table
        self._geometry: dict[int, Tensor] = {}  # image index -> its center crop's geometry, read on first use
        # With masks: each instance image's mask in the cached views at latent size, (N, views, 1, h, w), from the
        # cache entry (no mask file is read here).
        self.masks = None
        if dataset.masks:
            if table.mask is None:
                raise ValueError("CachedLatentDataset: the dataset has masks but the latent table holds none")
            self.masks = table.mask[: len(dataset.instance_images)]

    def __len__(self) -> int:
        return len(self.dataset)

    def geometry(self, image_index: int) -> Tensor:
        """(4,) long: image ``image_index``'s (height, width) and center crop (what the latents were encoded from)."""
        if image_index not in self._geometry:
            images = self.dataset.instance_images + (self.dataset.class_images or [])
            size = displayed_size(images[image_index])  # from the header: no image is decoded
            self._geometry[image_index] = crop_geometry(size, self.dataset.resolution, center_crop=True)
        return self._geometry[image_index]

    def _view(self, image_index: int) -> tuple[int, Tensor, Tensor]:
        views = self.table.mean.shape[1]
        v = int(torch.rand(()) < 0.5) if views == 2 else 0
        return v, self.table.mean[image_index, v], self.table.std[image_index, v]

    def __getitem__(self, index: int) -> dict:
        i, c = self.dataset.pair_indices(index)
        v, *instance = self._view(i)
        prior = self._view(len(self.dataset.instance_images) + c)[1:] if c is not None else None
        example = {"instance": (*instance, self.dataset.instance_caption(i))}  # the caption's draws come last
        example["instance_geometry"] = self.geometry(i)
        if self.masks is not None:
            example["instance_mask"] = self.masks[i, v]
        if prior is not None:
            example["class"] = (*prior, self.dataset.class_prompt)
            example["class_geometry"] = self.geometry(len(self.dataset.instance_images) + c)
        return example


def square_masks(dataset: DreamBoothDataset) -> LatentMasks:
    """The masks of ``dataset``'s instance photos (center-cropped, as their latents are encoded) for the latent cache,
    in the table's order: instance images, then class images (never masked)."""
    keys = [mask_key(p, dataset.alpha_mask) for p in dataset.instance_images]
    return LatentMasks(keys + [None] * len(dataset.class_images or []), dataset.center_mask)


def collate_latents(examples: Sequence[dict]) -> DreamBoothBatch:
    """Like :func:`~datamodules.datasets.collate_dreambooth` (instance rows, then class rows, with ``is_prior``)."""
    rows = [ex["instance"] for ex in examples] + [ex["class"] for ex in examples if "class" in ex]
    batch = DreamBoothBatch(
        latent_mean=torch.stack([r[0] for r in rows]),  # (B, 4, h, w)
        latent_std=torch.stack([r[1] for r in rows]),  # (B, 4, h, w)
        prompts=[r[2] for r in rows],  # (B,)
        is_prior=torch.tensor([False] * len(examples) + [True] * (len(rows) - len(examples))),  # (B,)
    )
    add_loss_weight(batch, examples)
    add_size_conditioning(batch, examples)
    return batch


class WithTextEmbeddings:
    """A collate function that adds each row's cached ``prompt_embeds`` (B, 77, D) to another's batch, and with
    ``pooled`` (SDXL) its ``pooled_prompt_embeds`` (B, P).

    A class rather than a closure, so the DataLoader's worker processes can pickle it.
    """

    def __init__(
        self,
        collate: Callable[[list], DreamBoothBatch],
        embeds: dict[str, Tensor],
        pooled: dict[str, Tensor] | None = None,
    ) -> None:
        self.collate = collate
        self.embeds = embeds
        self.pooled = pooled

    def __call__(self, examples: list) -> DreamBoothBatch:
        batch = self.collate(examples)
        missing = sorted(set(batch["prompts"]) - set(self.embeds))
        if missing:
            raise KeyError(f"no cached text embedding for the prompts {missing}")
        batch["prompt_embeds"] = torch.stack([self.embeds[p] for p in batch["prompts"]])  # (B, 77, D)
        if self.pooled is not None:
            batch["pooled_prompt_embeds"] = torch.stack([self.pooled[p] for p in batch["prompts"]])  # (B, P)
        return batch
