"""The DreamBooth dataset with aspect-ratio buckets (``data.buckets``), on pixels or on latents cached per bucket.

Each item pairs an instance photo with, under prior preservation, a class image, both at the item's bucket (the
instance photo's, see :mod:`datamodules.buckets`), so that every batch of one bucket stacks:

- a class image goes to the bucket nearest its aspect ratio among the buckets the instance photos use; a bucket's
  items pair its photos with its class images as the plain dataset pairs all of them (``max`` of the two counts,
  each cycling), so one pass shows every image of both sets;
- a bucket that no class image is nearest to (generated class images are square; the photos may all be wide) borrows
  the class images in turn, each resized to cover that bucket and cropped to it.

Items carry each row's ``original_size`` (height, width as read) and ``crop_top_left`` (top, left in the resized
image), which the collate function stacks into the batch's ``original_sizes`` and ``crop_top_lefts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.buckets import Crop, Size, apply_crop, geometry, nearest_bucket, plan_crop, to_pixels
from datamodules.caches import LatentMasks, LatentTable
from datamodules.datasets import DreamBoothDataset
from datamodules.images import load_image
from datamodules.masks import load_mask, mask_key, mask_tensor


@dataclass(frozen=True)
class BucketItem:
    """One item: instance photo ``instance``, class image ``klass`` (or None), both trained at ``bucket``."""

    instance: int
    klass: int | None
    bucket: Size


def plan_items(instance_buckets: Sequence[Size], class_sizes: Sequence[Size] | None) -> list[BucketItem]:
    """The items of one pass, bucket by bucket (sorted), from each photo's bucket and the class images' sizes."""
    used = sorted(set(instance_buckets))
    by_bucket = {b: [i for i, ib in enumerate(instance_buckets) if ib == b] for b in used}
    if class_sizes is None:
        return [BucketItem(i, None, b) for b in used for i in by_bucket[b]]
    nearest = [nearest_bucket(s, used) for s in class_sizes]
    classes = {b: [c for c, cb in enumerate(nearest) if cb == b] for b in used}
    items, borrowed = [], 0
    for b in used:
        photos, own = by_bucket[b], classes[b]
        if own:
            items += [
                BucketItem(photos[k % len(photos)], own[k % len(own)], b) for k in range(max(len(photos), len(own)))
            ]
        else:  # no class image of this shape: borrow them in turn
            for i in photos:
                items.append(BucketItem(i, borrowed % len(class_sizes), b))
                borrowed += 1
    return items


class BucketDataset(Dataset):
    """The items of :func:`plan_items` made from a :class:`DreamBoothDataset`'s photos, captions, masks and options.

    Args:
        dataset: The plain dataset: photos, class images, captions, masks, crop and flip options.
        items: The items, from :func:`plan_items`.
        instance_sizes: Each photo's (height, width) as loaded.
        class_sizes: Each class image's (height, width), or None without class images.
    """

    def __init__(
        self,
        dataset: DreamBoothDataset,
        items: Sequence[BucketItem],
        instance_sizes: Sequence[Size],
        class_sizes: Sequence[Size] | None,
        center_crop: bool,
        random_flip: bool,
    ) -> None:
        self.dataset, self.items = dataset, list(items)
        self.instance_sizes, self.class_sizes = list(instance_sizes), class_sizes
        self.center_crop, self.random_flip = center_crop, random_flip
        self.buckets = sorted({it.bucket for it in self.items})
        self.bucket_ids = [self.buckets.index(it.bucket) for it in self.items]  # each item's bucket, for the sampler

    def __len__(self) -> int:
        return len(self.items)

    def _row(self, path, bucket: Size, with_mask: bool) -> tuple[Tensor, Tensor | None, Crop]:
        image = load_image(path)
        crop = plan_crop((image.height, image.width), bucket, self.center_crop, self.random_flip)
        pixels = to_pixels(apply_crop(image, crop))  # (3, h, w) of the bucket
        if not with_mask:
            return pixels, None, crop
        mask = load_mask(path, image.size, self.dataset.alpha_mask)
        weights = mask_tensor(apply_crop(mask, crop)) if mask is not None else torch.ones(1, *bucket)
        return pixels, weights, crop

    def __getitem__(self, index: int) -> dict:
        item, data = self.items[index], self.dataset
        pixels, mask, crop = self._row(data.instance_images[item.instance], item.bucket, data.masks)
        example = {"instance_geometry": geometry(crop)}
        if item.klass is not None:
            class_pixels, _, class_crop = self._row(data.class_images[item.klass], item.bucket, False)
            example["class"] = (class_pixels, data.class_prompt)
            example["class_geometry"] = geometry(class_crop)
        example["instance"] = (pixels, data.instance_caption(item.instance))  # the caption's draws come last
        if mask is not None:
            example["instance_mask"] = mask
        return example

    def images_of(self, bucket: Size) -> list[tuple[str, int]]:
        """The images an item of ``bucket`` trains on, as ("instance" | "class", index), each once, in order."""
        seen: dict[tuple[str, int], None] = {}
        for it in self.items:
            if it.bucket == bucket:
                seen[("instance", it.instance)] = None
                if it.klass is not None:
                    seen[("class", it.klass)] = None
        return list(seen)

    def path(self, kind: str, index: int):
        return (self.dataset.instance_images if kind == "instance" else self.dataset.class_images)[index]

    def size(self, kind: str, index: int) -> Size:
        return (self.instance_sizes if kind == "instance" else self.class_sizes)[index]


class CachedBucketDataset(Dataset):
    """:class:`BucketDataset`'s items on latents cached per bucket (center crop; both views with a random flip).

    Args:
        dataset: The bucketed pixel dataset.
        tables: Per bucket, the latents of ``dataset.images_of(bucket)`` in that order; with masks, each table holds
            its images' latent-size masks (``LatentTable.mask``), so no mask file is read here.
    """

    def __init__(self, dataset: BucketDataset, tables: dict[Size, LatentTable]) -> None:
        self.dataset = dataset
        self.rows = {b: {key: r for r, key in enumerate(dataset.images_of(b))} for b in dataset.buckets}
        self.tables = tables
        if dataset.dataset.masks and any(t.mask is None for t in tables.values()):
            raise ValueError("CachedBucketDataset: the dataset has masks but a latent table holds none")

    @property
    def buckets(self) -> list[Size]:
        return self.dataset.buckets

    @property
    def bucket_ids(self) -> list[int]:
        return self.dataset.bucket_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def _view(self, kind: str, index: int, bucket: Size) -> tuple[int, Tensor, Tensor, tuple[Tensor, Tensor]]:
        table = self.tables[bucket]
        views = table.mean.shape[1]
        v = int(torch.rand(()) < 0.5) if views == 2 else 0
        r = self.rows[bucket][(kind, index)]
        crop = plan_crop(self.dataset.size(kind, index), bucket, True, False)
        crop = Crop(crop.original, crop.resized, crop.top, crop.left, bucket, flip=v == 1)
        return v, table.mean[r, v], table.std[r, v], geometry(crop)

    def __getitem__(self, index: int) -> dict:
        item, base = self.dataset.items[index], self.dataset.dataset
        v, mean, std, geom = self._view("instance", item.instance, item.bucket)
        example = {"instance_geometry": geom}
        if item.klass is not None:
            _, class_mean, class_std, class_geom = self._view("class", item.klass, item.bucket)
            example["class"] = (class_mean, class_std, base.class_prompt)
            example["class_geometry"] = class_geom
        example["instance"] = (mean, std, base.instance_caption(item.instance))  # the caption's draws come last
        if base.masks:  # (1, h, w) at latent size, the view's own
            example["instance_mask"] = self.tables[item.bucket].mask[
                self.rows[item.bucket][("instance", item.instance)], v
            ]
        return example


def bucketed_dataset(
    dataset: DreamBoothDataset,
    photo_buckets: Sequence[Size],
    center_crop: bool,
    random_flip: bool,
) -> BucketDataset:
    """The bucketed dataset of ``dataset``'s photos, given each photo's bucket (:func:`~datamodules.buckets.assign_buckets`)."""
    from datamodules.images import check_images

    def sizes(paths, option):  # (height, width) as loaded (EXIF-rotated)
        return [(h, w) for w, h in check_images(paths, option)]

    instance_sizes = sizes(dataset.instance_images, "data.instance_data_dir")
    class_sizes = sizes(dataset.class_images, "data.class_data_dir") if dataset.class_images else None
    items = plan_items(photo_buckets, class_sizes)
    return BucketDataset(dataset, items, instance_sizes, class_sizes, center_crop, random_flip)


def cached_bucket_dataset(
    dataset: BucketDataset, latents: Callable[[list, Size, LatentMasks | None], LatentTable]
) -> CachedBucketDataset:
    """``dataset`` on latents: ``latents(paths, bucket, masks)`` gives (or builds) each bucket's cached table, with
    its instance photos' masks when the dataset has masks."""
    tables = {}
    for b in dataset.buckets:
        keys = dataset.images_of(b)
        masks = _bucket_masks(dataset, keys, b) if dataset.dataset.masks else None
        tables[b] = latents([dataset.path(*key) for key in keys], b, masks)
    return CachedBucketDataset(dataset, tables)


def _bucket_masks(dataset: BucketDataset, keys: list[tuple[str, int]], bucket: Size) -> LatentMasks:
    """The masks of one bucket's images (class images: none), each center-cropped to the bucket as its latents."""
    base = dataset.dataset

    def pixels(row: int) -> Tensor:  # (1, H, W): the bucket's pixel size; ones for a photo without a mask
        path = dataset.path(*keys[row])
        image = load_image(path)
        mask = load_mask(path, image.size, base.alpha_mask)
        crop = plan_crop((image.height, image.width), bucket, True, False)
        return mask_tensor(apply_crop(mask, crop)) if mask is not None else torch.ones(1, *bucket)

    mask_keys = [mask_key(dataset.path(kind, i), base.alpha_mask) if kind == "instance" else None for kind, i in keys]
    return LatentMasks(mask_keys, pixels)
