"""The export under FSDP: trained weights gathered from all ranks, written by rank 0 into a fresh copy of the base model.

FSDP itself needs GPUs here (bench/device_check.py runs a one-GPU FSDP fit and checks its export); this test gives the
callback's functions what Lightning's FSDP strategy returns on rank 0 (the full state dict, names without the wrappers'
prefixes) and checks that the exported parts are the trained ones, and that other strategies export the module as is.
"""

from __future__ import annotations

import pytest
import torch

from callbacks.export import gathered_trained_weights, parts_with_weights
from lightning_modules.dreambooth import DreamBoothModule


class FSDPStrategyStub:
    """Stands for Lightning's ``FSDPStrategy`` on rank 0: ``lightning_module_state_dict`` is the full state dict."""

    def __init__(self, module):
        self.module = module

    def lightning_module_state_dict(self):
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}


class DDPStrategyStub(FSDPStrategyStub):
    pass


@pytest.fixture(scope="module", params=["builtin:tiny-sd", "builtin:tiny-sdxl"])
def trained(request):
    module = DreamBoothModule(request.param, use_lora=False, train_text_encoder=True)
    module.configure_model()
    with torch.no_grad():  # "training": every trained weight moves away from the base model's
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.01)
    return module


def test_fsdp_exports_the_gathered_trained_weights(trained):
    gathered = gathered_trained_weights(FSDPStrategyStub(trained), trained)
    assert set(gathered) == trained.trained_state_keys() and gathered
    parts = dict(zip(("unet", "text_encoder", "text_encoder_2"), parts_with_weights(trained, gathered), strict=True))
    assert (parts["text_encoder_2"] is None) == (trained.text_encoder_2 is None)  # SDXL's second encoder too
    for name, part in parts.items():
        if part is None:
            continue
        mine = getattr(trained, name).state_dict()
        assert all(torch.equal(value, mine[key]) for key, value in part.state_dict().items()), name
    key = next(iter(gathered))
    with pytest.raises(RuntimeError, match="lack 1 trained weights"):
        parts_with_weights(trained, {k: v for k, v in gathered.items() if k != key})


def test_other_strategies_export_the_module_as_it_is(trained):
    assert gathered_trained_weights(DDPStrategyStub(trained), trained) is None
    assert gathered_trained_weights("auto", trained) is None
