"""DreamBoothModule: Lightning hooks only; the work is done by the Lightning-free components beside it."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from core.errors import CheckpointMismatchError, ConfigError
from core.rng_state import capture_rng_states, restore_rng_states
from datamodules.batch import DreamBoothBatch
from datamodules.evaluation import EvalBatch
from datamodules.predict import PredictBatch
from datamodules.validation import ValidationBatch
from lightning_modules.ema import TrainedWeightsEMA, check_ema_decay
from lightning_modules.fused_optim import OptimizerInBackward, fused_backward_conflicts
from lightning_modules.memory import (
    AttentionName,
    apply_unet_savers,
    cast_frozen_,
    release_freed_cpu_memory,
    to_memory_format,
)
from lightning_modules.numerics import NanPolicy, NonFiniteLossError, check_finite_weights, non_finite_loss_message
from lightning_modules.optim import (
    OptimizerName,
    SchedulerName,
    build_lr_scheduler,
    build_optimizer,
    check_optimizer_available,
    check_schedule,
    param_groups,
)
from sd.adapters.lora import (
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    AdapterName,
    adapter_config,
    inject_lora,
)
from sd.adapters.new_tokens import (
    NewTokenEmbedding,
    add_new_tokens,
    check_new_tokens,
    embedding_file_state,
    expand_identifier,
    load_embedding_file,
)
from sd.export.folder import load_lora_file
from sd.export.layout import resolve_lora_file
from sd.models.loading import SDComponents, check_vae_path, load_components, load_parts
from sd.render.controlnet import check_controlnet_fits, check_controlnet_for_model, load_controlnet
from sd.render.pipeline import build_pipeline
from sd.render.sampling import SamplingSettings, image_seed, render
from sd.training.diffusion import (
    TextConditioning,
    diffusion_target,
    dreambooth_loss,
    encode_latents,
    encode_prompts,
    sample_latents,
    unet_conditioning,
    unread_text_encoder_parts,
)
from sd.training.heldout import HELDOUT_SEED, HeldOutInputs, heldout_inputs, heldout_loss
from sd.training.loss_recipes import LossRecipe, draw_noisy_inputs, loss_row_weights

# Lightning precision setting -> dtype in which the frozen modules are held and run.
FROZEN_DTYPES = {
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}
# Precisions in which Lightning converts the whole module, trained weights included, to half: rendering only.
HALF_TRUE = {"16-true": "16-mixed", "bf16-true": "bf16-mixed"}


def check_training_precision(precision: str) -> None:
    """Refuse to train under ``16-true`` / ``bf16-true``: Lightning casts every weight to half there, the trained ones
    too, and AdamW's updates (and its epsilon, 1e-8, which is 0 in float16) are lost in half precision. The ``-mixed``
    settings hold the frozen weights in half precision as well and keep what trains in float32."""
    if str(precision) in HALF_TRUE:
        raise ConfigError(
            f"trainer.precision {precision} would train the weights themselves in half precision (Lightning converts "
            f"the whole model), where AdamW's small updates vanish. Use --trainer.precision {HALF_TRUE[str(precision)]}: "
            "frozen weights are held in half precision all the same, and what trains stays float32. "
            f"({precision} is fine for validate, test and predict, which only render.)"
        )


def clean_key(name: str) -> str:
    """A parameter's name as a full state dict writes it: without the prefixes that FSDP's and activation
    checkpointing's wrappers add (``unet._fsdp_wrapped_module.conv_in.weight`` -> ``unet.conv_in.weight``)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def without_padding(out: dict, batch: dict, num_images: int | torch.Tensor | None = None) -> dict | None:
    """A step's renders without those of padding prompts (``batch["is_padding"]``: a rank with fewer prompts than the
    others renders repeats so that every rank runs the same steps; datamodules/validation.py); None if none is left.

    ``num_images``: images per prompt (an int, or (P,) per prompt), by default ``len(out["prompts"]) // P``.
    """
    padding = batch.get("is_padding")
    if padding is None or not bool(padding.any()):
        return out
    if num_images is None:
        num_images = len(out["prompts"]) // len(padding)
    keep = (~padding).repeat_interleave(torch.as_tensor(num_images)).tolist()  # (P * n,) per image
    if not any(keep):
        return None
    rows = [k for k, kept in enumerate(keep) if kept]
    return {
        name: values[rows] if isinstance(values, torch.Tensor) else [values[k] for k in rows]
        for name, values in out.items()
    }


class DreamBoothModule(pl.LightningModule):
    """Fine-tunes Stable Diffusion (1.x, 2.x or SDXL: the family is told from the model's files, see
    :mod:`sd.models.families`) on one subject with the DreamBooth objective, fully or with LoRA.

    Args:
        pretrained_model_name_or_path: The base model: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a
            local diffusers folder, a single-file checkpoint as shared on model sites (``.safetensors``; ``.ckpt``
            only if it holds nothing but tensors), or a built-in offline model (``builtin:tiny-sd``).
        revision: Hub revision (branch, tag or commit) of the base model.
        variant: Weight-file variant of the base model, e.g. ``fp16``.
        single_file_config: For a single-file base model: a diffusers folder, hub id or ``builtin:<name>`` whose
            configs (architecture, tokenizer, scheduler) describe it; None: its family's (SD 1.5's, SD 2.1's or SDXL
            base 1.0's, the family told from the file's keys). A hub id's config files must be in the local cache when offline.
        vae: Another VAE than the base model's: a diffusers VAE folder or hub id (e.g. ``madebyollin/sdxl-vae-fp16-fix``,
            which runs in float16). Without it, SDXL's own VAE, which overflows in float16, is held in float32.
        train_text_encoder: Also train the text encoder (fully, or with LoRA when ``use_lora``); SDXL: both.
        use_lora: Train adapters (peft; ``adapter`` says which) instead of the full weights; the base model stays
            frozen.
        adapter: The adapter ``use_lora`` trains: ``lora`` (low-rank ``B A``), ``dora`` (LoRA plus a trained magnitude
            per output row: weight-decomposed LoRA), ``loha`` (LyCORIS LoHa: Hadamard product of two low-rank pairs),
            ``lokr`` (LyCORIS LoKr: Kronecker product of a small and a low-rank factor). ``lora_rank``, ``lora_alpha``
            and the target modules apply to each (scale alpha / rank); ``lora_dropout`` to lora and dora only.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r. Defaults to the rank (scale 1).
        lora_dropout: Dropout on the LoRA branch.
        lora_target_modules: UNet modules that get an adapter (attention projections by default).
        lora_text_encoder_target_modules: Text-encoder modules that get an adapter.
        learning_rate: Learning rate of the UNet (its LoRA adapters or its full weights).
        text_encoder_lr: Learning rate of the text encoder (SDXL: of both); defaults to ``learning_rate``.
        optimizer: ``adamw``; ``adamw8bit`` / ``paged_adamw8bit`` (bitsandbytes; state in 8 bits); ``lion`` /
            ``lion8bit`` / ``paged_lion8bit`` (bitsandbytes; usual: a 3-10x smaller learning rate and 3-10x larger
            weight decay than AdamW's, ``adam_beta2`` 0.99); ``adafactor`` (transformers, with this learning rate;
            ``adam_beta1`` is its beta1); ``prodigy`` (needs ``pip install prodigyopt``; usual: learning rate 1.0,
            ``adam_beta2`` 0.99).
        adam_beta1: Adam beta1.
        adam_beta2: Adam beta2.
        adam_weight_decay: Decoupled weight decay.
        adam_epsilon: Adam epsilon.
        lr_scheduler: Learning-rate schedule after warmup (diffusers' ``get_scheduler``): ``constant``, ``linear`` or
            ``cosine`` decay to 0 at the last step, ``cosine_with_restarts`` (``lr_num_cycles`` hard restarts),
            ``polynomial`` (decay of power ``lr_power`` to nearly 0).
        lr_num_cycles: Cycles of ``cosine_with_restarts``.
        lr_power: Power of ``polynomial`` decay (1: linear).
        lr_warmup_steps: Optimizer steps of linear warmup from 0.
        prior_loss_weight: Weight of the prior-preservation (class rows) term; 0 gives plain fine-tuning.
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; kohya's ``min_snr_gamma``, diffusers'
            ``--snr_gamma``): each row's squared error is weighted by min(SNR, gamma) / SNR (epsilon prediction) or
            min(SNR, gamma) / (SNR + 1) (v-prediction), class rows too. 5 is the usual value; null is off.
        noise_offset: Offset noise: ``noise_offset * N(0, 1)`` per row and channel added to the noise, so the model
            can learn darker or brighter images than average. 0.05-0.1 are usual; 0 is off.
        ema_decay: Keep an exponential moving average of the trained weights (decay per optimizer step, with
            diffusers' warmup ``min(decay, (1 + n) / (10 + n))``; 0.999 is usual, null is off). When on, validation
            renders during ``fit`` and the export use the average; checkpoints hold the raw weights and the average,
            and a resumed run continues it.
        input_perturbation: Noise the UNet's input with ``noise + input_perturbation * N(0, 1)`` while the target stays
            ``noise`` (Ning et al. 2023, against exposure bias). 0.1 is usual; 0 is off.
        gradient_checkpointing: Recompute activations in backward to save memory (UNet, and the text encoder when
            trained).
        attention: Attention kernel of the UNet: ``sdpa`` (torch's scaled_dot_product_attention, with flash /
            memory-efficient kernels where the device has them) or ``eager`` (matmul-softmax-matmul, which holds the
            whole attention matrix; for comparison).
        channels_last: Hold the UNet's conv weights and inputs as NHWC, which tensor-core GPUs and oneDNN CPUs run
            faster.
        compile_unet: Compile the UNet's forward with ``torch.compile`` (in place: names and checkpoints unchanged).
            The first steps are slow while it compiles.
        fused_backward: Full fine-tuning only: update each weight inside backward as soon as its gradient is ready,
            then free that gradient, so all gradients never exist at once (saves one float32 copy of the trained
            weights). Needs ``trainer.accumulate_grad_batches`` 1, no ``gradient_clip_val``, no ``16-mixed``, one
            process; refused otherwise.
        trim_cpu_memory: Linux (glibc): give freed CPU memory back to the system at once instead of keeping it for
            reuse, from set-up on. Lowers the peak resident memory of CPU training (the caches' encoders, loading
            and the first step no longer add up) at some cost in allocation speed. Process-wide.
        resolution: Training resolution in pixels; the default render size. Linked from ``data.resolution``.
        sampling: How validation, ``predict`` and ``test`` render images: images per prompt, guidance, steps,
            sampler, size, negative prompt, LoRA scales of the UNet and the text encoder.
        lora_weights: A LoRA export to render and evaluate with (``validate`` / ``test`` / ``predict``), instead of
            fresh adapters: the ``export`` folder that ``fit`` wrote, or its ``pytorch_lora_weights.safetensors``.
            Rank, alpha and targets come from the file. (A full fine-tune's export is a base model:
            ``--model.pretrained_model_name_or_path <export>/pipeline``.)
        controlnet: A ControlNet that ``predict`` renders with, made for the base model's family (a hub id such as
            ``lllyasviel/sd-controlnet-openpose`` for SD 1.x or ``thibaud/controlnet-openpose-sdxl-1.0`` for SDXL, a
            local folder, or ``builtin:tiny-controlnet`` / ``-sd2-controlnet`` / ``-sdxl-controlnet``), conditioned
            on ``data.control_image``.
        new_tokens: Pivotal tuning: new tokens (e.g. ``["<s0>", "<s1>"]``) added to the tokenizer, their embeddings
            trained beside the LoRA; each prompt's ``identifier`` word becomes them before the text encoder reads it.
            Linked from ``data.new_tokens``; null is off.
        new_token_init: A word whose embedding starts each new token's (e.g. the class noun); null: random, with the
            embedding table's mean and spread.
        new_token_lr: Learning rate of the new tokens' embeddings (textual inversion's usual 5e-4).
        identifier: The subject's identifier word in prompts; linked from ``data.identifier``.
        nan_policy: What a NaN or infinite loss does: ``stop`` raises an error naming the step (the weights are left
            as they were before it), ``skip`` skips that optimizer step with a warning. Unlike the other model
            options, the value given when resuming with ``--ckpt_path`` applies (the others come from the checkpoint).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        single_file_config: str | None = None,
        vae: str | None = None,
        train_text_encoder: bool = False,
        use_lora: bool = True,
        adapter: AdapterName = "lora",
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_text_encoder_target_modules: list[str] | None = None,
        learning_rate: float = 5e-5,
        text_encoder_lr: float | None = None,
        optimizer: OptimizerName = "adamw",
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_weight_decay: float = 1e-2,
        adam_epsilon: float = 1e-8,
        lr_scheduler: SchedulerName = "constant",
        lr_warmup_steps: int = 0,
        lr_num_cycles: int = 1,
        lr_power: float = 1.0,
        prior_loss_weight: float = 1.0,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        attention: AttentionName = "sdpa",
        channels_last: bool = False,
        compile_unet: bool = False,
        fused_backward: bool = False,
        trim_cpu_memory: bool = False,
        resolution: int = 512,
        sampling: SamplingSettings = SamplingSettings(),
        nan_policy: NanPolicy = "stop",
        lora_weights: str | None = None,
        controlnet: str | None = None,
        new_tokens: list[str] | None = None,
        new_token_init: str | None = None,
        new_token_lr: float = 5e-4,
        identifier: str = "sks",
    ) -> None:
        super().__init__()
        if use_lora:  # fail at config time, before any weight loads
            adapter_config(adapter, lora_rank, lora_alpha, lora_dropout, lora_target_modules or UNET_TARGET_MODULES)
        elif adapter != "lora":
            raise ConfigError(
                f"model.adapter {adapter} needs model.use_lora true (adapters train instead of the full weights)."
            )
        if learning_rate <= 0 or (text_encoder_lr is not None and text_encoder_lr <= 0):
            raise ConfigError("model.learning_rate and model.text_encoder_lr must be positive.")
        if prior_loss_weight < 0:
            raise ConfigError(f"model.prior_loss_weight must be >= 0, got {prior_loss_weight}.")
        check_optimizer_available(optimizer)  # before any weight loads
        check_schedule(lr_warmup_steps, lr_num_cycles, lr_power)
        check_ema_decay(ema_decay)
        self.loss_recipe = LossRecipe(snr_gamma, noise_offset, input_perturbation).check()
        if fused_backward and use_lora:
            raise ConfigError(
                "model.fused_backward is for full fine-tuning (model.use_lora false); LoRA's gradients are small."
            )
        if attention not in ("sdpa", "eager"):
            raise ConfigError(f"Unknown model.attention {attention!r}: choose 'sdpa' or 'eager'.")
        if nan_policy not in ("stop", "skip"):
            raise ConfigError(f"model.nan_policy must be 'stop' or 'skip', got {nan_policy!r}.")
        if lora_weights:
            resolve_lora_file(lora_weights)  # a missing export fails here, before any weight loads
        check_new_tokens(new_tokens)
        if new_tokens and not (use_lora or lora_weights):
            raise ConfigError(
                "data.new_tokens (pivotal tuning) trains the new tokens' embeddings beside LoRA adapters: set "
                "model.use_lora true (full fine-tuning with new tokens is not supported)."
            )
        if new_token_lr <= 0:
            raise ConfigError(f"model.new_token_lr must be positive, got {new_token_lr}.")
        if vae:
            check_vae_path(vae)  # a local path that holds no VAE fails here, before any work
        # Not a saved hyperparameter: LightningCLI restores those from a checkpoint on resume, and this one must be
        # changeable then (a run stopped by a NaN resumes with nan_policy=skip).
        self.save_hyperparameters(ignore=["nan_policy"])
        self.nan_policy = nan_policy
        # hparams hold a plain dict (for checkpoints and loggers); the module reads the typed settings.
        self.sampling = sampling if isinstance(sampling, SamplingSettings) else SamplingSettings(**sampling)
        self.parts: SDComponents | None = None  # loaded in configure_model
        # The VAE and a frozen text encoder are loaded on first use (see frozen()); None until then.
        self.unet = self.text_encoder = self.text_encoder_2 = self.vae = None
        self._parked: dict[str, nn.Module] = {}  # frozen parts moved off an accelerator by release_frozen()
        self._pipe = None  # a sampling pipeline around the live modules, built per validation / test / predict run
        self.controlnet = None  # loaded in configure_model when model.controlnet is set
        # Checkpoints hold only the trained weights, so loading one is partial by design (see on_load_checkpoint).
        self.strict_loading = False
        self._skip_optimizer_step = False  # set by a non-finite loss under nan_policy="skip"
        self._rng_states_to_restore: dict | None = None  # from a checkpoint, applied when training starts
        self.ema: TrainedWeightsEMA | None = None  # made in configure_model when model.ema_decay is set
        self._ema_context = None  # the EMA swapped in for a validation run
        self._heldout_inputs: HeldOutInputs | None = None  # fixed inputs of val/loss, made at the first validation

    # ----------------------------------------------------------------------------------------------- model set-up
    def configure_model(self) -> None:
        """Load the base model and mark what trains. Idempotent: Lightning may call it more than once."""
        if self.parts is not None:
            return
        hp = self.hparams
        if hp.controlnet:  # a ControlNet of another family (SDXL / SD 1.x, 2.x) is refused before anything loads
            check_controlnet_for_model(hp.controlnet, hp.pretrained_model_name_or_path, hp.revision)
        # The VAE and a frozen text encoder load on first use: with cached inputs, never during training. A LoRA export
        # may hold text-encoder adapters, so rendering with one loads the text encoder now.
        parts = load_components(
            hp.pretrained_model_name_or_path,
            hp.revision,
            hp.variant,
            hp.single_file_config,
            with_vae=False,
            with_text_encoder=self._text_encoder_held,
            vae=hp.get("vae"),
        )
        text_encoders = [te for te in parts.text_encoder_list() if te is not None]  # SDXL: both
        for text_encoder in text_encoders:
            text_encoder.requires_grad_(False)
        if hp.lora_weights:  # trained adapters from an export, frozen: for rendering and evaluation
            load_lora_file(parts.unet, parts.text_encoder, hp.lora_weights, text_encoder_2=parts.text_encoder_2)
        elif hp.use_lora:
            adapter = hp.get("adapter", "lora")  # checkpoints from before model.adapter trained LoRA
            settings = (hp.lora_rank, hp.lora_alpha, hp.lora_dropout)
            inject_lora(parts.unet, adapter_config(adapter, *settings, self._unet_targets))
            if hp.train_text_encoder:
                for text_encoder in text_encoders:
                    inject_lora(text_encoder, adapter_config(adapter, *settings, self._te_targets))
        else:
            parts.unet.requires_grad_(True)
            if hp.train_text_encoder:
                for text_encoder in text_encoders:
                    text_encoder.requires_grad_(True)
        for module in unread_text_encoder_parts(parts.family, text_encoders):  # SDXL: the first encoder's last layer
            module.requires_grad_(False)
        if hp.get("new_tokens"):  # pivotal tuning: the new tokens' rows train (from an export: rendering)
            embs = [  # each tokenizer gets the tokens, each text encoder rows of its own (SDXL: both)
                add_new_tokens(tokenizer, text_encoder, hp.new_tokens, hp.new_token_init)
                for tokenizer, text_encoder in zip(parts.tokenizer_list(), parts.text_encoder_list(), strict=True)
            ]
            if hp.lora_weights:
                load_embedding_file(embs, resolve_lora_file(hp.lora_weights).parent, parts.family.embedding_keys)
        if hp.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if hp.train_text_encoder:
                for text_encoder in text_encoders:
                    text_encoder.gradient_checkpointing_enable()
        if hp.controlnet:
            self.controlnet = load_controlnet(hp.controlnet)
            check_controlnet_fits(self.controlnet, parts.unet, hp.controlnet)
        apply_unet_savers(parts.unet, hp.attention, hp.channels_last, hp.compile_unet)
        self._cast_frozen(parts.unet, *text_encoders, self.controlnet)
        self.parts = parts
        # Registered as submodules so Lightning moves them, wraps them (DDP) and sees their parameters.
        self.unet, self.text_encoder = parts.unet, parts.text_encoder
        if parts.text_encoder_2 is not None:
            self.text_encoder_2 = parts.text_encoder_2
        if hp.get("ema_decay") and not hp.lora_weights:
            trained = {name: p for name, p in self.named_parameters() if p.requires_grad}
            self.ema = TrainedWeightsEMA(trained, hp.ema_decay)

    @property
    def _text_encoder_held(self) -> bool:
        """Whether the text encoder is loaded with the model and kept: it trains (fully, with LoRA, or its new tokens'
        rows), or an export's adapters or new tokens are in it."""
        hp = self.hparams
        return bool(hp.train_text_encoder or hp.lora_weights or hp.get("new_tokens"))

    @property
    def _text_encoder_trains(self) -> bool:
        return bool(
            self.hparams.train_text_encoder or (self.hparams.get("new_tokens") and not self.hparams.lora_weights)
        )

    def new_token_embeddings(self) -> list[NewTokenEmbedding]:
        """Each text encoder's token embedding with the new tokens' rows (data.new_tokens); empty without them."""
        if self.parts is None:
            return []
        encoders = [getattr(self, name) for name in self.parts.family.text_encoders]
        embs = [te.get_input_embeddings() if te is not None else None for te in encoders]
        return [e for e in embs if isinstance(e, NewTokenEmbedding)]

    def new_token_state(self) -> dict[str, torch.Tensor] | None:
        """The export's embedding file (the family's keys: ``emb_params``; SDXL ``clip_l`` / ``clip_g``), or None
        without new tokens."""
        embs = self.new_token_embeddings()
        return embedding_file_state(embs, self.parts.family.embedding_keys) if embs else None

    def text_for_encoder(self, prompts: list[str]) -> list[str]:
        """Prompts as the text encoder reads them: the identifier word becomes the new tokens (data.new_tokens)."""
        hp = self.hparams
        return [expand_identifier(p, hp.get("identifier", "sks"), hp.get("new_tokens")) for p in prompts]

    def averaged_weights(self):
        """A context in which the trained weights are their EMA (model.ema_decay), or unchanged when it is off."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def frozen(self, name: Literal["vae", "text_encoder", "text_encoder_2"]) -> nn.Module:
        """The VAE or a text encoder, loaded (in the frozen dtype, on this module's device) if it is not.

        Training needs them only for batches without cached latents / text embeddings; sampling needs them.
        """
        self._hold_frozen([name])
        return getattr(self, name)

    def sampling_parts(self) -> SDComponents:
        """All the parts, the frozen ones loaded: what a sampling pipeline (``build_pipeline``) needs."""
        self._hold_frozen(["vae", *self.parts.family.text_encoders])
        return self.parts

    def _hold_frozen(self, names: list[str]) -> None:
        """Make ``names`` held on this module's device: from the CPU park, or loaded together in one read."""
        hp = self.hparams
        to_load = [n for n in names if getattr(self, n) is None and n not in self._parked]
        model = (hp.pretrained_model_name_or_path, to_load, hp.revision, hp.variant, hp.single_file_config)
        loaded = load_parts(*model, hp.get("vae")) if to_load else {}
        for name in names:
            if getattr(self, name) is not None:
                continue
            module = self._parked.pop(name, None)
            if module is None:
                module = loaded[name].requires_grad_(False).eval()
                if not (name == "vae" and self._vae_in_float32):
                    self._cast_frozen(module)
            module.to(self.device)
            setattr(self, name, module)
            setattr(self.parts, name, module)

    def release_frozen(self) -> None:
        """Free the training device of the frozen VAE and text encoder: moved to the CPU (for a quick reuse by
        :meth:`frozen`) when training on an accelerator, dropped when training on the CPU."""
        names = ["vae"] + ([] if self._text_encoder_held else list(self.parts.family.text_encoders))
        for name in names:
            module = getattr(self, name)
            if module is None:
                continue
            setattr(self, name, None)
            setattr(self.parts, name, None)
            if self.device.type != "cpu":
                self._parked[name] = module.to("cpu")
            del module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def setup(self, stage: str) -> None:
        if stage == "fit":  # the CLI checks this before anything runs (train.py); here for other callers
            check_training_precision(str(self.trainer.precision))
        if stage == "fit" and self.hparams.lora_weights:
            raise ConfigError(
                "model.lora_weights loads a finished export for validate / test / predict; fit trains fresh adapters. "
                "To continue training a run, resume it with --ckpt_path <run dir>/checkpoints/last.ckpt."
            )
        if self.hparams.trim_cpu_memory:  # after the data module built its caches, before the model loads
            release_freed_cpu_memory()

    @property
    def _unet_targets(self) -> list[str]:
        return self.hparams.lora_target_modules or UNET_TARGET_MODULES

    @property
    def _te_targets(self) -> list[str]:
        return self.hparams.lora_text_encoder_target_modules or TEXT_ENCODER_TARGET_MODULES

    @property
    def _vae_in_float32(self) -> bool:
        """Whether the VAE stays float32 whatever the precision: the family's own VAE overflows in float16 (SDXL's),
        and no other VAE was given (``model.vae``)."""
        return self.parts.family.vae_in_float32 and not self.hparams.get("vae")

    def _cast_frozen(self, *models: nn.Module | None) -> None:
        """Hold frozen weights in the compute dtype under a half precision; under ``*-mixed`` trained weights stay
        float32 (training under ``*-true`` is refused: :func:`check_training_precision`)."""
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        dtype = FROZEN_DTYPES.get(precision)
        if dtype is None:
            return
        for model in models:
            if model is not None:
                cast_frozen_(model, dtype)  # one weight at a time, so float32 and half copies never all coexist

    # ----------------------------------------------------------------------------------------------- training
    def training_step(self, batch: DreamBoothBatch, batch_idx: int) -> torch.Tensor:
        parts, hp = self.parts, self.hparams
        latents = self._latents(batch)  # (B, 4, h, w)
        noisy_latents, noise, timesteps = draw_noisy_inputs(parts.noise_scheduler, latents, self.loss_recipe)
        context, extra = self.unet_condition(batch, latents)  # (B, 77, D); SDXL's added conditioning, else none
        x = to_memory_format(noisy_latents, hp.channels_last)
        model_pred = self.unet(x, timesteps, context, **extra).sample
        target = diffusion_target(parts.noise_scheduler, latents, noise, timesteps)
        weights = loss_row_weights(parts.noise_scheduler, timesteps, self.loss_recipe)  # None unless min-SNR
        loss_weight = batch.get("loss_weight")  # per-pixel loss masks, or None
        terms = dreambooth_loss(model_pred, target, batch["is_prior"], hp.prior_loss_weight, loss_weight, weights)
        bs = batch["is_prior"].shape[0]
        self._check_loss(terms._asdict(), batch_idx)
        if self._skip_optimizer_step and hp.fused_backward:  # its optimizer steps inside backward: skip backward
            self._skip_optimizer_step = False
            return None
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=bs)
        self.log("train/loss_instance", terms.instance, batch_size=bs)
        self.log("train/loss_prior", terms.prior, batch_size=bs)
        for group in self.optimizers().param_groups if self._trainer is not None else []:
            self.log(f"train/lr_{group['name']}", group["lr"], batch_size=bs)
        return terms.loss

    def _check_loss(self, terms: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Stop (raise) or mark the optimizer step to be skipped when the loss is not finite; all ranks agree."""
        finite = bool(torch.isfinite(terms["loss"]))
        if self._trainer is not None:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        message = non_finite_loss_message(self.global_step + 1, self.current_epoch, batch_idx, terms)
        if self.nan_policy == "stop":
            raise NonFiniteLossError(message)
        rank_zero_warn(f"{message} Skipping this optimizer step (model.nan_policy=skip).")
        self._skip_optimizer_step = True

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_optimizer_step:  # no gradient: the optimizer leaves every weight and its state as they are
            optimizer.zero_grad(set_to_none=True)
            self._skip_optimizer_step = False

    def _latents(self, batch: DreamBoothBatch) -> torch.Tensor:
        """(B, 4, h, w) latents: sampled from the cached distribution, or encoded by the VAE."""
        if "latent_mean" in batch:
            return sample_latents(batch["latent_mean"], batch["latent_std"])
        vae = self.frozen("vae")
        if self._vae_in_float32:  # not even autocast may run it in half precision
            with torch.autocast(self.device.type, enabled=False):
                return encode_latents(vae, batch["pixel_values"]).float()
        return encode_latents(vae, batch["pixel_values"]).float()

    def unet_condition(self, batch: DreamBoothBatch, latents: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """What the UNet is conditioned on besides the noisy latents and timesteps: the (B, 77, D) text context, and
        the keyword arguments of the family's added conditioning (SDXL: the pooled embedding and each row's time ids,
        from the batch's sizes and crops and the latents' image size; none for SD 1.x / 2.x)."""
        text = self._text_conditioning(batch)
        target_size = tuple(side * self.parts.vae_scale_factor for side in latents.shape[-2:])
        sizes = (batch["original_sizes"], batch["crop_top_lefts"]) if "original_sizes" in batch else None
        return text.context, unet_conditioning(self.parts.family, text, sizes, target_size)

    def _text_conditioning(self, batch: DreamBoothBatch) -> TextConditioning:
        """The UNet's text conditioning: cached embeddings, or the text encoders' (with grad when they train)."""
        train_te = self._text_encoder_trains
        if "prompt_embeds" in batch:
            if train_te:
                raise ConfigError(
                    "The batch carries cached text embeddings, but model.train_text_encoder is true: the text encoder "
                    "would get no gradient. Set data.cache_text_embeddings false (the CLI links it)."
                )
            return TextConditioning(batch["prompt_embeds"], batch.get("pooled_prompt_embeds"))
        names = self.parts.family.text_encoders
        if not train_te:
            self._hold_frozen(list(names))  # loaded together: a single file is read once for both of SDXL's
        encoders = [getattr(self, name) for name in names]
        with torch.set_grad_enabled(train_te):
            prompts = self.text_for_encoder(batch["prompts"])  # the identifier as the new tokens, if any
            return encode_prompts(self.parts.family, self.parts.tokenizer_list(), encoders, prompts)

    def configure_optimizers(self):
        hp = self.hparams
        new_rows = [emb.new for emb in self.new_token_embeddings() if emb.new.requires_grad]
        groups = param_groups(
            self.unet, self.text_encoder, hp.learning_rate, hp.text_encoder_lr, self.text_encoder_2,
            new_tokens=new_rows, new_token_lr=hp.new_token_lr,
        )  # fmt: skip
        betas = (hp.adam_beta1, hp.adam_beta2)
        if hp.fused_backward:
            t = self.trainer
            conflicts = fused_backward_conflicts(
                t.accumulate_grad_batches, t.gradient_clip_val, str(t.precision), t.world_size
            )
            if conflicts:
                raise ConfigError(f"model.fused_backward cannot be combined with: {'; '.join(conflicts)}.")
            optimizer = OptimizerInBackward(
                groups, lambda g: build_optimizer(hp.optimizer, g, betas, hp.adam_weight_decay, hp.adam_epsilon)
            )
        else:
            optimizer = build_optimizer(hp.optimizer, groups, betas, hp.adam_weight_decay, hp.adam_epsilon)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_lr_scheduler(
            hp.lr_scheduler, optimizer, hp.lr_warmup_steps, total, hp.lr_num_cycles, hp.lr_power
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, not in on_train_batch_end: callbacks (checkpoints) run before that hook
            self.ema.update()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Asking to stop at the last step makes Lightning validate there too, so every run ends with a grid.
        if self.trainer.max_steps > 0 and self.trainer.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    # ----------------------------------------------------------------------------------------------- rendering
    def _swap_in_ema(self) -> None:
        """Render with the EMA of the trained weights (model.ema_decay, or a checkpoint's) until :meth:`_swap_out_ema`:
        the export holds the average, so every render of the trained model does too."""
        if self.ema is not None and self._ema_context is None:
            self._ema_context = self.ema.swapped_in()
            self._ema_context.__enter__()

    def _swap_out_ema(self) -> None:
        """The raw trained weights back (before checkpoints are saved and training goes on)."""
        if self._ema_context is not None:
            self._ema_context.__exit__(None, None, None)
            self._ema_context = None

    def on_validation_epoch_start(self) -> None:
        self._swap_in_ema()
        self._pipe = build_pipeline(self.sampling_parts(), self.sampling.sampler)

    def validation_step(self, batch: ValidationBatch, batch_idx: int) -> dict | None:
        """Render ``num_images_per_prompt`` images per prompt with fixed seeds; callbacks grid and score them."""
        return without_padding(self._render_prompts(batch, self.sampling.num_images_per_prompt), batch)

    def on_validation_epoch_end(self) -> None:
        self._log_heldout_loss()  # with the weights the renders used (the EMA's, when on)
        self._pipe = None
        self._swap_out_ema()
        if self.trainer.state.fn == "fit":  # training goes on: the frozen parts leave the training device again
            self.release_frozen()

    def _log_heldout_loss(self) -> None:
        """``val/loss``: the fixed-noise denoising loss on the photos ``data.holdout`` keeps out of training."""
        datamodule = getattr(self.trainer, "datamodule", None)
        heldout = getattr(datamodule, "heldout", None)
        if heldout is None:
            return
        parts = self.sampling_parts()  # VAE and text encoder on this device (validation loaded them to render)
        if self._heldout_inputs is None:  # the same inputs at every validation of this run
            self._heldout_inputs = heldout_inputs(parts.vae, parts.noise_scheduler, heldout, HELDOUT_SEED)
        loss = heldout_loss(self._denoise, parts.noise_scheduler, self._heldout_inputs)  # the same on every rank
        # As the val/* metrics are (callbacks/metrics.py): at the optimizer step the weights are from, 0 = the base
        # model (Lightning's own logging drops the sanity check's baseline); ModelCheckpoint can monitor it.
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics({"val/loss": loss.item()}, step=self.global_step)
        if not self.trainer.sanity_checking:
            self.trainer.callback_metrics["val/loss"] = loss

    @torch.no_grad()
    def _denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The UNet's prediction for ``prompts`` (no gradient), under the frozen weights' dtype. SDXL's size
        conditioning: the held-out photos are center crops at the training size (original size = target, no crop)."""
        parts = self.parts
        encoders = [getattr(self, name) for name in parts.family.text_encoders]
        text = encode_prompts(parts.family, parts.tokenizer_list(), encoders, self.text_for_encoder(prompts))
        size = tuple(side * parts.vae_scale_factor for side in noisy_latents.shape[-2:])
        rows = noisy_latents.shape[0]
        sizes = (torch.tensor([size] * rows), torch.zeros(rows, 2, dtype=torch.long))  # (B, 2) each
        kwargs = unet_conditioning(parts.family, text, sizes, size)
        dtype = next((p.dtype for p in self.unet.parameters() if not p.requires_grad), torch.float32)
        autocast = dtype in (torch.float16, torch.bfloat16)
        latents = to_memory_format(noisy_latents, self.hparams.channels_last)
        with torch.autocast(self.device.type, dtype=dtype, enabled=autocast):
            return self.unet(latents, timesteps, text.context, **kwargs).sample

    def on_test_epoch_start(self) -> None:
        self._swap_in_ema()
        self._pipe = build_pipeline(self.sampling_parts(), self.sampling.sampler)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> dict | None:
        """The evaluation protocol's renders: ``num_images`` per prompt, for the subject of each prompt."""
        out = self._render_prompts(batch, batch["num_images"])
        out["subject_index"] = batch["subject_index"].repeat_interleave(batch["num_images"]).tolist()
        return without_padding(out, batch, batch["num_images"])

    def on_test_epoch_end(self) -> None:
        self._pipe = None
        self._swap_out_ema()

    def on_predict_epoch_start(self) -> None:
        self._swap_in_ema()
        self._pipe = build_pipeline(self.sampling_parts(), self.sampling.sampler, self.controlnet)

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> dict | None:
        """Render ``num_images_per_prompt`` images per prompt (with the ControlNet condition, if any)."""
        control = batch["control_image"]
        if (control is None) != (self.controlnet is None):
            raise ConfigError(
                "model.controlnet and data.control_image go together: a ControlNet renders from a condition image "
                f"(model.controlnet={self.hparams.controlnet!r}, data.control_image is "
                f"{'not ' if control is None else ''}set)."
            )
        return without_padding(self._render_prompts(batch, self.sampling.num_images_per_prompt, control), batch)

    def on_predict_epoch_end(self) -> None:
        self._pipe = None
        self._swap_out_ema()

    def _render_prompts(self, batch: ValidationBatch, n: int, control_image: torch.Tensor | None = None) -> dict:
        """``n`` images per prompt of the batch, image ``j`` of a prompt seeded by the prompt's seed and ``j``."""
        prompts = [p for p in batch["prompts"] for _ in range(n)]  # (P * n,)
        seeds = [image_seed(int(ps), j) for ps in batch["prompt_seed"] for j in range(n)]
        height, width = self.render_size()
        text = self.text_for_encoder(prompts)  # the identifier as the new tokens, if any
        images = render(self._pipe, text, seeds, self.sampling, height, width, control_image)  # (P*n, 3, H, W)
        return {
            "images": images.cpu(),
            "prompts": prompts,
            "seeds": seeds,
            "prompt_index": batch["prompt_index"].repeat_interleave(n).tolist(),
            "image_index": list(range(n)) * len(batch["prompts"]),
            "is_class_prompt": batch["is_class_prompt"].repeat_interleave(n).tolist(),
        }

    def render_size(self) -> tuple[int, int]:
        """(height, width) of renders: the sampling settings', else the training resolution."""
        s = self.sampling
        return s.height or self.hparams.resolution, s.width or self.hparams.resolution

    def render_settings(self) -> dict:
        """What renders were made with, for image metadata and reports (the resolved settings, not the options)."""
        hp, s = self.hparams, self.sampling
        height, width = self.render_size()
        lora = hp.lora_weights is not None or hp.use_lora
        return {
            "base_model": hp.pretrained_model_name_or_path,
            "lora_weights": hp.lora_weights,
            "lora_scale": s.lora_scale if lora else None,
            "lora_text_encoder_scale": s.text_encoder_scale if lora else None,
            "controlnet": hp.controlnet,
            "controlnet_conditioning_scale": s.controlnet_conditioning_scale if hp.controlnet else None,
            "sampler": s.sampler,
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "negative_prompt": s.negative_prompt,
            "height": height,
            "width": width,
        }

    # ----------------------------------------------------------------------------------------------- checkpoints
    def trained_state_keys(self) -> set[str]:
        """State-dict keys of the weights that train (LoRA adapters, or the full UNet / text encoder), as a full state
        dict names them (without the prefixes of FSDP's wrappers)."""
        return {clean_key(name) for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save only what is trained: the frozen base model is reloaded from its source on resume."""
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        check_finite_weights(checkpoint["state_dict"], self.global_step)  # never replace a good checkpoint
        checkpoint["rng_states"] = capture_rng_states()  # so that a resumed run draws the same noise
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is partial by design; make sure it is complete for what trains and matches this model.

        FSDP and DeepSpeed load the weights themselves and remove ``state_dict`` before this hook: their keys are
        checked by the strategy (``SafeFSDPStrategy``), or by DeepSpeed's own loader.
        """
        if "state_dict" in checkpoint:
            self.check_checkpoint_keys(set(checkpoint["state_dict"]))
        self._rng_states_to_restore = checkpoint.get("rng_states")
        if self.ema is None and "ema" in checkpoint and self.trainer.state.fn != "fit":
            # validate / test / predict from a checkpoint of a run with EMA render its average, as its export holds,
            # whether or not model.ema_decay is set now (a resumed fit without it trains on without an average).
            trained = {name: p for name, p in self.named_parameters() if p.requires_grad}
            self.ema = TrainedWeightsEMA(trained, checkpoint["ema"].get("decay", 0.999))
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise CheckpointMismatchError(
                    "model.ema_decay is set but the checkpoint holds no EMA: it was saved by a run without it. "
                    "Resume with the run's own settings."
                )
            self.ema.load_state_dict(checkpoint["ema"])

    def check_checkpoint_keys(self, saved: set[str]) -> None:
        """Raise :class:`CheckpointMismatchError` unless ``saved`` holds every trained weight and nothing unknown."""
        named = [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]
        known = {clean_key(name) for name, _ in named}
        unknown = sorted(saved - known)
        missing = sorted(self.trained_state_keys() - saved)
        if unknown or missing:
            raise CheckpointMismatchError(
                "The checkpoint does not match this model's trained weights "
                f"({len(unknown)} unknown keys, e.g. {unknown[:3]}; {len(missing)} missing, e.g. {missing[:3]}). "
                "Was it made with other LoRA / train_text_encoder settings or another base model?"
            )

    def on_train_start(self) -> None:
        if self._rng_states_to_restore is not None:  # restored last, after everything that set up the run
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None
