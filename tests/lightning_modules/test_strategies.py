"""FSDP and DeepSpeed: what the strategies would refuse, checked from the composed configs; resume as they call it.

What runs here (CPU, no GPU): the overlays in configs/strategies/ composed with configs/sd15_dreambooth.yaml through the
CLI, up to the strategy check; ``on_load_checkpoint`` called with the checkpoint as Lightning 2.6's FSDP and DeepSpeed
strategies pass it (``state_dict`` removed: they load the weights themselves); the FSDP strategy's loader refusing a
file that needs the unrestricted unpickler, and checking a full checkpoint's keys; the DeepSpeed ZeRO-2 offload
config admitting the module's AdamW (the strategy built with DeepSpeed's availability flags set and a stand-in for
the package's logger, since the package is not installed here). What does not run here: FSDP sharding and DeepSpeed's engine need CUDA (NCCL) and, for
DeepSpeed, the package; bench/device_check.py runs a one-GPU FSDP fit on a GPU machine (README, Multi-GPU).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from core.errors import CheckpointMismatchError, ConfigError
from core.safe_files import UnsafeCheckpointError
from lightning_modules import strategies
from lightning_modules.dreambooth import DreamBoothModule, clean_key
from lightning_modules.strategies import (
    DreamBoothFSDPStrategy,
    check_strategy_options,
    fsdp_wrap_classes,
    prepare_strategy,
    strategy_kind,
)

ROOT = Path(__file__).resolve().parents[2]
FULL = str(ROOT / "configs" / "sd15_dreambooth.yaml")
FSDP = str(ROOT / "configs" / "strategies" / "fsdp_full.yaml")
DEEPSPEED = str(ROOT / "configs" / "strategies" / "deepspeed_zero2_offload.yaml")


class _Checked(Exception):
    pass


def _composed_options(monkeypatch, *args: str) -> dict:
    """The trainer and model options that ``train.py fit <args>`` composes, as the strategy check sees them."""
    seen = {}

    def spy(trainer, subcommand, use_lora):
        seen.update(strategy=trainer.get("strategy"), clip=trainer.get("gradient_clip_val"), use_lora=use_lora)
        check_strategy_options(trainer, subcommand, use_lora)
        raise _Checked  # stop before the trainer (accelerator: gpu) is made

    monkeypatch.setattr(train, "check_strategy_options", spy)
    with pytest.raises(_Checked):
        train.cli_main(["fit", *args])
    return seen


def test_the_fsdp_overlay_composed_with_the_full_config_passes_the_check(monkeypatch):
    seen = _composed_options(monkeypatch, "--config", FULL, "--config", FSDP)
    assert strategy_kind(seen["strategy"]) == "fsdp"
    assert seen["clip"] is None  # sd15_dreambooth.yaml's 1.0, removed by the overlay
    assert seen["use_lora"] is False


def test_fsdp_with_norm_clipping_is_refused_before_anything_runs(monkeypatch, capsys):
    """Lightning's FSDP precision plugin raises at the first optimizer step; here it is an error before set-up."""
    with pytest.raises(ConfigError, match="gradient_clip_val=1.0 with FSDP"):
        _composed_options(monkeypatch, "--config", FULL, "--config", FSDP, "--trainer.gradient_clip_val", "1.0")
    assert train.main(["fit", "--config", FULL, "--config", FSDP, "--trainer.gradient_clip_val", "1.0"]) == 2
    assert "error: trainer.gradient_clip_val=1.0 with FSDP" in capsys.readouterr().err
    # clipping by value is elementwise, which FSDP's shards allow; predict never clips
    check_strategy_options({"strategy": "fsdp", "gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"})
    check_strategy_options({"strategy": "fsdp", "gradient_clip_val": 1.0}, "predict")
    check_strategy_options({"strategy": "ddp", "gradient_clip_val": 1.0})


def test_fsdp_with_lora_is_refused(monkeypatch):
    lora = str(ROOT / "configs" / "sd15_lora.yaml")
    with pytest.raises(ConfigError, match="use_lora=true with FSDP"):
        _composed_options(monkeypatch, "--config", lora, "--config", FSDP)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_the_package_is_a_clear_error(capsys):
    assert train.main(["fit", "--config", FULL, "--config", DEEPSPEED]) == 2
    err = capsys.readouterr().err
    assert "error: trainer.strategy is a DeepSpeed strategy, and the deepspeed package is not installed" in err
    assert "pip install '.[deepspeed]'" in err and "Traceback" not in err


def test_deepspeed_zero2_offload_admits_the_modules_adamw(monkeypatch):
    """DeepSpeed refuses a client optimizer under ZeRO-Offload while ``zero_force_ds_cpu_optimizer`` is true (its
    default); the overlay's strategy, built as Lightning builds ``deepspeed_stage_2_offload``, gets it false."""
    import lightning.pytorch.strategies.deepspeed as ds

    monkeypatch.setattr(ds, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(ds, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    logger = SimpleNamespace(setLevel=lambda level: None)  # all the strategy's __init__ touches of the package
    monkeypatch.setitem(
        sys.modules, "deepspeed", SimpleNamespace(utils=SimpleNamespace(logging=SimpleNamespace(logger=logger)))
    )
    strategy = ds.DeepSpeedStrategy(stage=2, offload_optimizer=True)  # the registry's deepspeed_stage_2_offload
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "zero_force_ds_cpu_optimizer" not in strategy.config  # DeepSpeed's default: True, which refuses AdamW
    prepare_strategy(strategy)
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False
    plain = ds.DeepSpeedStrategy(stage=2)  # no offload: nothing to admit
    prepare_strategy(plain)
    assert "zero_force_ds_cpu_optimizer" not in plain.config


@pytest.fixture(scope="module")
def full_module() -> DreamBoothModule:
    module = DreamBoothModule("builtin:tiny-sd", use_lora=False)
    module.configure_model()
    return module


def _checkpoint(module: DreamBoothModule) -> dict:
    checkpoint = {"state_dict": module.state_dict(), "rng_states": {"torch": torch.get_rng_state()}}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_resume_under_fsdp_and_deepspeed_calls_the_hook_without_state_dict(full_module):
    """FSDP's ``load_checkpoint`` pops ``state_dict`` (it loads the weights into the shards itself); DeepSpeed's returns
    the client state, saved without ``state_dict`` and ``optimizer_states``. The hook used to raise KeyError."""
    saved = _checkpoint(full_module)
    as_fsdp = {k: v for k, v in saved.items() if k != "state_dict"}
    full_module.on_load_checkpoint(as_fsdp)
    assert full_module._rng_states_to_restore is saved["rng_states"]
    full_module._rng_states_to_restore = None
    as_deepspeed = {k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")}
    full_module.on_load_checkpoint(as_deepspeed)
    assert full_module._rng_states_to_restore is saved["rng_states"]
    full_module._rng_states_to_restore = None
    with pytest.raises(CheckpointMismatchError):  # with state_dict (DDP, one device) the keys are still checked
        full_module.on_load_checkpoint({"state_dict": {"unet.nothing.weight": torch.zeros(1)}})


def test_fsdp_checkpoints_load_with_weights_only_and_checked_keys(full_module, tmp_path, monkeypatch):
    saved = _checkpoint(full_module)
    good = tmp_path / "last.ckpt"
    torch.save(saved, good)
    calls = []
    monkeypatch.setattr(
        strategies.FSDPStrategy, "load_checkpoint", lambda self, path, weights_only=None: calls.append(weights_only)
    )
    strategy = DreamBoothFSDPStrategy()
    monkeypatch.setattr(DreamBoothFSDPStrategy, "lightning_module", property(lambda self: full_module))
    strategy.load_checkpoint(good)
    assert calls == [True]  # Lightning's loader told weights_only=True (it reads a sharded checkpoint's metadata so)

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _Checked()}, crafted)  # an object only the full unpickler makes
    with pytest.raises(UnsafeCheckpointError):
        strategy.load_checkpoint(crafted)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}}, other)  # not this model's trained weights
    with pytest.raises(CheckpointMismatchError):
        strategy.load_checkpoint(other)
    assert calls == [True]  # neither reached Lightning's loader


def test_fsdp_units_and_names():
    """Units at the UNet's blocks and at each part; names as a full state dict writes them."""
    strategy = DreamBoothFSDPStrategy()
    policy = strategy.kwargs["auto_wrap_policy"]
    names = {cls.__name__ for cls in fsdp_wrap_classes()}
    assert {"BasicTransformerBlock", "ResnetBlock2D", "UNet2DConditionModel", "CLIPTextModel"} <= names
    assert {cls.__name__ for cls in policy._module_classes} == names
    assert strategy.kwargs["use_orig_params"] is True
    assert clean_key("unet._fsdp_wrapped_module.down_blocks.0._fsdp_wrapped_module.conv.weight") == (
        "unet.down_blocks.0.conv.weight"
    )
