"""The DreamBooth objective on known tensors."""

import pytest
import torch
from diffusers import DDPMScheduler

from sd.training.diffusion import add_noise, diffusion_target, dreambooth_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 2, 2, generator=g)
    target = torch.randn(4, 4, 2, 2, generator=g)
    is_prior = torch.tensor([False, True, False, True])  # rows deliberately interleaved: order must not matter
    return pred, target, is_prior


def test_masked_loss_matches_hand_computation():
    pred, target, is_prior = _batch()
    terms = dreambooth_loss(pred, target, is_prior, prior_loss_weight=0.5)
    sq = (pred - target) ** 2
    instance = (sq[0].sum() + sq[2].sum()) / (2 * sq[0].numel())
    prior = (sq[1].sum() + sq[3].sum()) / (2 * sq[0].numel())
    torch.testing.assert_close(terms.instance, instance)
    torch.testing.assert_close(terms.prior, prior)
    torch.testing.assert_close(terms.loss, instance + 0.5 * prior)


def test_zero_prior_weight_is_plain_fine_tuning():
    pred, target, is_prior = _batch()
    pred.requires_grad_(True)
    terms = dreambooth_loss(pred, target, is_prior, prior_loss_weight=0.0)
    plain = torch.nn.functional.mse_loss(pred[~is_prior], target[~is_prior])
    torch.testing.assert_close(terms.loss, plain)
    (grad,) = torch.autograd.grad(terms.loss, pred)
    assert grad[is_prior].abs().sum() == 0  # class rows contribute nothing
    assert grad[~is_prior].abs().sum() > 0


def test_batch_without_prior_rows():
    pred, target, _ = _batch()
    terms = dreambooth_loss(pred, target, torch.zeros(4, dtype=torch.bool), prior_loss_weight=1.0)
    assert terms.prior.item() == 0.0
    torch.testing.assert_close(terms.loss, torch.nn.functional.mse_loss(pred, target))


def test_mask_must_be_bool_per_row():
    pred, target, _ = _batch()
    with pytest.raises(ValueError, match="bool mask"):
        dreambooth_loss(pred, target, torch.tensor([0, 1, 0, 1]), 1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_scheduler_config(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents = torch.randn(2, 4, 2, 2)
    torch.manual_seed(0)
    noisy, noise, t = add_noise(sched, latents)
    target = diffusion_target(sched, latents, noise, t)
    if prediction_type == "epsilon":
        assert torch.equal(target, noise)
    else:
        a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - s * latents)
    torch.testing.assert_close(noisy, sched.add_noise(latents, noise, t))
