"""The batch contract between the DataModule and the LightningModule.

The collate functions produce exactly this; `DreamBoothModule.training_step` reads exactly this.
Which rows are prior-preservation (class) rows is said by an explicit mask, never by row order.

A batch carries each row's image in one of two forms: ``pixel_values`` (the VAE encodes them each step), or, when the
latent cache is on, the VAE's latent distribution (``latent_mean``, ``latent_std``), computed once before training,
from which the module samples ``latent_mean + latent_std * randn`` each step: the same training signal as encoding.
With a frozen text encoder it also carries ``prompt_embeds``, computed once per distinct prompt (and, for a family
whose UNet takes a pooled text embedding, SDXL, ``pooled_prompt_embeds``).

Every row also says where its pixels came from: ``original_sizes`` (the photo's size as read) and ``crop_top_lefts``
(where its crop lies in the resized photo). SDXL's UNet is conditioned on them (with the target size, the batch's
image size), as it was pretrained; the other families ignore them.
"""

from typing import TypedDict

from torch import Tensor


class _RequiredFields(TypedDict):
    prompts: list[str]  # (B,) the caption of each row
    is_prior: Tensor  # (B,) bool: True for class-image (prior-preservation) rows


class DreamBoothBatch(_RequiredFields, total=False):
    """One training batch of instance rows and, with prior preservation, class rows.

    Exactly one image form is present: ``pixel_values``, or ``latent_mean`` with ``latent_std``.
    """

    pixel_values: Tensor  # (B, 3, H, W) float32 in [-1, 1]
    latent_mean: Tensor  # (B, 4, H/f, W/f) float32: VAE latent mean x scaling_factor (f: the VAE's downscale)
    latent_std: Tensor  # (B, 4, H/f, W/f) float32: VAE latent std x scaling_factor
    prompt_embeds: Tensor  # (B, 77, D) float32: the frozen text encoder's last hidden states for each row's prompt
    # (SDXL: both encoders' penultimate hidden states, concatenated on the feature axis)
    pooled_prompt_embeds: Tensor  # (B, P) float32, SDXL with cached text embeddings: text_encoder_2's text_embeds
    original_sizes: (
        Tensor  # (B, 2) long: each row's photo (height, width) as read (after EXIF rotation), before resizing
    )
    crop_top_lefts: Tensor  # (B, 2) long: (top, left) of the row's crop in the resized photo (square crops: before any
    # flip; aspect-ratio buckets: in the flipped image when flipped)
    loss_weight: Tensor  # (B, 1, H, W) float32 in [0, 1], only with loss masks: each pixel's weight in the row's loss
    # (instance rows: the photo's mask, cropped and flipped as the photo; class rows: ones), reduced to the latent grid
    # by the loss; on cached latents it comes at latent size, (B, 1, h, w), already reduced (the latent cache holds it)
