"""DreamBench subject metrics as torchmetrics ``Metric``s: DINO / CLIP-I, CLIP-T, PRES and DIV.

Every state is a sum (``dist_reduce_fx="sum"``), so the metrics synchronize under DDP and merge with
``merge_state``; ``compute()`` divides the summed similarity by the summed count, i.e. the mean over all
pairs seen on all ranks.

The frozen encoders (and the LPIPS network) are *not* submodules: they are held in plain attributes
(``object.__setattr__``), so they stay out of ``state_dict()`` and hence out of Lightning checkpoints (a DINO
or CLIP model in every checkpoint would be hundreds of MB of weights that are never trained), out of
``.parameters()`` and out of ``.train()``. They still follow the metric: ``metric.to(device)`` moves them
(device only, they keep their dtype). One encoder instance may be shared by several metrics.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from metrics.encoders import ClipEncoder, ImageEncoder, check_images

_LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def strip_identifier(prompt: str, identifier: str) -> str:
    """Remove the identifier token (as a whole word) from a prompt and collapse the spaces around it.

    CLIP-T scores a generated image against its prompt without the rare identifier token, which means
    nothing to CLIP: ``strip_identifier("a photo of sks dog", "sks") == "a photo of dog"``.
    """
    if not identifier.strip():
        raise ValueError("identifier must be a non-empty token")
    out = re.sub(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)", " ", prompt)
    out = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(out.split()))
    return out


def _embed_references(encoder: ImageEncoder, images: Tensor | Sequence[Tensor]) -> Tensor:
    """Embed reference images given as one batch (N, 3, H, W) or a sequence of (3, H, W) / (n, 3, H, W) tensors
    of different sizes (real photos); returns (N, D)."""
    if isinstance(images, Tensor):
        return encoder(images)
    parts = [encoder(im.unsqueeze(0) if im.ndim == 3 else im) for im in images]
    if not parts:
        raise ValueError("at least one reference image is needed")
    return torch.cat(parts)


class _HeldModelsMetric(Metric):
    """A Metric that uses frozen models without owning them as submodules (see the module docstring)."""

    full_state_update = False
    is_differentiable = False

    def _hold(self, name: str, module: nn.Module) -> None:
        object.__setattr__(self, name, module)  # bypass nn.Module registration: not in state_dict / parameters
        object.__setattr__(self, "_held_names", (*getattr(self, "_held_names", ()), name))

    def _apply(self, fn, exclude_state: Sequence[str] = ""):  # type: ignore[override]
        this = super()._apply(fn, exclude_state)
        for name in getattr(this, "_held_names", ()):
            getattr(this, name).to(this.device)
        return this


class SubjectFidelity(_HeldModelsMetric):
    """All-pairs mean cosine similarity between generated and reference (real subject) images.

    DreamBench's DINO (with a :class:`~metrics.encoders.DinoEncoder`) and CLIP-I (with a
    :class:`~metrics.encoders.ClipEncoder`). Higher is better; 1.0 only for identical images.
    The reference embeddings are computed once, at construction, and kept as a non-persistent buffer
    (moved by ``.to()``, not saved in checkpoints, recomputed identically on every rank).
    """

    higher_is_better = True
    reference_embeddings: Tensor

    def __init__(self, encoder: ImageEncoder, reference_images: Tensor | Sequence[Tensor]) -> None:
        """Args:
        encoder: the frozen image encoder (held, not owned: see the module docstring).
        reference_images: the subject's real images, float in [0, 1]: one batch (N, 3, H, W), or a sequence of
            (3, H, W) tensors of different sizes.
        """
        super().__init__()
        self._hold("encoder", encoder)
        embeddings = _embed_references(encoder, reference_images).to(self.device)  # (R, D), with the states
        self.register_buffer("reference_embeddings", embeddings, persistent=False)
        self.add_state("cos_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("pair_count", default=torch.tensor(0), dist_reduce_fx="sum")

    @property
    def num_references(self) -> int:
        return self.reference_embeddings.shape[0]

    def update(self, images: Tensor) -> None:
        """Add the cosines of all (generated, reference) pairs; ``images``: (N, 3, H, W) float in [0, 1]."""
        ref = self.reference_embeddings  # (R, D)
        emb = self.encoder(images).to(ref)  # (N, D)
        cos = emb @ ref.T  # (N, R)
        self.last_per_image = cos.mean(dim=1).detach()  # (N,) for per-image tables; not a state, never synced
        self.cos_sum += cos.sum().to(self.cos_sum)
        self.pair_count += cos.numel()

    def compute(self) -> Tensor:
        return self.cos_sum / self.pair_count


class PreservationScore(SubjectFidelity):
    """PRES (prior preservation, **lower is better**): DINO all-pairs similarity between the subject's real images
    and images the fine-tuned model makes for the bare class prompt ("a photo of dog", no identifier).

    A high score means the class prior collapsed onto the subject (language drift). Construct it with a
    :class:`~metrics.encoders.DinoEncoder` and the real subject images; update it with class-prompt images.
    """

    higher_is_better = False


class PromptFidelity(_HeldModelsMetric):
    """CLIP-T: mean cosine similarity between each generated image and the CLIP embedding of its prompt.

    Pass prompts with the identifier removed (:func:`strip_identifier`). Reports raw cosines (not x100 or
    x2.5); a report must name the CLIP model (``encoder.name``). Higher is better.
    """

    higher_is_better = True

    def __init__(self, encoder: ClipEncoder) -> None:
        """Args:
        encoder: a CLIP encoder with an image side (``forward``) and a text side (``encode_text``).
        """
        super().__init__()
        self._hold("encoder", encoder)
        self.add_state("cos_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        """``images``: (N, 3, H, W) float in [0, 1]; ``prompts``: N strings, the prompt of each image."""
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"expected one prompt per image ({images.shape[0]}), got {prompts!r}")
        img = self.encoder(images)  # (N, D)
        txt = self.encoder.encode_text(list(prompts)).to(img)  # (N, D)
        cos = (img * txt).sum(dim=1)  # (N,)
        self.last_per_image = cos.detach()  # for per-image tables; not a state, never synced
        self.cos_sum += cos.sum().to(self.cos_sum)
        self.count += images.shape[0]

    def compute(self) -> Tensor:
        return self.cos_sum / self.count


def build_lpips(net: Literal["alex", "vgg", "squeeze"] = "alex", pretrained_backbone: bool = True) -> nn.Module:
    """torchmetrics' LPIPS network: ``lpips(img1, img2, normalize=True) -> (P, 1, 1, 1)`` distances.

    The LPIPS linear layers ship inside torchmetrics (``functional/image/lpips_models/*.pth``); only the
    ImageNet backbone comes from torchvision's download cache (``torch.hub.get_dir()/checkpoints``).
    ``pretrained_backbone=False`` gives a randomly initialized backbone: for tests only, not LPIPS.
    """
    try:
        from torchmetrics.functional.image.lpips import _NoTrainLpips
    except ImportError as err:  # a private torchmetrics class: name what broke
        raise ImportError("LPIPS needs torchmetrics' functional.image.lpips._NoTrainLpips (torchmetrics>=1.4)") from err
    try:
        return _NoTrainLpips(net=net, pnet_rand=not pretrained_backbone)
    except Exception as err:
        import torchvision

        weights = getattr(torchvision.models, _LPIPS_BACKBONES[net]).DEFAULT
        raise RuntimeError(
            f"LPIPS ({net}) needs torchvision's ImageNet {weights} backbone from {weights.url}, which could not be "
            f"loaded ({type(err).__name__}: {err}). Put that file in {torch.hub.get_dir()}/checkpoints/ (or run once "
            "with network access); the LPIPS linear layers themselves ship with torchmetrics. Offline, use "
            "Diversity(distance='dino', encoder=...) and report DIV as a DINO-feature distance, not LPIPS."
        ) from err


class Diversity(_HeldModelsMetric):
    """DIV: mean pairwise distance between images of the same prompt (higher is better).

    - ``distance="lpips"``: LPIPS, the protocol's distance (needs torchvision's backbone weights, see
      :func:`build_lpips`).
    - ``distance="dino"``: ``1 - cosine`` of ``encoder`` embeddings (a DINO encoder), which works offline.

    The two are on different scales: a reported DIV must name its distance (``distance_name``).
    Pairs are formed only within one ``update`` call, so pass all images of a prompt in one call; the result is
    the mean over all such pairs (equal to the mean of per-prompt means when every prompt has as many images).
    """

    higher_is_better = True

    def __init__(
        self,
        distance: Literal["lpips", "dino"] = "lpips",
        encoder: ImageEncoder | None = None,
        lpips_net: Literal["alex", "vgg", "squeeze"] = "alex",
        lpips_pretrained_backbone: bool = True,
    ) -> None:
        """Args:
        distance: ``lpips`` (the protocol) or ``dino`` (1 - cosine of ``encoder`` embeddings, offline).
        encoder: the image encoder for ``distance="dino"``; unused for ``lpips``.
        lpips_net: LPIPS backbone.
        lpips_pretrained_backbone: False builds a random backbone (tests only; the numbers are not LPIPS).
        """
        super().__init__()
        if distance == "dino":
            if encoder is None:
                raise ValueError("Diversity(distance='dino') needs an image encoder (e.g. load_dino())")
            self._hold("encoder", encoder)
            self.distance_name = f"1-cos:{encoder.name}"
        elif distance == "lpips":
            self._hold("lpips", build_lpips(lpips_net, lpips_pretrained_backbone))
            self.distance_name = f"lpips:{lpips_net}" + ("" if lpips_pretrained_backbone else "(random-backbone)")
        else:
            raise ValueError(f"unknown distance {distance!r}; expected 'lpips' or 'dino'")
        self.distance = distance
        self.add_state("dist_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("pair_count", default=torch.tensor(0), dist_reduce_fx="sum")

    def _pair_distances(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) images of one prompt -> (n * (n - 1) / 2,) distances over pairs i < j."""
        i, j = torch.triu_indices(len(images), len(images), offset=1)
        if self.distance == "dino":
            emb = self.encoder(images)  # (n, D)
            return 1.0 - (emb[i] * emb[j]).sum(-1)
        device = next(self.lpips.parameters()).device
        images = images.to(device=device, dtype=torch.float32)
        return self.lpips(images[i.to(device)], images[j.to(device)], normalize=True).flatten()

    def update(self, images: Tensor, prompt_ids: Tensor | Sequence[int]) -> None:
        """``images``: (N, 3, H, W) float in [0, 1]; ``prompt_ids``: (N,) the prompt each image was made from."""
        check_images(images)
        prompt_ids = torch.as_tensor(prompt_ids, device=images.device)
        if prompt_ids.shape != (images.shape[0],):
            raise ValueError(f"expected {images.shape[0]} prompt ids, got shape {tuple(prompt_ids.shape)}")
        for pid in prompt_ids.unique():
            group = images[prompt_ids == pid]
            if len(group) < 2:
                continue
            d = self._pair_distances(group)
            self.dist_sum += d.sum().to(self.dist_sum)
            self.pair_count += d.numel()

    def compute(self) -> Tensor:
        return self.dist_sum / self.pair_count
