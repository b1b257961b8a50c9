"""W&B without an API key, or unreachable: training goes on, logging offline, with one warning."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger

from callbacks.wandb_offline import start_wandb_or_go_offline
from train import cli_main


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B as on a fresh machine: WANDB_MODE unset, no key in the environment or a netrc, folders in tmp_path."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, folder in (("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    yield tmp_path / "wandb"
    wandb.finish()  # the run is process-global: end it before other tests
    wandb.teardown()


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("W&B could not start online")]


def _offline_runs(folder: Path) -> list[Path]:
    return list(folder.rglob("offline-run-*"))


def test_fit_without_an_api_key_goes_on_offline_with_one_warning(run_args, wandb_env):
    logger = (
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.save_dir={wandb_env}",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(run_args(*logger, "--trainer.logger.init_args.project=hardening", steps=2))
    assert cli.trainer.global_step == 2
    (message,) = _ours(caught)
    assert "No API key" in message and "wandb sync" in message
    assert os.environ["WANDB_MODE"] == "offline" and _offline_runs(wandb_env)


def test_unreachable_server_goes_offline_with_one_warning(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")  # give up after seconds, not the default 90
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "1")
    loggers = [WandbLogger(save_dir=str(wandb_env), project="hardening"), WandbLogger(save_dir=str(wandb_env))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert start_wandb_or_go_offline(loggers)
    assert len(_ours(caught)) == 1 and "CommError" in _ours(caught)[0]
    loggers[0].log_metrics({"train/loss": 1.0}, step=0)  # logging works
    assert _offline_runs(wandb_env)


def test_offline_mode_is_left_alone(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not start_wandb_or_go_offline([WandbLogger(save_dir=str(wandb_env))])
    assert not _ours(caught)


def test_no_warnings_about_the_anonymous_setting_or_the_git_root(wandb_env, monkeypatch, capfd):
    # Lightning's WandbLogger passes anonymous=None to wandb.init, which wandb warns has no effect; and wandb warns
    # when the logger's folder, where it looks for the git repository, does not exist yet. Both at every start.
    monkeypatch.setenv("WANDB_MODE", "offline")
    save_dir = wandb_env / "runs" / "demo"
    assert not start_wandb_or_go_offline([WandbLogger(save_dir=str(save_dir))])
    assert _offline_runs(save_dir)
    out = capfd.readouterr()
    assert "anonymous" not in out.err + out.out and "git root" not in out.err + out.out
