"""DreamBoothModule: Lightning hooks only; the work is done by the Lightning-free components beside it."""

from __future__ import annotations

import gc
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from datamodules.batch import DreamBoothBatch
from lightning_modules.diffusion import (
    add_noise,
    diffusion_target,
    dreambooth_loss,
    encode_latents,
    encode_text,
    sample_latents,
    tokenize,
)
from lightning_modules.fused_optim import OptimizerInBackward, fused_backward_conflicts
from lightning_modules.lora import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, inject_lora, lora_config
from lightning_modules.memory import (
    AttentionName,
    apply_unet_savers,
    cast_frozen_,
    release_freed_cpu_memory,
    to_memory_format,
)
from lightning_modules.optim import OptimizerName, SchedulerName, build_lr_scheduler, build_optimizer, param_groups
from lightning_modules.sd_loading import SDComponents, load_components, load_part

# Lightning precision setting -> dtype in which the frozen modules are held and run.
FROZEN_DTYPES = {
    "16-mixed": torch.float16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-true": torch.bfloat16,
}


class DreamBoothModule(pl.LightningModule):
    """Fine-tunes Stable Diffusion 1.x on one subject with the DreamBooth objective, fully or with LoRA.

    Args:
        pretrained_model_name_or_path: The base model: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a
            local diffusers folder, or a built-in offline model (``builtin:tiny-sd``).
        revision: Hub revision (branch, tag or commit) of the base model.
        variant: Weight-file variant of the base model, e.g. ``fp16``.
        train_text_encoder: Also train the text encoder (fully, or with LoRA when ``use_lora``).
        use_lora: Train LoRA adapters (peft) instead of the full weights; the base model stays frozen.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is scaled by alpha / r. Defaults to the rank (scale 1).
        lora_dropout: Dropout on the LoRA branch.
        lora_target_modules: UNet modules that get an adapter (attention projections by default).
        lora_text_encoder_target_modules: Text-encoder modules that get an adapter.
        learning_rate: Learning rate of the UNet (its LoRA adapters or its full weights).
        text_encoder_lr: Learning rate of the text encoder; defaults to ``learning_rate``.
        optimizer: ``adamw``, or ``adamw8bit`` (bitsandbytes; optimizer state in 8 bits).
        adam_beta1: Adam beta1.
        adam_beta2: Adam beta2.
        adam_weight_decay: Decoupled weight decay.
        adam_epsilon: Adam epsilon.
        lr_scheduler: Learning-rate schedule after warmup: ``constant``, ``linear`` or ``cosine`` decay to 0 at the
            last step.
        lr_warmup_steps: Optimizer steps of linear warmup from 0.
        prior_loss_weight: Weight of the prior-preservation (class rows) term; 0 gives plain fine-tuning.
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
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        train_text_encoder: bool = False,
        use_lora: bool = True,
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
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        attention: AttentionName = "sdpa",
        channels_last: bool = False,
        compile_unet: bool = False,
        fused_backward: bool = False,
        trim_cpu_memory: bool = False,
    ) -> None:
        super().__init__()
        if use_lora:  # fail at config time, before any weight loads
            lora_config(lora_rank, lora_alpha, lora_dropout, lora_target_modules or UNET_TARGET_MODULES)
        if learning_rate <= 0 or (text_encoder_lr is not None and text_encoder_lr <= 0):
            raise ValueError("model.learning_rate and model.text_encoder_lr must be positive.")
        if prior_loss_weight < 0:
            raise ValueError(f"model.prior_loss_weight must be >= 0, got {prior_loss_weight}.")
        if fused_backward and use_lora:
            raise ValueError(
                "model.fused_backward is for full fine-tuning (model.use_lora false); LoRA's gradients are small."
            )
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"Unknown model.attention {attention!r}: choose 'sdpa' or 'eager'.")
        self.save_hyperparameters()
        self.parts: SDComponents | None = None  # loaded in configure_model
        # The VAE and a frozen text encoder are loaded on first use (see frozen()); None until then.
        self.unet = self.text_encoder = self.vae = None
        self._parked: dict[str, nn.Module] = {}  # frozen parts moved off an accelerator by release_frozen()
        # Checkpoints hold only the trained weights, so loading one is partial by design (see on_load_checkpoint).
        self.strict_loading = False

    # ----------------------------------------------------------------------------------------------- model set-up
    def setup(self, stage: str) -> None:
        if self.hparams.trim_cpu_memory:  # after the data module built its caches, before the model loads
            release_freed_cpu_memory()

    def configure_model(self) -> None:
        """Load the base model and mark what trains. Idempotent: Lightning may call it more than once."""
        if self.parts is not None:
            return
        hp = self.hparams
        # The VAE and a frozen text encoder load on first use: with cached inputs, never during training.
        parts = load_components(
            hp.pretrained_model_name_or_path,
            hp.revision,
            hp.variant,
            with_vae=False,
            with_text_encoder=hp.train_text_encoder,
        )
        if hp.use_lora:
            inject_lora(parts.unet, lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout, self._unet_targets))
            if hp.train_text_encoder:
                te_config = lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout, self._te_targets)
                inject_lora(parts.text_encoder, te_config)
        else:
            parts.unet.requires_grad_(True)
            if hp.train_text_encoder:
                parts.text_encoder.requires_grad_(True)
        if hp.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if hp.train_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()
        apply_unet_savers(parts.unet, hp.attention, hp.channels_last, hp.compile_unet)
        self._cast_frozen(parts.unet, parts.text_encoder)
        self.parts = parts
        # Registered as submodules so Lightning moves them, wraps them (DDP) and sees their parameters.
        self.unet, self.text_encoder = parts.unet, parts.text_encoder

    def frozen(self, name: Literal["vae", "text_encoder"]) -> nn.Module:
        """The VAE or the text encoder, loaded (in the frozen dtype, on this module's device) if it is not.

        Training needs them only for batches without cached latents / text embeddings; sampling needs them.
        """
        module = getattr(self, name)
        if module is None:
            module = self._parked.pop(name, None)
            if module is None:
                hp = self.hparams
                module = load_part(hp.pretrained_model_name_or_path, name, hp.revision, hp.variant)
                module.requires_grad_(False).eval()
                self._cast_frozen(module)
            module.to(self.device)
            setattr(self, name, module)
            setattr(self.parts, name, module)
        return module

    def sampling_parts(self) -> SDComponents:
        """All the parts, the frozen ones loaded: what a sampling pipeline (``build_pipeline``) needs."""
        self.frozen("vae")
        self.frozen("text_encoder")
        return self.parts

    def release_frozen(self) -> None:
        """Free the training device of the frozen VAE and text encoder: moved to the CPU (for a quick reuse by
        :meth:`frozen`) when training on an accelerator, dropped when training on the CPU."""
        names = ["vae"] + ([] if self.hparams.train_text_encoder else ["text_encoder"])
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

    @property
    def _unet_targets(self) -> list[str]:
        return self.hparams.lora_target_modules or UNET_TARGET_MODULES

    @property
    def _te_targets(self) -> list[str]:
        return self.hparams.lora_text_encoder_target_modules or TEXT_ENCODER_TARGET_MODULES

    def _cast_frozen(self, *models: nn.Module | None) -> None:
        """Hold frozen weights in the compute dtype under mixed precision; trained weights stay float32."""
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
        noisy_latents, noise, timesteps = add_noise(parts.noise_scheduler, latents)
        context = self._text_context(batch)  # (B, 77, D)
        model_pred = self.unet(to_memory_format(noisy_latents, hp.channels_last), timesteps, context).sample
        target = diffusion_target(parts.noise_scheduler, latents, noise, timesteps)
        terms = dreambooth_loss(model_pred, target, batch["is_prior"], hp.prior_loss_weight)
        bs = batch["is_prior"].shape[0]
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=bs)
        self.log("train/loss_instance", terms.instance, batch_size=bs)
        self.log("train/loss_prior", terms.prior, batch_size=bs)
        for group in self.optimizers().param_groups if self._trainer is not None else []:
            self.log(f"train/lr_{group['name']}", group["lr"], batch_size=bs)
        return terms.loss

    def _latents(self, batch: DreamBoothBatch) -> torch.Tensor:
        """(B, 4, h, w) latents: sampled from the cached distribution, or encoded by the VAE."""
        if "latent_mean" in batch:
            return sample_latents(batch["latent_mean"], batch["latent_std"])
        return encode_latents(self.frozen("vae"), batch["pixel_values"]).float()

    def _text_context(self, batch: DreamBoothBatch) -> torch.Tensor:
        """(B, 77, D) text embeddings: cached ones, or the text encoder's (with grad when it trains)."""
        train_te = self.hparams.train_text_encoder
        if "prompt_embeds" in batch:
            if train_te:
                raise ValueError(
                    "The batch carries cached text embeddings, but model.train_text_encoder is true: the text encoder "
                    "would get no gradient. Set data.cache_text_embeddings false (the CLI links it)."
                )
            return batch["prompt_embeds"]
        text_encoder = self.text_encoder if train_te else self.frozen("text_encoder")
        with torch.set_grad_enabled(train_te):
            return encode_text(text_encoder, tokenize(self.parts.tokenizer, batch["prompts"]))

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.unet, self.text_encoder, hp.learning_rate, hp.text_encoder_lr)
        betas = (hp.adam_beta1, hp.adam_beta2)
        if hp.fused_backward:
            t = self.trainer
            conflicts = fused_backward_conflicts(
                t.accumulate_grad_batches, t.gradient_clip_val, str(t.precision), t.world_size
            )
            if conflicts:
                raise ValueError(f"model.fused_backward cannot be combined with: {'; '.join(conflicts)}.")
            optimizer = OptimizerInBackward(
                groups, lambda g: build_optimizer(hp.optimizer, g, betas, hp.adam_weight_decay, hp.adam_epsilon)
            )
        else:
            optimizer = build_optimizer(hp.optimizer, groups, betas, hp.adam_weight_decay, hp.adam_epsilon)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_lr_scheduler(hp.lr_scheduler, optimizer, hp.lr_warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------- checkpoints
    def trained_state_keys(self) -> set[str]:
        """State-dict keys of the weights that train (LoRA adapters, or the full UNet / text encoder)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save only what is trained: the frozen base model is reloaded from its source on resume."""
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Loading is partial by design; make sure it is complete for what trains and matches this model."""
        saved = set(checkpoint["state_dict"])
        unknown = sorted(saved - set(self.state_dict()))
        missing = sorted(self.trained_state_keys() - saved)
        if unknown or missing:
            raise RuntimeError(
                "The checkpoint does not match this model's trained weights "
                f"({len(unknown)} unknown keys, e.g. {unknown[:3]}; {len(missing)} missing, e.g. {missing[:3]}). "
                "Was it made with other LoRA / train_text_encoder settings or another base model?"
            )
