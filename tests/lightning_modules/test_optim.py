"""Optimizers and schedules."""

import importlib.util

import pytest
import torch

from core.errors import ConfigError, MissingPackageError
from lightning_modules.optim import (
    BNB_OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    check_optimizer_available,
    check_schedule,
    param_groups,
)


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
        build_lr_scheduler("step", opt, 0, 10)


def test_adamw8bit_keeps_8bit_state_and_steps():
    big, te = torch.nn.Linear(4096, 4), torch.nn.Linear(2, 2)  # bitsandbytes quantizes tensors of >= 4096 elements
    te.requires_grad_(False)
    opt = build_optimizer("adamw8bit", param_groups(big, te, 1e-2, None))
    before = big.weight.detach().clone()
    big(torch.randn(2, 4096)).sum().backward()
    opt.step()
    assert opt.state[big.weight]["state1"].dtype == torch.uint8
    assert not torch.equal(before, big.weight)


def _lrs(name, total=20, **kw):
    unet, te = _models()
    opt = build_optimizer("adamw", param_groups(unet, te, 1.0, None))
    sched = build_lr_scheduler(name, opt, warmup_steps=2, total_steps=total, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_restarts_restarts_num_cycles_times():
    lrs = _lrs("cosine_with_restarts", total=22, num_cycles=2)  # 2 warmup steps, then two cosines of 10 steps
    assert lrs[2] == pytest.approx(1.0) and lrs[12] == pytest.approx(1.0)  # each cycle starts at the full rate
    assert lrs[11] < 0.1 and lrs[21] < 0.1
    assert _lrs("cosine_with_restarts", total=22) == _lrs("cosine", total=22)  # one cycle: plain cosine


def test_polynomial_decay_follows_its_power():
    linear, square = _lrs("polynomial", total=12), _lrs("polynomial", total=12, power=2.0)
    assert linear[7] == pytest.approx(0.5, abs=1e-3)  # halfway through the 10 decay steps (to ~0, not 0)
    assert square[7] == pytest.approx(0.25, abs=1e-3)
    assert _lrs("linear", total=12)[7] == pytest.approx(0.5)


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="model.lr_num_cycles"):
        check_schedule(0, 0, 1.0)
    with pytest.raises(ConfigError, match="model.lr_power"):
        check_schedule(0, 1, 0.0)
    with pytest.raises(ConfigError, match="model.lr_warmup_steps"):
        check_schedule(-1, 1, 1.0)


@pytest.mark.parametrize("name", [*BNB_OPTIMIZERS, "adafactor"])
def test_each_optimizer_steps_and_keeps_its_state(name):
    torch.manual_seed(0)
    big, te = torch.nn.Linear(4096, 4), torch.nn.Linear(2, 2)
    te.requires_grad_(False)
    opt = build_optimizer(name, param_groups(big, te, 1e-3, None), betas=(0.9, 0.99), weight_decay=0.0)
    before = big.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        big(torch.randn(2, 4096)).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(before, big.weight)
    state = opt.state[big.weight]
    if "8bit" in name:
        assert state["state1"].dtype == torch.uint8
    if name.endswith("lion"):  # one moment, updates of size lr (sign)
        assert "state2" not in state
    if name == "lion":
        assert torch.allclose((big.weight - before).abs().max(), torch.tensor(2e-3), rtol=1e-3)
    if name == "adafactor":  # factored second moment: a row and a column vector, not a matrix
        assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (4096,)
        assert opt.param_groups[0]["lr"] == 1e-3


def test_prodigy_is_optional():
    unet, te = _models()
    groups = param_groups(unet, te, 1.0, None)
    if importlib.util.find_spec("prodigyopt") is None:  # not locked: a clear error naming what to install
        with pytest.raises(MissingPackageError, match="pip install prodigyopt"):
            check_optimizer_available("prodigy")
        with pytest.raises(MissingPackageError, match="model.optimizer=prodigy"):
            build_optimizer("prodigy", groups)
    else:
        opt = build_optimizer("prodigy", groups)
        unet(torch.randn(3, 2)).sum().backward()
        opt.step()
        assert "d" in opt.param_groups[0]
