"""Sharded strategies (FSDP, DeepSpeed): what they refuse, checked from the options before any work starts.

- :func:`check_strategy_options` reads the trainer options before the trainer is made: FSDP with gradient clipping
  by norm (Lightning's FSDP precision plugin refuses it at the first optimizer step, after minutes of set-up and the
  sanity render) is a :class:`ConfigError`; a DeepSpeed strategy without the ``deepspeed`` package is a
  :class:`MissingPackageError` saying how to install it.
- :func:`prepare_strategy` adapts a DeepSpeed strategy that offloads the optimizer to the CPU so that it takes the
  module's AdamW (DeepSpeed refuses a client optimizer under ZeRO-Offload unless ``zero_force_ds_cpu_optimizer`` is
  false; the module's AdamW then steps on the CPU copy of the weights DeepSpeed keeps there).
- :class:`DreamBoothFSDPStrategy` is Lightning's ``FSDPStrategy`` with a wrap policy at the UNet's blocks, whose
  checkpoints load as this trainer's other checkpoints do, with ``weights_only`` and a check of their keys.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from core.errors import ConfigError, MissingPackageError
from core.safe_files import safe_torch_load

__all__ = ["DreamBoothFSDPStrategy", "check_strategy_options", "fsdp_wrap_classes", "prepare_strategy", "strategy_kind"]


def strategy_kind(strategy: Any) -> str:
    """``"fsdp"``, ``"deepspeed"`` or ``"other"`` for a ``--trainer.strategy`` value: a registry name
    (``"deepspeed_stage_2_offload"``), a ``{class_path, init_args}`` mapping, or a strategy instance."""
    if isinstance(strategy, str):
        name = strategy.lower()
    elif isinstance(strategy, dict) or hasattr(strategy, "class_path"):
        name = str(strategy["class_path"] if isinstance(strategy, dict) else strategy.class_path).lower()
    else:
        name = type(strategy).__name__.lower()
    name = name.rsplit(".", 1)[-1]
    if name.startswith("fsdp") or "fsdpstrategy" in name:
        return "fsdp"
    if name.startswith("deepspeed"):
        return "deepspeed"
    return "other"


def check_strategy_options(trainer: Any, subcommand: str = "fit", use_lora: bool = False) -> None:
    """Refuse, before the trainer is made, the strategy options that would fail later (see the module docstring).

    Args:
        trainer: The ``trainer`` options (``strategy``, ``gradient_clip_val``, ``gradient_clip_algorithm``): a dict or
            jsonargparse's namespace.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict`` (clipping matters to ``fit`` only).
        use_lora: ``model.use_lora``: LoRA's float32 adapters sit inside frozen half-precision layers, which FSDP
            cannot put in one flat parameter; LoRA's trained weights are a few MB, so DDP is its multi-GPU strategy.
    """
    kind = strategy_kind(trainer.get("strategy") or "auto")
    clip, algorithm = trainer.get("gradient_clip_val"), trainer.get("gradient_clip_algorithm") or "norm"
    if kind == "fsdp" and clip and algorithm == "norm" and subcommand == "fit":
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} with FSDP: Lightning's FSDP strategy cannot clip gradients by norm "
            "(each rank holds a shard of them) and would stop at the first optimizer step. Set "
            "--trainer.gradient_clip_val null (configs/strategies/fsdp_full.yaml does), or clip by value with "
            "--trainer.gradient_clip_algorithm value."
        )
    if kind == "fsdp" and use_lora and subcommand == "fit":
        raise ConfigError(
            "model.use_lora=true with FSDP: LoRA's float32 adapters sit inside frozen half-precision layers, which FSDP "
            "cannot shard together. LoRA trains a few MB of weights: use DDP (configs/strategies/ddp_4gpu.yaml); FSDP "
            "is for full fine-tuning (configs/sd15_dreambooth.yaml)."
        )
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise MissingPackageError(
            "trainer.strategy is a DeepSpeed strategy, and the deepspeed package is not installed. Install it with "
            "`pip install '.[deepspeed]'` (or `pip install 'deepspeed>=0.16'`; it needs CUDA), or use "
            "configs/strategies/fsdp_full.yaml or DDP."
        )


def prepare_strategy(strategy: Any) -> None:
    """Under DeepSpeed with the optimizer offloaded to the CPU, admit the module's own optimizer (see above)."""
    config = getattr(strategy, "config", None)
    if strategy_kind(strategy) != "deepspeed" or not isinstance(config, dict):
        return
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        config.setdefault("zero_force_ds_cpu_optimizer", False)


def fsdp_wrap_classes() -> set[type]:
    """The FSDP units: each UNet transformer and resnet block, each text-encoder layer, and each whole part (UNet, text
    encoder, VAE), so that a frozen half-precision part and the trained float32 UNet never share a flat parameter (FSDP
    refuses mixed dtypes in one) and a block's weights are gathered only while that block runs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from transformers import CLIPTextModel
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return {BasicTransformerBlock, ResnetBlock2D, CLIPEncoderLayer, UNet2DConditionModel, CLIPTextModel, AutoencoderKL}


class DreamBoothFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` for this trainer (``configs/strategies/fsdp_full.yaml``):

    - units at the UNet's transformer / resnet blocks and at each part (:func:`fsdp_wrap_classes`) unless
      ``auto_wrap_policy`` is given; ``use_orig_params`` (Lightning's default) keeps the parameters' names, which the
      module's checkpoints and exports use;
    - checkpoints load with ``weights_only``: a full checkpoint (one file) is first read with the restricted unpickler
      (mapped, not copied, into memory), so a file holding anything but tensors, numbers and strings is refused before
      Lightning's own loader unpickles it (without that restriction), and its keys are checked against the model's
      trained weights (``DreamBoothModule.check_checkpoint_keys``: the strategy removes ``state_dict`` before the
      module's ``on_load_checkpoint`` sees the checkpoint); a sharded checkpoint's metadata loads with
      ``weights_only=True``.

    Args: those of ``FSDPStrategy``.
    """

    def __init__(self, *args: Any, auto_wrap_policy: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, auto_wrap_policy=auto_wrap_policy or fsdp_wrap_classes(), **kwargs)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():
            saved = safe_torch_load(path, map_location="cpu", mmap=True)  # raises UnsafeCheckpointError: says why
            check = getattr(self.lightning_module, "check_checkpoint_keys", None)
            if check is not None and "state_dict" in saved:
                check(set(saved["state_dict"]))
            del saved
        return super().load_checkpoint(path, weights_only=True)
