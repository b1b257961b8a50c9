"""The optimizer step fused into backward: the same weights as the plain optimizer, gradients freed as it goes."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.fused_optim import OptimizerInBackward, fused_backward_conflicts
from lightning_modules.optim import build_lr_scheduler, build_optimizer, param_groups
from sd.models.loading import load_part


def _unet_and_inputs(steps: int):
    unet = load_part("builtin:tiny-sd", "unet").train()
    g = torch.Generator().manual_seed(0)
    inputs = [
        (torch.randn(2, 4, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.randn(2, 77, 32, generator=g))
        for _ in range(steps)
    ]  # fmt: skip
    return unet, inputs


def _loss(unet, x, t, ctx):
    return unet(x, t, ctx).sample.pow(2).mean()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_fused_gives_the_same_weights_as_the_plain_optimizer(optimizer):
    steps = 3
    plain_unet, inputs = _unet_and_inputs(steps)
    fused_unet, initial = copy.deepcopy(plain_unet), copy.deepcopy(plain_unet)
    te = torch.nn.Linear(1, 1).requires_grad_(False)

    def make(groups):
        return build_optimizer(optimizer, groups, weight_decay=1e-2)

    plain = make(param_groups(plain_unet, te, 1e-3, None))
    fused = OptimizerInBackward(param_groups(fused_unet, te, 1e-3, None), make)
    schedules = [build_lr_scheduler("linear", opt, warmup_steps=1, total_steps=steps + 1) for opt in (plain, fused)]

    grads_alive: list[int] = []  # how many gradients exist each time one is ready
    params = list(fused_unet.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: grads_alive.append(sum(q.grad is not None for q in params)))
    for x, t, ctx in inputs:
        _loss(plain_unet, x, t, ctx).backward()
        plain.step()
        plain.zero_grad()
        loss = fused.step(lambda: _loss(fused_unet, x, t, ctx).backward())  # noqa: B023 - used at once
        assert loss is None and all(p.grad is None for p in params)
        for sched in schedules:
            sched.step()
    for (name, a), b in zip(plain_unet.named_parameters(), fused_unet.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(plain_unet.parameters(), initial.parameters(), strict=True))
    assert max(grads_alive) <= 2  # the full set of gradients (here 200+ tensors) never exists at once


def test_step_after_a_plain_backward_and_state_round_trip():
    unet, inputs = _unet_and_inputs(2)
    other = copy.deepcopy(unet)
    te = torch.nn.Linear(1, 1).requires_grad_(False)

    def make(groups):
        return torch.optim.AdamW(groups)

    fused = OptimizerInBackward(param_groups(unet, te, 1e-3, None), make)
    _loss(unet, *inputs[0]).backward()  # not armed: gradients accumulate as usual
    assert all(p.grad is not None for p in unet.parameters())
    fused.step()
    state = fused.state_dict()
    assert len(state["state"]) == len(list(unet.parameters())) and int(state["state"][0]["step"]) == 1

    resumed = OptimizerInBackward(param_groups(other, te, 1e-3, None), make)
    other.load_state_dict(unet.state_dict())
    resumed.load_state_dict(copy.deepcopy(state))
    for model, opt in ((unet, fused), (other, resumed)):
        opt.step(lambda m=model: _loss(m, *inputs[1]).backward())
    for a, b in zip(unet.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_conflicting_trainer_settings_are_named():
    assert fused_backward_conflicts(1, None, "32-true", 1) == []
    assert fused_backward_conflicts(1, 0.0, "bf16-mixed", 1) == []
    conflicts = " ".join(fused_backward_conflicts(4, 1.0, "16-mixed", 2))
    for word in ("accumulate_grad_batches", "gradient_clip_val", "16-mixed", "DDP"):
        assert word in conflicts


def test_fused_backward_is_refused_with_lora():
    from lightning_modules.dreambooth import DreamBoothModule

    with pytest.raises(ValueError, match="model.fused_backward is for full fine-tuning"):
        DreamBoothModule("builtin:tiny-sd", use_lora=True, fused_backward=True)
