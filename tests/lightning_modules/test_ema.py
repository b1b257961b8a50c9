"""The EMA of the trained weights: its update, the swap for rendering, its checkpoint state."""

from __future__ import annotations

import pytest
import torch

from core.errors import CheckpointMismatchError, ConfigError
from lightning_modules.ema import TrainedWeightsEMA, check_ema_decay


def _params():
    torch.manual_seed(0)
    return {"a": torch.nn.Parameter(torch.randn(3, 2)), "b": torch.nn.Parameter(torch.zeros(4))}


def test_update_follows_the_warmed_up_decay():
    params = _params()
    ema = TrainedWeightsEMA(params, decay=0.9)
    expected = {k: v.detach().clone() for k, v in params.items()}
    for n in range(1, 30):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        for k, p in params.items():
            expected[k] = d * expected[k] + (1 - d) * p.detach()
    for k in params:
        torch.testing.assert_close(ema.shadow[k], expected[k])
    assert ema.num_updates == 29


def test_swap_puts_the_average_in_and_the_exact_weights_back():
    params = _params()
    ema = TrainedWeightsEMA(params, decay=0.5)
    with torch.no_grad():
        params["b"].add_(torch.arange(4.0) * 0.1 + 1e-7)
    ema.update()
    before = {k: v.detach().clone() for k, v in params.items()}
    with ema.swapped_in():
        assert all(torch.equal(params[k], ema.shadow[k]) for k in params)
        assert not torch.equal(params["b"], before["b"])
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_state_round_trips_and_must_match():
    params = _params()
    ema = TrainedWeightsEMA(params, decay=0.5)
    ema.update()
    other = TrainedWeightsEMA(_params(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in params)
    with pytest.raises(CheckpointMismatchError, match="ema_decay"):
        TrainedWeightsEMA({"c": torch.nn.Parameter(torch.ones(1))}, 0.5).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ConfigError, match="model.ema_decay"):
        check_ema_decay(decay)
