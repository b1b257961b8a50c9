"""DreamBoothDataModule: Lightning hooks only; listing, loading, transforms and class-image generation live beside it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from datamodules.cached_dataset import CachedLatentDataset, WithTextEmbeddings, collate_latents
from datamodules.caches import latent_cache, text_embedding_cache
from datamodules.class_images import generate_class_images
from datamodules.datasets import DreamBoothDataset, collate_dreambooth
from datamodules.images import check_image_folder, check_images, list_images

log = logging.getLogger(__name__)


class DreamBoothDataModule(pl.LightningDataModule):
    """The subject's images with their prompt and, with prior preservation, class images made by the base model.

    Each batch holds ``batch_size`` instance rows and, with prior preservation, ``batch_size`` class rows
    (a :class:`~datamodules.batch.DreamBoothBatch` whose ``is_prior`` mask marks the class rows).

    Args:
        instance_data_dir: Folder with the images of the subject (hidden files and non-images are ignored).
        instance_prompt: Caption of the subject's images, with a rare identifier, e.g. ``"a photo of sks dog"``.
        class_data_dir: Folder of the class images for prior preservation. Missing images are generated into it
            by the base model before training; images already there (any name) count.
        class_prompt: Prompt of the class images, the subject's class without the identifier, e.g.
            ``"a photo of dog"``.
        with_prior_preservation: Add class images to each batch (the DreamBooth prior-preservation loss).
        num_class_images: How many class images to train with; missing ones are generated.
        resolution: Side of the square training images in pixels (a multiple of 8; 512 for SD 1.x).
        center_crop: Center crop after resizing the shorter side to ``resolution``; otherwise a random crop.
        random_flip: Flip images horizontally with probability 0.5.
        batch_size: Instance images per batch (as many class images are added with prior preservation).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pretrained_model_name_or_path: The base model that generates the class images. Linked from
            ``model.pretrained_model_name_or_path`` by the CLI (``link_arguments``): set it on the model.
        revision: Hub revision of the base model. Linked from ``model.revision`` by the CLI.
        variant: Weight-file variant of the base model, e.g. ``fp16``. Linked from ``model.variant`` by the CLI.
        class_images_batch_size: Images per pipeline call when generating class images, or ``auto``: on CUDA the
            largest batch that fits (from 32, halved on out-of-memory), on a CPU 8.
        class_images_inference_steps: Sampler (DPM-Solver++) steps per generated class image.
        class_images_guidance_scale: Classifier-free guidance scale of the generated class images.
        seed: Seed of the generated class images (image ``i`` uses ``seed + i``).
        cache_latents: Encode every image with the frozen VAE once before training, batched, and train on the
            cached latent distribution (sampled each step: the same training signal as encoding each step); the VAE
            is then never loaded for training. Needs ``center_crop`` (a random crop changes the pixels each epoch,
            so it turns the cache off, with a log line); a random flip is cached both ways.
        cache_text_embeddings: Encode each prompt once with the frozen text encoder before training, which then
            is never loaded for training. Set by the CLI from ``model.train_text_encoder`` (on when it is false).
        cache_dir: Folder of the latent and text-embedding caches; defaults to ``$DREAMBOOTH_CACHE/data``
            (``~/.cache/dreambooth_lightning/data``). A cache is keyed by everything its content depends on (image
            bytes, resolution, crop, flip, base model, revision, variant, VAE / text encoder), so a change
            rebuilds it.
    """

    def __init__(
        self,
        instance_data_dir: str,
        instance_prompt: str,
        class_data_dir: str | None = None,
        class_prompt: str | None = None,
        with_prior_preservation: bool = True,
        num_class_images: int = 100,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        class_images_batch_size: int | Literal["auto"] = "auto",
        class_images_inference_steps: int = 25,
        class_images_guidance_scale: float = 7.5,
        seed: int = 0,
        cache_latents: bool = True,
        cache_text_embeddings: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not instance_prompt.strip():
            raise ValueError("data.instance_prompt is empty: give the subject's caption, e.g. 'a photo of sks dog'.")
        if resolution <= 0 or resolution % 8:
            raise ValueError(
                f"data.resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}."
            )
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        if with_prior_preservation:
            if not class_prompt:
                raise ValueError(
                    "data.with_prior_preservation needs data.class_prompt (e.g. 'a photo of dog'), "
                    "or set data.with_prior_preservation false."
                )
            if not class_data_dir:
                raise ValueError(
                    "data.with_prior_preservation needs data.class_data_dir (a folder for the class images; "
                    "missing ones are generated), or set data.with_prior_preservation false."
                )
            if num_class_images <= 0:
                raise ValueError(
                    f"data.num_class_images must be positive with prior preservation, got {num_class_images}."
                )
            bad_batch = class_images_batch_size != "auto" and class_images_batch_size <= 0
            if bad_batch or class_images_inference_steps <= 0:
                raise ValueError(
                    "data.class_images_batch_size (or auto) and data.class_images_inference_steps must be positive."
                )
            if class_prompt.strip() == instance_prompt.strip():
                log.warning(
                    "data.instance_prompt and data.class_prompt are both %r: the prior-preservation term then "
                    "fights the subject. Put a rare identifier in the instance prompt only (e.g. 'a photo of sks dog').",
                    instance_prompt,
                )
        self.save_hyperparameters()
        self.train_dataset: Dataset | None = None  # built in setup("fit"): images, or their cached latents
        self._collate = collate_dreambooth

    def prepare_data(self) -> None:
        """Check the images, generate the missing class images, build the caches (once per node, local rank 0)."""
        hp = self.hparams
        check_image_folder(hp.instance_data_dir, "data.instance_data_dir")
        if hp.with_prior_preservation:
            Path(hp.class_data_dir).expanduser().mkdir(parents=True, exist_ok=True)
            generate_class_images(
                hp.pretrained_model_name_or_path,
                hp.class_prompt,
                hp.class_data_dir,
                hp.num_class_images,
                hp.resolution,
                batch_size=hp.class_images_batch_size,
                num_inference_steps=hp.class_images_inference_steps,
                guidance_scale=hp.class_images_guidance_scale,
                seed=hp.seed,
                revision=hp.revision,
                variant=hp.variant,
            )
        if self.trainer is None or self.trainer.state.fn == "fit":  # validate / test / predict train nothing
            self._build_caches()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset, self._collate = self._with_cached_inputs(self._build_train_dataset(), announce=True)
        # Validation prompts (templated with identifier and class) will get their own dataset here.

    def _class_images(self) -> list[Path]:
        """The first ``num_class_images`` class images (sorted by name), each checked to load."""
        hp = self.hparams
        folder = Path(hp.class_data_dir).expanduser()
        found = list_images(folder) if folder.is_dir() else []
        if len(found) < hp.num_class_images:
            raise FileNotFoundError(
                f"data.class_data_dir: {str(hp.class_data_dir)!r} holds {len(found)} images, fewer than "
                f"data.num_class_images={hp.num_class_images}. They are generated in prepare_data(); run through "
                "the Trainer (or call prepare_data() first), or lower data.num_class_images."
            )
        images = found[: hp.num_class_images]
        check_images(images, "data.class_data_dir")
        return images

    def _build_train_dataset(self) -> DreamBoothDataset:
        hp = self.hparams
        prior = hp.with_prior_preservation
        return DreamBoothDataset(
            instance_images=check_image_folder(hp.instance_data_dir, "data.instance_data_dir"),
            instance_prompt=hp.instance_prompt,
            resolution=hp.resolution,
            class_images=self._class_images() if prior else None,
            class_prompt=hp.class_prompt if prior else None,
            center_crop=hp.center_crop,
            random_flip=hp.random_flip,
        )

    def _build_caches(self) -> None:
        """Build the missing latent / text-embedding caches (setup() then reads them on every rank)."""
        self._with_cached_inputs(self._build_train_dataset())

    def _with_cached_inputs(self, dataset: DreamBoothDataset, announce: bool = False):
        """The dataset and collate function training reads: cached latents and text embeddings where they apply."""
        hp = self.hparams
        model = (hp.pretrained_model_name_or_path, hp.revision, hp.variant)
        data, collate = dataset, collate_dreambooth
        if hp.cache_latents and not hp.center_crop and announce:
            log.info("data.center_crop is false: random crops change the pixels, so latents are encoded every step.")
        if hp.cache_latents and hp.center_crop:
            images = dataset.instance_images + (dataset.class_images or [])
            table = latent_cache(images, hp.resolution, hp.random_flip, *model, cache_dir=hp.cache_dir)
            data, collate = CachedLatentDataset(dataset, table), collate_latents
        if hp.cache_text_embeddings:
            prompts = [dataset.instance_prompt] + ([dataset.class_prompt] if dataset.class_images else [])
            collate = WithTextEmbeddings(collate, text_embedding_cache(prompts, *model, cache_dir=hp.cache_dir))
        return data, collate

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("DreamBoothDataModule.train_dataloader() needs setup('fit') first.")
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=False,
        )
