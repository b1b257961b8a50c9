"""An exponential moving average of the trained weights only, Lightning-free.

Lightning's ``WeightAveraging`` callbacks copy the whole module (here: the frozen base model too); this keeps one
float32 shadow per trained parameter (LoRA adapters: a few MB), swaps it in for rendering and export, and is saved
in checkpoints so that a resumed run continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.errors import CheckpointMismatchError, ConfigError


def check_ema_decay(decay: float | None) -> None:
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(f"model.ema_decay must be between 0 and 1 (0.999 is usual) or null for off, got {decay}.")


class TrainedWeightsEMA:
    """Shadow copies of ``params`` (name -> trained parameter), updated after each optimizer step.

    The decay of update ``n`` (1, 2, ...) is ``min(decay, (1 + n) / (10 + n))``, the warmup diffusers' ``EMAModel``
    uses: short fine-tunes start from weights (LoRA's zero up-projections) that an average over the first hundreds of
    steps would otherwise keep too much of.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        check_ema_decay(decay)
        self.decay = decay
        self.params = params
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self.params.items():
            shadow = self.shadow[name]
            if shadow.device != p.device:
                shadow = self.shadow[name] = shadow.to(p.device)
            shadow.lerp_(p.detach().float(), 1.0 - decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average inside the block, and exactly their own values again after it."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p))
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(saved[name])

    def state_dict(self) -> dict:
        shadow = {k: v.cpu() for k, v in self.shadow.items()}
        return {"num_updates": self.num_updates, "decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointMismatchError(
                "The checkpoint's EMA (model.ema_decay) does not hold this model's trained weights: was it made with "
                "other LoRA / train_text_encoder settings?"
            )
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name] = value.to(self.shadow[name].device, torch.float32)
