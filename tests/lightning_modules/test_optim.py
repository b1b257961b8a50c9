"""Optimizers and schedules."""

import pytest
import torch

from lightning_modules.optim import build_lr_scheduler, build_optimizer, param_groups


def _models():
    unet, te = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    te.requires_grad_(False)
    return unet, te


def test_param_groups_separate_text_encoder_lr():
    unet, te = _models()
    assert [g["name"] for g in param_groups(unet, te, 1e-4, 1e-5)] == ["unet"]
    te.requires_grad_(True)
    groups = param_groups(unet, te, 1e-4, 1e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 1e-5)]
    assert param_groups(unet, te, 1e-4, None)[1]["lr"] == 1e-4


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(name):
    unet, te = _models()
    opt = build_optimizer("adamw", param_groups(unet, te, 1.0, None))
    sched = build_lr_scheduler(name, opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    if name == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2 and lrs == sorted(lrs[:5]) + sorted(lrs[5:], reverse=True)


def test_unknown_names_are_refused():
    unet, te = _models()
    with pytest.raises(ValueError, match="model.optimizer"):
        build_optimizer("sgd", param_groups(unet, te, 1.0, None))
    opt = build_optimizer("adamw", param_groups(unet, te, 1.0, None))
    with pytest.raises(ValueError, match="model.lr_scheduler"):
        build_lr_scheduler("polynomial", opt, 0, 10)


def test_adamw8bit_keeps_8bit_state_and_steps():
    big, te = torch.nn.Linear(4096, 4), torch.nn.Linear(2, 2)  # bitsandbytes quantizes tensors of >= 4096 elements
    te.requires_grad_(False)
    opt = build_optimizer("adamw8bit", param_groups(big, te, 1e-2, None))
    before = big.weight.detach().clone()
    big(torch.randn(2, 4096)).sum().backward()
    opt.step()
    assert opt.state[big.weight]["state1"].dtype == torch.uint8
    assert not torch.equal(before, big.weight)
