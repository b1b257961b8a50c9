"""DreamBoothDataModule: Lightning hooks only; listing, loading, transforms and class-image generation live beside it."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.errors import ConfigError, InputNotFoundError
from datamodules.bucket_dataset import bucketed_dataset, cached_bucket_dataset
from datamodules.buckets import assign_buckets, check_bucket_options, resolve_step
from datamodules.cached_dataset import CachedLatentDataset, WithTextEmbeddings, collate_latents, square_masks
from datamodules.caches import latent_cache, text_embedding_tables
from datamodules.captions import (
    check_caption_options,
    fill_caption,
    identifier_nowhere_message,
    read_captions,
    uses_class_noun,
)
from datamodules.class_images import generate_class_images
from datamodules.concepts import Concept, ConceptsDataset, ResolvedConcept, as_dicts, resolve_concepts
from datamodules.datasets import DreamBoothDataset, collate_dreambooth, image_transform
from datamodules.evaluation import (
    DREAMBENCH,
    EvalPromptDataset,
    EvalSubject,
    collate_eval,
    dreambench_subjects,
    subject_templates,
)
from datamodules.images import check_image_folder, check_images, list_images, load_image
from datamodules.masks import check_masks
from datamodules.predict import collate_predict, load_control_image, read_prompts_file
from datamodules.prompt_checks import missing_identifier_message
from datamodules.prompts import resolve_templates
from datamodules.resumable import resumable_bucket_loader, resumable_train_loader
from datamodules.validation import ValidationPromptDataset, collate_prompts, prompt_loader
from sd.training.heldout import MIN_TRAINING_PHOTOS, HeldOutSet, check_holdout, holdout_count, split_holdout

log = logging.getLogger(__name__)


def validation_class_noun(
    templates: list[str], pres_prompt: str | None, identifier: str, class_noun: str | None, instance_prompt: str
) -> str:
    """The class noun the validation prompts use: ``class_noun``, else the words after the identifier in the
    instance prompt ("a photo of sks dog" -> "dog"). Fails before any model loads when neither gives one."""
    words = instance_prompt.split()
    if identifier not in words:
        log.warning(
            "data.identifier %r does not appear in data.instance_prompt %r: validation prompts name the subject by "
            "the identifier, so they will not show the trained subject.",
            identifier,
            instance_prompt,
        )
    if class_noun:
        return class_noun
    derived = " ".join(words[words.index(identifier) + 1 :]) if identifier in words else ""
    if not derived and any("{class_noun}" in t for t in [*templates, pres_prompt or ""]):
        raise ConfigError(
            "data.class_noun is not set and cannot be read from data.instance_prompt (no word after the identifier), "
            "but data.validation_prompts or data.pres_prompt use {class_noun}: set it (e.g. --data.class_noun dog)."
        )
    return derived


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
        resolution: Side of the square training images in pixels (a multiple of 8; 512 for SD 1.x, 1024 for SDXL).
        center_crop: Center crop after resizing the shorter side to ``resolution``; otherwise a random crop.
        random_flip: Flip images horizontally with probability 0.5.
        batch_size: Instance images per batch (as many class images are added with prior preservation).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pretrained_model_name_or_path: The base model that generates the class images. Linked from
            ``model.pretrained_model_name_or_path`` by the CLI (``link_arguments``): set it on the model.
        revision: Hub revision of the base model. Linked from ``model.revision`` by the CLI.
        variant: Weight-file variant of the base model, e.g. ``fp16``. Linked from ``model.variant`` by the CLI.
        single_file_config: Configs of a single-file base model (a diffusers folder or hub id; None: its family's).
            Linked from ``model.single_file_config`` by the CLI.
        vae: Another VAE than the base model's (class images, latent cache). Linked from ``model.vae`` by the CLI.
        class_images_batch_size: Images per pipeline call when generating class images, or ``auto``: on CUDA the
            largest batch that fits (from 32, halved on out-of-memory), on a CPU 8.
        class_images_inference_steps: Sampler (DPM-Solver++) steps per generated class image.
        class_images_guidance_scale: Classifier-free guidance scale of the generated class images.
        seed: Seed of the generated class images (image ``i`` uses ``seed + i``) and of the training data: its order
            (a function of seed and epoch) and each image's random crop and flip.
        validation_prompts: Prompts rendered at each validation: a list of templates with ``{identifier}`` and
            ``{class_noun}``, or a built-in set: ``default`` (4 prompts), ``dreambench_object`` or ``dreambench_live`` (the
            25 prompts of the DreamBooth evaluation for objects or for live subjects). An empty list renders only the
            PRES prompt, if any.
        identifier: The rare token that names the subject in the instance prompt, e.g. ``sks``.
        new_tokens: Pivotal tuning: new tokens (e.g. ``["<s0>", "<s1>"]``) that the identifier stands for. They are
            added to the tokenizer, their embeddings train beside the LoRA (``model.new_token_init``,
            ``model.new_token_lr``), and the text encoder reads each prompt with its identifier word replaced by them,
            while prompts, captions, grids and metadata keep the identifier. Null is off. No text-embedding cache then.
        class_noun: The subject's class noun in validation prompts, e.g. ``dog``; by default the words after the
            identifier in the instance prompt ("a photo of sks dog" -> "dog").
        pres_prompt: Template of the bare class prompt rendered for PRES (prior preservation), e.g. ``"a
            {class_noun}"``; null to skip it.
        validation_batch_size: Prompts rendered per step (validation, ``predict`` and ``test``).
        validation_seed: Base seed of the validation renders: prompt ``i``, image ``j`` use seed
            ``(validation_seed + i) * 1000 + j``, the same at every validation.
        predict_prompts: Prompts that ``predict`` renders (templates: ``{identifier}`` and ``{class_noun}`` are filled
            in, as in validation); null renders ``predict_prompts_file`` or else the validation prompts.
        predict_prompts_file: A text file with one prompt per line (``#`` starts a comment line), instead of
            ``predict_prompts``.
        predict_seed: Base seed of ``predict``: prompt ``i``, image ``j`` use seed ``(predict_seed + i) * 1000 + j``.
        control_image: Condition image for ``model.controlnet`` (e.g. an OpenPose skeleton), used for every prompt
            that ``predict`` renders.
        eval_data_dir: ``test`` on every subject of a DreamBench-layout folder (a folder of images per subject and
            ``prompts_and_classes.txt``); null evaluates the run's own subject (``instance_data_dir``).
        eval_subjects: With ``eval_data_dir``: the subjects (folder names) to evaluate; null for all that have a folder.
        eval_prompts: ``test`` prompts: ``dreambench`` (the 25 DreamBench prompts, live-subject list for cats and
            dogs, object list otherwise), a built-in set name, or a list of templates.
        eval_num_prompts: Evaluate only the first N prompts of each subject (a quick look); null for all.
        eval_num_images: Images per prompt in ``test`` (4 in the protocol).
        eval_seed: Base seed of the ``test`` renders, as ``validation_seed``.
        cache_latents: Encode every image with the frozen VAE once before training, batched, and train on the
            cached latent distribution (sampled each step: the same training signal as encoding each step); the VAE
            is then never loaded for training. Needs ``center_crop`` (a random crop changes the pixels each epoch,
            so it turns the cache off, with a log line); a random flip is cached both ways.
        cache_text_embeddings: Encode each prompt once with the frozen text encoder before training, which then
            is never loaded for training. Set by the CLI from ``model.train_text_encoder`` (on when it is false).
        captions: Train each photo on its own caption where it has one: ``photo.txt`` beside ``photo.jpg``, or a
            ``metadata.jsonl`` / ``metadata.csv`` in the folder (``file_name`` and ``text`` of each photo). Captions may
            use ``{identifier}`` and ``{class_noun}``; photos without one train on ``instance_prompt``. False trains
            every photo on ``instance_prompt``.
        caption_dropout: Probability that an instance row trains on the empty prompt (class rows keep theirs).
        shuffle_tags: Shuffle the comma-separated tags of each instance caption at every access (tag-style captions).
            The captions then vary without end, so the text encoder runs every step (no text-embedding cache).
        keep_tags: With ``shuffle_tags``, the first N tags stay in place (e.g. 1 keeps "sks dog" first).
        alpha_mask: A photo without a ``photo_mask.png`` beside it uses its own alpha channel (if it has one) as its
            loss mask. Masks weigh each instance row's loss per pixel (white: trained on, black: ignored), reduced to
            the latent grid; class rows are never masked. Photos with no mask at all leave training as it was.
        concepts: Several subjects in one run: a list of concepts, each with its ``instance_data_dir``,
            ``instance_prompt``, and optionally ``name``, ``identifier``, ``class_noun``, ``class_data_dir``,
            ``class_prompt``, ``num_class_images`` (defaults: the plain options) and ``repeats`` (how often its photos
            appear per epoch). Validation scores each (``val/dino/<name>``; ``val/dino`` is the mean), ``test``
            evaluates each against its own photos. Null: the plain options are the one subject (then leave
            ``instance_data_dir`` and ``instance_prompt`` null here).
        buckets: Aspect-ratio buckets: each photo trains at the size nearest its aspect ratio among sizes of about
            ``resolution`` squared pixels (sides multiples of ``bucket_step``), resized to cover it and cropped (center
            or random, as ``center_crop`` says) instead of cropped to the square; every batch comes from one bucket
            (class rows too); latents are cached per bucket. Each row's original size and crop are in the batch
            (``original_sizes``, ``crop_top_lefts``). Off: training is what it was.
        bucket_step: With ``buckets``, the side step of the buckets in pixels (a divisor of ``resolution``); null: what
            the model needs, its VAE's downscale times its UNet's (64 for Stable Diffusion 1.x / 2.x, 8 for the toy
            model). A value the model cannot take fails.
        bucket_max_ratio: With ``buckets``, the widest aspect ratio of a bucket (either way): 2.0 gives buckets from
            1:2 to 2:1.
        bucket_no_upscale: With ``buckets``, a photo smaller than ``resolution`` squared is not enlarged: it trains at
            its own size rounded down to ``bucket_step`` (a bucket of its own).
        cache_dir: Folder of the latent and text-embedding caches; defaults to ``$DREAMBOOTH_CACHE/data``
            (``~/.cache/dreambooth_lightning/data``). A cache is keyed by everything its content depends on (image
            bytes, resolution, crop, flip, base model, revision, variant, VAE / text encoder), so a change
            rebuilds it.
        holdout: Hold photos out of training and log a fixed-noise denoising loss on them at each validation
            (``val/loss``: the same noise and timesteps every time, so the curve compares): a number of photos (the
            last ones in name order) or a fraction of them (0.2). When that would leave fewer than 3 training photos,
            none is held out and the loss is measured on the training photos instead (a fit curve, not an
            overfitting one; a warning says so). Null (default) is off: training is unchanged.
    """

    def __init__(
        self,
        instance_data_dir: str | None = None,
        instance_prompt: str | None = None,
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
        single_file_config: str | None = None,
        vae: str | None = None,
        class_images_batch_size: int | Literal["auto"] = "auto",
        class_images_inference_steps: int = 25,
        class_images_guidance_scale: float = 7.5,
        seed: int = 0,
        validation_prompts: str | list[str] = "default",
        identifier: str = "sks",
        new_tokens: list[str] | None = None,
        class_noun: str | None = None,
        pres_prompt: str | None = "a {class_noun}",
        validation_batch_size: int = 4,
        validation_seed: int = 0,
        predict_prompts: list[str] | None = None,
        predict_prompts_file: str | None = None,
        predict_seed: int = 0,
        control_image: str | None = None,
        eval_data_dir: str | None = None,
        eval_subjects: list[str] | None = None,
        eval_prompts: str | list[str] = DREAMBENCH,
        eval_num_prompts: int | None = None,
        eval_num_images: int = 4,
        eval_seed: int = 0,
        cache_latents: bool = True,
        cache_text_embeddings: bool = True,
        captions: bool = True,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        alpha_mask: bool = False,
        concepts: list[Concept] | None = None,
        buckets: bool = False,
        bucket_step: int | None = None,
        bucket_max_ratio: float = 2.0,
        bucket_no_upscale: bool = False,
        cache_dir: str | None = None,
        holdout: int | float | None = None,
    ) -> None:
        super().__init__()
        check_holdout(holdout)
        self.validation_templates = resolve_templates(validation_prompts, "data.validation_prompts")
        resolve_templates([pres_prompt] if pres_prompt else [], "data.pres_prompt")
        if predict_prompts is not None and predict_prompts_file is not None:
            raise ConfigError("Give data.predict_prompts or data.predict_prompts_file, not both.")
        resolve_templates(predict_prompts or [], "data.predict_prompts")
        if eval_prompts != DREAMBENCH:
            resolve_templates(eval_prompts, "data.eval_prompts")
        if eval_num_images <= 0 or (eval_num_prompts is not None and eval_num_prompts <= 0):
            raise ConfigError("data.eval_num_images and data.eval_num_prompts must be positive.")
        if concepts is None and instance_prompt is not None and not instance_prompt.strip():
            raise ConfigError("data.instance_prompt is empty: give the subject's caption, e.g. 'a photo of sks dog'.")
        if resolution <= 0 or resolution % 8:
            raise ConfigError(
                f"data.resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}."
            )
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if with_prior_preservation and concepts is None:
            if not class_prompt:
                raise ConfigError(
                    "data.with_prior_preservation needs data.class_prompt (e.g. 'a photo of dog'), "
                    "or set data.with_prior_preservation false."
                )
            if not class_data_dir:
                raise ConfigError(
                    "data.with_prior_preservation needs data.class_data_dir (a folder for the class images; "
                    "missing ones are generated), or set data.with_prior_preservation false."
                )
            if num_class_images <= 0:
                raise ConfigError(
                    f"data.num_class_images must be positive with prior preservation, got {num_class_images}."
                )
        if with_prior_preservation:
            bad_batch = class_images_batch_size != "auto" and class_images_batch_size <= 0
            if bad_batch or class_images_inference_steps <= 0:
                raise ConfigError(
                    "data.class_images_batch_size (or auto) and data.class_images_inference_steps must be positive."
                )
        check_caption_options(caption_dropout, keep_tags)
        if buckets:
            check_bucket_options(resolution, bucket_step, bucket_max_ratio)
        concepts = as_dicts(concepts)  # plain values in the hyperparameters and checkpoints
        plain = dict(instance_data_dir=instance_data_dir, instance_prompt=instance_prompt, identifier=identifier,
                     class_noun=class_noun, class_data_dir=class_data_dir, class_prompt=class_prompt,
                     num_class_images=num_class_images)  # fmt: skip
        self.concepts: list[ResolvedConcept] = resolve_concepts(concepts, plain, with_prior_preservation)
        if holdout is not None and len(self.concepts) > 1:
            raise ConfigError(
                "data.holdout holds photos of one subject out of training; with several data.concepts it is not "
                "supported: set it to null."
            )
        if new_tokens and (len(self.concepts) > 1 or self.concepts[0].identifier != identifier):
            raise ConfigError(
                "data.new_tokens (pivotal tuning) stands for data.identifier in a one-subject run; with data.concepts "
                "it is not supported: give each concept its own rare identifier instead, or train one subject."
            )
        for c in self.concepts:
            if c.class_prompt and (message := missing_identifier_message(c.instance_prompt, c.class_prompt)):
                log.warning(message)
        self.save_hyperparameters()
        self.train_dataset: Dataset | None = None  # built in setup("fit"): images, or their cached latents
        self._collate = collate_dreambooth
        self.val_dataset: ValidationPromptDataset | None = None  # built in setup("fit" / "validate")
        self.predict_dataset: ValidationPromptDataset | None = None  # built in setup("predict")
        self.control: Tensor | None = None  # (1, 3, H, W) ControlNet condition, loaded in setup("predict")
        self.test_subjects: list[EvalSubject] = []  # built in setup("test")
        self.test_dataset: EvalPromptDataset | None = None
        self.heldout: HeldOutSet | None = None  # built in setup("fit" / "validate") with data.holdout
        self._mask_counts: dict[tuple[Path, ...], int] = {}  # photos -> how many have a mask (checked once)
        self._checked_stages: set[str] = set()  # check_inputs: the stages whose inputs passed

    def check_inputs(self, stage: str) -> None:
        """Fail fast on the user's inputs for ``stage`` (``fit``, ``validate``, ``test``, ``predict``, or the TrainerFn
        that equals it): the base model is one of a family we train, and the photos (with, for ``fit``, their captions,
        masks and buckets) are readable. Called by train.py before the loggers start, so that bad input starts no W&B run, and by ``prepare_data``;
        each stage is checked once."""
        if stage in self._checked_stages:
            return
        hp = self.hparams
        from sd.models.loading import check_model_path  # loads diffusers: not at import

        check_model_path(
            hp.pretrained_model_name_or_path, hp.revision
        )  # a model of a family we train, from its configs
        if not (stage == "predict" or (stage == "test" and hp.eval_data_dir)):  # else the photos are not needed
            for c in self.concepts:
                option = f"{c.option}.instance_data_dir"
                images = check_image_folder(c.instance_data_dir, option, min_side=hp.resolution)
                if stage == "fit":  # bad captions and masks fail here, before class images are made
                    self._instance_captions(c, images, warn=True)
                    self._has_masks(c, images, announce=True)
                    if hp.buckets:  # a photo left with no bucket fails here
                        self._photo_buckets(c, images, announce=True)
        self._checked_stages.add(stage)

    def prepare_data(self) -> None:
        """Check the inputs and, for ``fit``, generate the missing class images and build the caches (once per node)."""
        stage = self.trainer.state.fn if self.trainer is not None else "fit"
        self.check_inputs(stage)
        if stage == "fit" and not self._distributed():  # under DDP setup() does this, shared by all the ranks
            self._make_class_images(rank=0, world_size=1)
            self._build_caches()

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def _make_class_images(self, rank: int, world_size: int) -> None:
        """Top each class folder up; with several ranks each makes its share of the missing images."""
        hp = self.hparams
        if not hp.with_prior_preservation:
            return
        wanted: dict[tuple[str, str], int] = {}  # concepts that share a folder and prompt share its images
        for c in self.concepts:
            key = (c.class_data_dir, c.class_prompt)
            wanted[key] = max(wanted.get(key, 0), c.num_class_images)
        for (class_dir, class_prompt), count in wanted.items():
            Path(class_dir).expanduser().mkdir(parents=True, exist_ok=True)
            generate_class_images(
                hp.pretrained_model_name_or_path,
                class_prompt,
                class_dir,
                count,
                hp.resolution,
                batch_size=hp.class_images_batch_size,
                num_inference_steps=hp.class_images_inference_steps,
                guidance_scale=hp.class_images_guidance_scale,
                seed=hp.seed,
                revision=hp.revision,
                variant=hp.variant,
                single_file_config=hp.single_file_config,
                vae=hp.get("vae"),
                rank=rank,
                world_size=world_size,
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._distributed():
            # Every rank makes its share of the missing class images (the folder must be shared by the nodes); then
            # each node's local rank 0 builds the caches that node's ranks read.
            trainer = self.trainer
            self._make_class_images(trainer.global_rank, trainer.world_size)
            trainer.strategy.barrier("class_images")
            if trainer.local_rank == 0:
                self._build_caches()
            trainer.strategy.barrier("caches")
        if stage == "fit":
            self.train_dataset, self._collate = self._training_data(announce=True)
        if stage in ("fit", "validate"):
            hp = self.hparams
            parts = [
                (c.identifier, validation_class_noun(
                    self.validation_templates, hp.pres_prompt, c.identifier, c.class_noun, c.instance_prompt
                )) for c in self.concepts
            ]  # fmt: skip
            self.val_dataset = ValidationPromptDataset.of_concepts(
                self.validation_templates, parts, hp.pres_prompt, hp.validation_seed
            )
            self.heldout = self._build_heldout_set() if hp.get("holdout") is not None else None
        if stage == "predict":
            self.predict_dataset, self.control = self._build_predict_dataset()
        if stage == "test":
            self.test_subjects = self._eval_subjects()
            self.test_dataset = EvalPromptDataset(
                self.test_subjects, self.hparams.identifier, self.hparams.pres_prompt, self.hparams.eval_seed
            )

    def _build_predict_dataset(self) -> tuple[ValidationPromptDataset, Tensor | None]:
        hp = self.hparams
        if hp.predict_prompts_file:
            templates = resolve_templates(read_prompts_file(hp.predict_prompts_file), "data.predict_prompts_file")
        else:
            templates = hp.predict_prompts or self.validation_templates
        c = self.concepts[0]  # with several concepts, the prompts name the first one
        noun = validation_class_noun(templates, None, c.identifier, c.class_noun, c.instance_prompt)
        control = load_control_image(hp.control_image) if hp.control_image else None
        return ValidationPromptDataset(templates, c.identifier, noun, None, hp.predict_seed), control

    def _eval_subjects(self) -> list[EvalSubject]:
        """The subjects ``test`` evaluates: those of ``eval_data_dir``, or the run's own (each concept)."""
        hp = self.hparams
        if hp.eval_data_dir:
            return dreambench_subjects(hp.eval_data_dir, hp.eval_prompts, hp.eval_subjects, hp.eval_num_prompts)
        subjects = []
        for c in self.concepts:
            noun = validation_class_noun([], None, c.identifier, c.class_noun, c.instance_prompt)
            if not noun:
                raise ConfigError(
                    f"test needs the subject's class noun: set {c.option}.class_noun (e.g. --data.class_noun dog)."
                )
            templates = subject_templates(noun, hp.eval_prompts, hp.eval_num_prompts)
            folder = Path(c.instance_data_dir).expanduser()
            subjects.append(EvalSubject(c.name, noun, folder, templates, identifier=c.identifier))
        return subjects

    def reference_images(self) -> list[Path]:
        """The subjects' real images, which validation renders are compared with (DINO, CLIP-I): every concept's."""
        return [p for images in self.concept_references().values() for p in images]

    def concept_references(self) -> dict[str, list[Path]]:
        """Each concept's name -> its real images (validation scores each concept against its own)."""
        return {
            c.name: check_image_folder(c.instance_data_dir, f"{c.option}.instance_data_dir", warn=False)
            for c in self.concepts
        }

    def _class_images(self, c: ResolvedConcept) -> list[Path]:
        """The first ``num_class_images`` class images (sorted by name), each checked to load."""
        folder = Path(c.class_data_dir).expanduser()
        found = list_images(folder) if folder.is_dir() else []
        option = "data" if c.option == "data" else c.option
        if len(found) < c.num_class_images:
            raise InputNotFoundError(
                f"{option}.class_data_dir: {str(c.class_data_dir)!r} holds {len(found)} images, fewer than "
                f"{option}.num_class_images={c.num_class_images}. They are generated in prepare_data(); run through "
                f"the Trainer (or call prepare_data() first), or lower {option}.num_class_images."
            )
        images = found[: c.num_class_images]
        check_images(images, f"{option}.class_data_dir")
        return images

    def _instance_captions(self, c: ResolvedConcept, images: list[Path], warn: bool = False) -> list[str | None] | None:
        """Each photo's own caption with its placeholders filled (None where it has none), or None for no captions."""
        hp = self.hparams
        if not hp.captions:
            return None
        option = f"{c.option}.instance_data_dir"
        raw = read_captions(c.instance_data_dir, images, option)
        if all(x is None for x in raw):
            return None
        noun = c.class_noun or ""
        if uses_class_noun(raw):
            noun = validation_class_noun(["{class_noun}"], None, c.identifier, c.class_noun, c.instance_prompt)
        captions = [None if x is None else fill_caption(x, c.identifier, noun) for x in raw]
        if warn:
            log.info("%s: %d of %d photos have their own caption.", option, sum(x is not None for x in raw), len(raw))
            effective = [c.instance_prompt if x is None else x for x in captions]
            if message := identifier_nowhere_message(effective, c.identifier, f"{option} captions"):
                log.warning(message)
        return captions

    def _has_masks(self, c: ResolvedConcept, images: list[Path], announce: bool = False) -> bool:
        """Whether any photo has a loss mask (each is checked: readable, the photo's size, not all black)."""
        option = f"{c.option}.instance_data_dir"
        if tuple(images) not in self._mask_counts:  # each mask is checked (decoded) once per process
            self._mask_counts[tuple(images)] = check_masks(
                images, check_images(images, option), self.hparams.alpha_mask
            )
        found = self._mask_counts[tuple(images)]
        if announce and found:
            log.info("%s: %d of %d photos have a loss mask.", option, found, len(images))
        return found > 0

    def _photo_buckets(self, c: ResolvedConcept, images: list[Path], announce: bool = False) -> list[tuple[int, int]]:
        """Each photo's bucket (height, width), with ``data.buckets``."""
        from sd.models.loading import check_model_path

        hp = self.hparams
        option = f"{c.option}.instance_data_dir"
        step = resolve_step(hp.bucket_step, check_model_path(hp.pretrained_model_name_or_path), hp.resolution)
        sizes = [(h, w) for w, h in check_images(images, option)]
        found = assign_buckets(sizes, images, hp.resolution, step, hp.bucket_max_ratio, hp.bucket_no_upscale, option)
        if announce:
            counts = {b: found.count(b) for b in sorted(set(found))}
            shown = ", ".join(f"{w}x{h} ({n})" for (h, w), n in counts.items())
            log.info("data.buckets: %s: %d photos in %d bucket%s (width x height): %s.", option, len(found),
                     len(counts), "s" * (len(counts) > 1), shown)  # fmt: skip
        return found

    def _holdout_split(self, images: list[Path]) -> tuple[list[Path], list[Path], bool]:
        """(training photos, held-out photos, on_training_photos) by ``data.holdout``; all photos train when off."""
        return split_holdout(images, holdout_count(self.hparams.get("holdout"), len(images)))

    def _build_heldout_set(self) -> HeldOutSet:
        """The photos of the held-out loss, center-cropped at the training resolution, each with its caption."""
        hp = self.hparams
        c = self.concepts[0]  # one subject (data.holdout is refused with several concepts)
        images = check_image_folder(c.instance_data_dir, f"{c.option}.instance_data_dir", warn=False)
        _, held, on_training = self._holdout_split(images)
        if on_training:
            log.warning(
                "data.holdout=%s would leave fewer than %d of the %d photos to train on: none is held out, and val/loss "
                "is measured on the training photos at fixed noise and timesteps (how well they are fitted, not "
                "overfitting).",
                hp.holdout,
                MIN_TRAINING_PHOTOS,
                len(images),
            )
        else:
            log.info("data.holdout: %d of %d photos held out of training for val/loss.", len(held), len(images))
        captions = dict(zip(images, self._instance_captions(c, images) or [None] * len(images), strict=True))
        transform = image_transform(hp.resolution, center_crop=True, random_flip=False)
        pixels = torch.stack([transform(load_image(p)) for p in held])  # (N, 3, H, W)
        prompts = [captions[p] or c.instance_prompt for p in held]
        return HeldOutSet(pixels, prompts, on_training)

    def _build_train_dataset(self, c: ResolvedConcept) -> DreamBoothDataset:
        hp = self.hparams
        prior = hp.with_prior_preservation
        images = check_image_folder(c.instance_data_dir, f"{c.option}.instance_data_dir", warn=False)
        captions = self._instance_captions(c, images)  # read for the whole folder (a metadata file names every photo)
        if hp.get("holdout") is not None:  # the photos held out do not train
            kept = self._holdout_split(images)[0]
            captions = None if captions is None else [x for p, x in zip(images, captions, strict=True) if p in kept]
            images = kept
        return DreamBoothDataset(
            instance_images=images,
            instance_prompt=c.instance_prompt,
            instance_captions=captions,
            caption_dropout=hp.caption_dropout,
            shuffle_tags=hp.shuffle_tags,
            keep_tags=hp.keep_tags,
            masks=self._has_masks(c, images),
            alpha_mask=hp.alpha_mask,
            resolution=hp.resolution,
            class_images=self._class_images(c) if prior else None,
            class_prompt=c.class_prompt if prior else None,
            center_crop=hp.center_crop,
            random_flip=hp.random_flip,
        )

    def _build_caches(self) -> None:
        """Build the missing latent / text-embedding caches (setup() then reads them on every rank)."""
        self._training_data()

    def _training_data(self, announce: bool = False):
        """The dataset and collate function training reads: every concept's items (one concept: its dataset as it
        is), on cached latents and text embeddings where they apply."""
        hp = self.hparams
        parts, collate, prompts = [], None, []
        for c in self.concepts:
            dataset = self._build_train_dataset(c)
            data, collate = self._with_cached_images(c, dataset, announce)
            parts.append(data)
            own = dataset.training_prompts()  # one cache entry per distinct prompt
            prompts = None if own is None or prompts is None else prompts + own
        data = parts[0] if len(parts) == 1 else ConceptsDataset(parts, [c.repeats for c in self.concepts])
        model = (hp.pretrained_model_name_or_path, hp.revision, hp.variant)
        if hp.cache_text_embeddings and prompts is None and announce:
            log.info("data.shuffle_tags is on: the captions vary without end, so the text encoder runs every step.")
        if hp.cache_text_embeddings and prompts is not None:
            embeds, pooled = text_embedding_tables(
                prompts, *model, cache_dir=hp.cache_dir, single_file_config=hp.single_file_config
            )
            collate = WithTextEmbeddings(collate, embeds, pooled)
        return data, collate

    def _with_cached_images(self, c: ResolvedConcept, dataset: DreamBoothDataset, announce: bool = False):
        """A concept's dataset and the collate function: on cached latents where they apply, bucketed with buckets."""
        hp = self.hparams
        model = (hp.pretrained_model_name_or_path, hp.revision, hp.variant)
        sfc = hp.single_file_config
        data, collate = dataset, collate_dreambooth
        if hp.cache_latents and not hp.center_crop and announce:
            log.info("data.center_crop is false: random crops change the pixels, so latents are encoded every step.")
        if hp.buckets:  # each photo at its bucket; latents cached per bucket
            buckets = self._photo_buckets(c, dataset.instance_images)
            data = bucketed_dataset(dataset, buckets, hp.center_crop, hp.random_flip)
            if hp.cache_latents and hp.center_crop:
                data = cached_bucket_dataset(
                    data,
                    lambda paths, bucket, masks: latent_cache(
                        paths, hp.resolution, hp.random_flip, *model, cache_dir=hp.cache_dir, single_file_config=sfc,
                        bucket=bucket, vae=hp.get("vae"), masks=masks,
                    ),
                )  # fmt: skip
                collate = collate_latents
        elif hp.cache_latents and hp.center_crop:
            images = dataset.instance_images + (dataset.class_images or [])
            table = latent_cache(
                images,
                hp.resolution,
                hp.random_flip,
                *model,
                cache_dir=hp.cache_dir,
                single_file_config=sfc,
                vae=hp.get("vae"),
                masks=square_masks(dataset) if dataset.masks else None,
            )
            data, collate = CachedLatentDataset(dataset, table), collate_latents
        return data, collate

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("DreamBoothDataModule.train_dataloader() needs setup('fit') first.")
        trainer = self.trainer  # None outside a Trainer
        common = dict(
            batch_size=self.hparams.batch_size,
            seed=self.hparams.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
            epoch=trainer.current_epoch if trainer is not None else 0,
        )
        if self.hparams.buckets:  # every batch from one bucket: see datamodules/resumable.py
            return resumable_bucket_loader(self.train_dataset, self.train_dataset.bucket_ids, **common)
        # order = f(seed, epoch), resumable mid-epoch: see datamodules/resumable.py
        return resumable_train_loader(self.train_dataset, drop_last=False, **common)

    def val_dataloader(self) -> DataLoader:
        """The prompts to render, in order (Lightning spreads them across DDP ranks)."""
        if self.val_dataset is None:
            raise RuntimeError("DreamBoothDataModule.val_dataloader() needs setup('fit') or setup('validate') first.")
        return prompt_loader(self.val_dataset, self.hparams.validation_batch_size, collate_prompts)

    def predict_dataloader(self) -> DataLoader:
        """The prompts to render, with the condition image (Lightning spreads them across DDP ranks)."""
        if self.predict_dataset is None:
            raise RuntimeError("DreamBoothDataModule.predict_dataloader() needs setup('predict') first.")
        collate = partial(collate_predict, control_image=self.control)
        return prompt_loader(self.predict_dataset, self.hparams.validation_batch_size, collate)

    def test_dataloader(self) -> DataLoader:
        """Every subject's prompts (and class prompt), in order."""
        if self.test_dataset is None:
            raise RuntimeError("DreamBoothDataModule.test_dataloader() needs setup('test') first.")
        collate = partial(collate_eval, num_images=self.hparams.eval_num_images)
        return prompt_loader(self.test_dataset, self.hparams.validation_batch_size, collate)
