"""Loss recipes: min-SNR weights, offset noise, input perturbation; each off by default, bitwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from core.errors import ConfigError
from sd.training.diffusion import add_noise, dreambooth_loss
from sd.training.loss_recipes import (
    LossRecipe,
    compute_snr,
    draw_noisy_inputs,
    loss_row_weights,
    min_snr_weights,
)


def _sched(prediction_type="epsilon", **kw):
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **kw)


def test_defaults_draw_and_weigh_exactly_as_before():
    sched, latents = _sched(), torch.randn(4, 4, 8, 8)
    torch.manual_seed(3)
    plain = add_noise(sched, latents)
    torch.manual_seed(3)
    recipe = draw_noisy_inputs(sched, latents, LossRecipe())
    assert all(torch.equal(a, b) for a, b in zip(plain, recipe, strict=True))
    assert loss_row_weights(sched, plain[2], LossRecipe()) is None
    # The loss without row weights is the plain per-row mean, bitwise (what dreambooth_loss computed before).
    pred, target, is_prior = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([False, True] * 2)
    per_row = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    expected = per_row[~is_prior].mean() + 0.7 * per_row[is_prior].mean()
    assert torch.equal(dreambooth_loss(pred, target, is_prior, 0.7).loss, expected)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    sched, t = _sched(), torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(compute_snr(sched, t), a / (1 - a))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_paper_and_kohya(prediction_type):
    sched, t, gamma = _sched(prediction_type), torch.arange(0, 1000, 37), 5.0
    snr = compute_snr(sched, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    w = min_snr_weights(sched, t, gamma)
    torch.testing.assert_close(w, expected)
    assert (w > 0).all() and (w <= 1).all()
    low_noise = snr > gamma  # early timesteps are down-weighted, late ones (SNR < gamma) keep weight ~1 (epsilon)
    assert low_noise.any() and (w[low_noise] < 1).all()
    if prediction_type == "epsilon":
        assert torch.equal(w[~low_noise], torch.ones_like(w[~low_noise]))


def test_min_snr_epsilon_weight_stays_finite_at_zero_terminal_snr():
    sched = _sched(rescale_betas_zero_snr=True)
    w = min_snr_weights(sched, torch.tensor([999, 998]), 5.0)
    assert torch.isfinite(w).all() and w[0] == 1.0


def test_row_weights_scale_each_rows_error():
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    is_prior = torch.tensor([False, False, True, True])
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    per_row = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w
    terms = dreambooth_loss(pred, target, is_prior, 1.0, row_weights=w)
    torch.testing.assert_close(terms.instance, per_row[:2].mean())
    torch.testing.assert_close(terms.prior, per_row[2:].mean())


def test_noise_offset_adds_a_constant_per_row_and_channel():
    sched, latents = _sched(), torch.randn(3, 4, 8, 8)
    torch.manual_seed(0)
    plain_noise = add_noise(sched, latents)[1]
    torch.manual_seed(0)
    noisy, noise, t = draw_noisy_inputs(sched, latents, LossRecipe(noise_offset=0.1))
    offset = noise - plain_noise  # (3, 4, 8, 8), constant over h and w
    assert offset.abs().amax() > 0
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset))
    torch.testing.assert_close(noisy, sched.add_noise(latents, noise, t))  # the model sees and predicts this noise


def test_input_perturbation_noises_the_input_but_not_the_target():
    sched, latents = _sched(), torch.randn(3, 4, 8, 8)
    torch.manual_seed(0)
    plain = add_noise(sched, latents)
    torch.manual_seed(0)
    noisy, noise, t = draw_noisy_inputs(sched, latents, LossRecipe(input_perturbation=0.1))
    assert torch.equal(noise, plain[1]) and torch.equal(t, plain[2])  # the target's noise is the plain draw
    assert not torch.allclose(noisy, sched.add_noise(latents, noise, t))
    extra = noisy - sched.add_noise(latents, noise, t)  # sqrt(1 - alpha_bar) * 0.1 * N(0, 1)
    scale = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1) * 0.1
    assert 0.5 < (extra / scale).std().item() < 1.5


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        (LossRecipe(snr_gamma=0.0), "model.snr_gamma"),
        (LossRecipe(noise_offset=-0.1), "model.noise_offset"),
        (LossRecipe(input_perturbation=float("nan")), "model.input_perturbation"),
    ],
)
def test_bad_values_are_refused(recipe, match):
    with pytest.raises(ConfigError, match=match):
        recipe.check()
