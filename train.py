"""Entry point: ``python train.py {fit,validate,test,predict} --config configs/<x>.yaml [--section.option value]``.

A user-input error (a missing or unreadable file, a bad option value, incompatible settings) prints as
``error: <message>`` and exits with status 2; ``--debug`` (or ``DREAMBOOTH_DEBUG=1``) prints its traceback.
"""

from __future__ import annotations

import gc
import pickle
import sys

from lightning.pytorch.cli import LightningCLI

from callbacks.evaluation import DreamBenchEvaluation
from callbacks.export import DreamBoothExport
from callbacks.fault_tolerance import FaultTolerance
from callbacks.grid import SampleGrid
from callbacks.metrics import SubjectMetrics
from callbacks.render import RenderWriter
from callbacks.run_dir import SaveRunConfig
from callbacks.summary import FitSummary, print_fit_summary
from callbacks.wandb_offline import start_wandb_or_go_offline
from core.errors import report_user_errors
from core.safe_files import safe_torch_load
from datamodules import DreamBoothDataModule
from lightning_modules.dreambooth import DreamBoothModule, check_training_precision
from lightning_modules.strategies import check_strategy_options, prepare_strategy

# How to render, not what was trained: with --ckpt_path, these keep the command's values (see _parse_ckpt_path).
RENDER_OPTIONS = ("sampling", "lora_weights", "controlnet")


class DreamBoothCLI(LightningCLI):
    """LightningCLI with the values that model and data share linked, so each is typed once."""

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("pretrained_model_name_or_path", "revision", "variant", "single_file_config", "vae"):
            parser.link_arguments(f"model.{name}", f"data.{name}")
        parser.link_arguments("data.resolution", "model.resolution")
        # A frozen text encoder's embeddings are cached by the data module; a trained one encodes every step.
        # (New tokens' embeddings train too: pivotal tuning, data.new_tokens, which the module reads as well.)
        parser.link_arguments(
            ("model.train_text_encoder", "data.new_tokens"),
            "data.cache_text_embeddings",
            compute_fn=lambda train_text_encoder, new_tokens: not (train_text_encoder or new_tokens),
        )
        parser.link_arguments("data.new_tokens", "model.new_tokens")
        parser.link_arguments("data.identifier", "model.identifier")
        # Always-present callbacks, configured as top-level groups (metrics score the renders before the grid logs them).
        parser.add_lightning_class_args(SubjectMetrics, "metrics")
        parser.add_lightning_class_args(SampleGrid, "grid")
        parser.add_lightning_class_args(DreamBoothExport, "export")
        parser.add_lightning_class_args(FaultTolerance, "fault_tolerance")
        parser.add_lightning_class_args(RenderWriter, "render")  # predict: PNGs with their settings
        parser.add_lightning_class_args(DreamBenchEvaluation, "evaluation")  # test: the DreamBench report
        parser.add_lightning_class_args(FitSummary, "summary")  # last: it reports what the others wrote
        for name in ("dino_model", "clip_model", "clip_pretrained", "div_distance"):
            parser.link_arguments(f"metrics.{name}", f"evaluation.{name}")  # one set of encoders
        for group in ("render", "evaluation"):
            parser.link_arguments("grid.cell_size", f"{group}.cell_size")  # one cell size for every picture

    def before_instantiate_classes(self) -> None:
        # What a sharded strategy would refuse minutes later, or a missing deepspeed package, before anything loads.
        subcommand = self.config.get("subcommand")
        if subcommand:
            options = self.config[subcommand]
            check_strategy_options(options["trainer"], subcommand, bool(options["model"].get("use_lora")))

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        subcommand = self.config.get("subcommand")
        if subcommand and trainer.local_rank == 0:  # as prepare_data: once per node
            self.datamodule.check_inputs(subcommand)  # bad input fails before a W&B run starts
        start_wandb_or_go_offline(trainer.loggers)  # no API key or no network: log offline, with one warning
        return trainer

    def before_fit(self) -> None:
        # Before prepare_data, which may generate class images for minutes.
        check_training_precision(str(self.trainer.precision))
        prepare_strategy(self.trainer.strategy)  # DeepSpeed's CPU offload admits the module's AdamW

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces every model option with the checkpoint's hyperparameters, which rebuilds the model as
        it was trained; the render options (guidance, LoRA scales, sampler, ControlNet, ...) stay as given here."""
        subcommand = self.config.get("subcommand")
        given = {name: self.config[subcommand]["model"].get(name) for name in RENDER_OPTIONS} if subcommand else {}
        try:
            super()._parse_ckpt_path()  # torch.load(weights_only=True) of the checkpoint's hyperparameters
        except pickle.UnpicklingError:
            safe_torch_load(self.config[subcommand]["ckpt_path"])  # raises UnsafeCheckpointError, which says why
            raise
        for name, value in given.items():
            self.config[subcommand]["model"][name] = value


def cli_main(args: list[str] | None = None) -> DreamBoothCLI:
    return DreamBoothCLI(
        DreamBoothModule,
        DreamBoothDataModule,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run(argv: list[str] | None = None) -> DreamBoothCLI:
    """``cli_main``, then, after ``fit``, the summary of the run (where to look, the metrics) as the last output."""
    cli = cli_main(argv)
    print_fit_summary(cli.trainer)
    return cli


def main(argv: list[str] | None = None) -> int:
    """``run`` for the command line: a user-input error prints as ``error: <message>`` and returns 2."""
    return report_user_errors(run, argv)


if __name__ == "__main__":
    # The imported libraries' objects live as long as the process: left out of every garbage collection from here on
    # (each gc.collect() after a validation would walk all of them again, about half a million objects).
    gc.freeze()
    sys.exit(main())
